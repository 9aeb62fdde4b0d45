"""Every exception message-proxy raises on purpose.

    ProxyError
    ├── ConfigError            bad config file or environment; names the key; exit code 2
    ├── RouteError             a message cannot be routed (permanent, per message)
    │   ├── TemplateError      reason "template": a placeholder has no value in this message
    │   ├── NotJsonError       reason "not-json": json match or placeholder, body not a JSON object
    │   └── PluginError        reason "plugin-error": the user's callable raised
    ├── DestinationError       a destination did not accept a publish
    │   ├── TransientError     connection lost, timeout: hold the batch and retry with backoff
    │   └── PermanentError     the destination refused this one message: dead-letter it
    └── AmqpError              the source's connection failed or was closed by the broker

Third-party errors (redis) are translated at the sink boundary with ``raise ... from exc``;
nothing above the sinks catches a library's exception type.
"""

from __future__ import annotations

from collections.abc import Sequence


class ProxyError(Exception):
    """Base of every exception message-proxy raises on purpose."""


class ConfigError(ProxyError):
    """The configuration is invalid. ``key`` is the dotted path of the (first) offending key;
    ``problems`` holds every ``(key, problem)`` found, that one first. ``str()`` is one line per
    problem."""

    def __init__(self, key: str, problem: str, *, more: Sequence[tuple[str, str]] = ()) -> None:
        self.key = key
        self.problem = problem
        self.problems: tuple[tuple[str, str], ...] = ((key, problem), *more)
        super().__init__("\n".join(f"{k}: {p}" if k else p for k, p in self.problems))

    @classmethod
    def of(cls, problems: Sequence[tuple[str, str]]) -> ConfigError:
        (key, problem), *more = problems
        return cls(key, problem, more=more)


class RouteError(ProxyError):
    """A message cannot be routed; it is dead-lettered with ``reason``."""

    reason = "unrouted"


class TemplateError(RouteError):
    reason = "template"


class NotJsonError(RouteError):
    reason = "not-json"


class PluginError(RouteError):
    reason = "plugin-error"


class DestinationError(ProxyError):
    """A destination did not accept a publish."""


class TransientError(DestinationError):
    """Worth retrying: the destination is unreachable, slow, or restarting."""


class PermanentError(DestinationError):
    """Not worth retrying: ``reason`` is one of the dead-letter reason codes."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class AmqpError(ProxyError):
    """An AMQP connection failed, or the broker closed it; its owner reconnects."""


class ChannelClosed(AmqpError):
    """The broker closed the channel: ``reply_code`` (403, 404, 406...) and ``reply_text``."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"channel closed by the broker: {reply_code} {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text
