"""Route rules as pure functions: a ``Message`` in, destinations or a dead-letter reason out.

No I/O here. ``Router.route`` never raises for a message: every failure is a ``Rejected`` with one
of the dead-letter reason codes (docs/REFERENCE.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from proxy.config import (
    MAX_HOPS,
    Config,
    ExchangeDestination,
    Match,
    Route,
    StreamDestination,
)
from proxy.errors import RouteError
from proxy.message import HOPS_HEADER, Message, header_text, json_path
from proxy.plugins import load_plugin
from proxy.templates import Template

# --- topic patterns ---------------------------------------------------------------------------


def topic_matches(pattern: Sequence[str], words: Sequence[str]) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    # Positions in ``words`` reachable after consuming each pattern word (a set of indexes).
    reachable = {0}
    for token in pattern:
        if token == "#":
            reachable = set(range(min(reachable), len(words) + 1))
        else:
            reachable = {
                index + 1
                for index in reachable
                if index < len(words) and (token == "*" or token == words[index])
            }
        if not reachable:
            return False
    return len(words) in reachable


class TopicPattern:
    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        words = tuple(pattern.split("."))
        self._matches = lru_cache(maxsize=4096)(lambda key: topic_matches(words, key.split(".")))

    def matches(self, routing_key: str) -> bool:
        return bool(self._matches(routing_key))


# --- targets -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamTarget:
    route: str
    template: str  # the configured name: the metric label
    name: str  # the expanded stream key
    maxlen: int | None = None
    dedupe: bool = False


@dataclass(frozen=True, slots=True)
class ExchangeTarget:
    route: str
    template: str
    exchange: str
    routing_key: str


Target = StreamTarget | ExchangeTarget


@dataclass(frozen=True, slots=True)
class Routed:
    targets: tuple[Target, ...]


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    detail: str
    route: str | None = None


Decision = Routed | Rejected


# --- compiled routes ---------------------------------------------------------------------------

Check = Callable[[Message], bool]


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _compile_match(match: Match) -> tuple[list[Check], list[Check]]:
    """(cheap checks, checks that parse the body or run user code): the latter run last."""
    cheap: list[Check] = []
    costly: list[Check] = []
    if match.queue is not None:
        queue = match.queue
        cheap.append(lambda m: m.queue == queue)
    if match.routing_key is not None:
        topic = TopicPattern(match.routing_key)
        cheap.append(lambda m: topic.matches(m.routing_key))
    if match.content_type is not None:
        wanted = _media_type(match.content_type)
        cheap.append(lambda m: m.content_type is not None and _media_type(m.content_type) == wanted)
    for name, expected in match.headers.items():
        cheap.append(_header_check(name, expected))
    if match.json_fields:
        fields = tuple(match.json_fields.items())
        costly.append(lambda m: _json_fields_match(m, fields))
    if match.plugin is not None:
        predicate = load_plugin(match.plugin)
        costly.append(lambda m: _run_plugin(predicate, m))
    return cheap, costly


def _header_check(name: str, expected: str) -> Check:
    if expected == "*":
        return lambda m: name in m.headers
    return lambda m: name in m.headers and header_text(m.headers[name]) == expected


def _json_fields_match(message: Message, fields: tuple[tuple[str, Any], ...]) -> bool:
    document = message.json  # NotJsonError propagates: reason "not-json"
    for path, expected in fields:
        found, value = json_path(document, path)
        if not found or value != expected or isinstance(value, bool) != isinstance(expected, bool):
            return False
    return True


def _run_plugin(predicate: Callable[[Message], object], message: Message) -> bool:
    from proxy.errors import PluginError

    try:
        return bool(predicate(message))
    except Exception as exc:  # user code: any exception dead-letters this one message
        raise PluginError(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _Destination:
    template: Template
    build: Callable[[Message], Target]
    routing_only: bool  # the target depends on queue, exchange and routing key alone


def compile_destination(
    route: str, destination: StreamDestination | ExchangeDestination
) -> _Destination:
    if isinstance(destination, StreamDestination):
        stream = Template.parse(destination.stream)
        maxlen, dedupe = destination.maxlen, destination.dedupe

        def build_stream(message: Message) -> Target:
            name = stream.expand(message)
            if not name:
                from proxy.errors import TemplateError

                raise TemplateError(f"stream name {stream.source!r} expanded to ''")
            return StreamTarget(route, stream.source, name, maxlen, dedupe)

        return _Destination(stream, build_stream, stream.routing_only)

    exchange = Template.parse(destination.exchange)
    routing_key = Template.parse(destination.routing_key)

    def build_exchange(message: Message) -> Target:
        return ExchangeTarget(
            route, exchange.source, exchange.expand(message), routing_key.expand(message)
        )

    return _Destination(
        exchange, build_exchange, exchange.routing_only and routing_key.routing_only
    )


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str
    cheap: tuple[Check, ...]
    costly: tuple[Check, ...]
    destinations: tuple[_Destination, ...]
    continue_: bool
    # The decision depends on queue, exchange, routing key and content type alone.
    routing_only: bool = False

    @staticmethod
    def compile(route: Route) -> CompiledRoute:
        cheap, costly = _compile_match(route.match)
        destinations = tuple(compile_destination(route.name, d) for d in route.to)
        match = route.match
        routing_only = (
            not match.headers
            and not match.json_fields
            and match.plugin is None
            and all(destination.routing_only for destination in destinations)
        )
        return CompiledRoute(
            route.name, tuple(cheap), tuple(costly), destinations, route.continue_, routing_only
        )

    def matches(self, message: Message) -> bool:
        return all(check(message) for check in self.cheap) and all(
            check(message) for check in self.costly
        )


ROUTE_CACHE_SIZE = 4096

RouteKey = tuple[str, str, str, str | None]


class Router:
    """Routes in file order. When no route looks at headers, the body or user code, a decision
    depends on (queue, exchange, routing key, content type) alone and is cached by them: the
    per-message work is then the size and hop checks and one dict look-up."""

    def __init__(
        self, routes: Sequence[Route], *, max_message_bytes: int, max_hops: int = MAX_HOPS
    ) -> None:
        self.routes = tuple(CompiledRoute.compile(route) for route in routes)
        self.max_message_bytes = max_message_bytes
        self.max_hops = max_hops
        self.cacheable = all(route.routing_only for route in self.routes)
        self._cache: dict[RouteKey, Decision] = {}

    @classmethod
    def from_config(cls, config: Config) -> Router:
        return cls(config.routes, max_message_bytes=config.max_message_bytes)

    def route(self, message: Message) -> Decision:
        if len(message.body) > self.max_message_bytes:
            return Rejected(
                "too-large",
                f"body is {len(message.body)} bytes, the limit is {self.max_message_bytes}",
            )
        # Most messages carry no hop count: a key test is a tenth of reading and converting it.
        if HOPS_HEADER in message.headers and message.hops >= self.max_hops:
            return Rejected("loop", f"message was relayed {message.hops} times")
        if not self.cacheable:
            return self._decide(message)
        key = (message.queue, message.exchange, message.routing_key, message.content_type)
        decision = self._cache.get(key)
        if decision is None:
            if len(self._cache) >= ROUTE_CACHE_SIZE:
                self._cache.clear()  # routing keys with ids in them: keep memory bounded
            decision = self._cache[key] = self._decide(message)
        return decision

    def _decide(self, message: Message) -> Decision:
        targets: list[Target] = []
        for route in self.routes:
            try:
                if not route.matches(message):
                    continue
                targets.extend(destination.build(message) for destination in route.destinations)
            except RouteError as exc:
                return Rejected(exc.reason, str(exc), route.name)
            if not route.continue_:
                break
        if not targets:
            return Rejected("unrouted", "no route matched")
        return Routed(tuple(targets))
