"""The frozen message every pure function works on, independent of the AMQP client."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson

from proxy.errors import NotJsonError

HOPS_HEADER = "x-message-proxy-hops"
# Header names are text; one that is not UTF-8 stays bytes (see ``proxy.amqp.tables``).
Headers = Mapping[str | bytes, Any]
EMPTY_HEADERS: Headers = MappingProxyType({})


class RawProperties(NamedTuple):
    """A content header's properties as they were delivered, so that a relay can pass them on
    byte for byte (adding only its hop count) instead of encoding them again."""

    flags: int
    before_headers: bytes  # content-type, content-encoding
    headers: bytes  # the field table with its length; empty when the message had none
    after_headers: bytes  # delivery-mode through app-id (and cluster-id)


@dataclass(frozen=True, eq=False)
class Message:
    """One AMQP message as delivered: body, routing facts and basic properties."""

    body: bytes
    routing_key: str = ""
    exchange: str = ""
    queue: str = ""
    headers: Headers = field(default_factory=dict)
    content_type: str | None = None
    content_encoding: str | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: datetime | None = None
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None
    redelivered: bool = False
    raw_properties: RawProperties | None = field(default=None, repr=False)

    @cached_property
    def routing_words(self) -> list[str]:
        return self.routing_key.split(".")

    @cached_property
    def json(self) -> dict[str, Any]:
        """The body as a JSON object; raises ``NotJsonError`` (cached) when it is not one."""
        try:
            value = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise NotJsonError("body is not valid JSON") from None
        if not isinstance(value, dict):
            raise NotJsonError(f"body is JSON but not an object ({type(value).__name__})")
        return value

    @property
    def hops(self) -> int:
        value = self.headers.get(HOPS_HEADER, 0)
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: a float('inf') header
            return 0

    @classmethod
    def of(cls, values: dict[str, Any]) -> Message:
        """``Message(**values)`` for a dict naming every field, without the frozen ``__init__``.

        The per-delivery path: a frozen dataclass sets each of its 19 fields through
        ``object.__setattr__``, about four times the cost of filling ``__dict__`` at once.
        """
        if len(values) != _FIELD_COUNT:
            raise TypeError(f"Message.of needs all {_FIELD_COUNT} fields, got {sorted(values)}")
        message = _new(cls)
        message.__dict__.update(values)
        return message


_new = object.__new__
_FIELD_COUNT = len(fields(Message))


def header_text(value: Any) -> str | None:
    """A header value as text for matching and templates; None when it has no text form."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return None


def json_path(document: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    """Follow a dotted path through nested objects: (found, value)."""
    node: Any = document
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node
