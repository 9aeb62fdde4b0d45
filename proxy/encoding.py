"""What lands in a Redis stream (docs/REFERENCE.md): pure functions over ``Message``."""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from proxy.message import Message

Fields = dict[str, bytes | str]

_OPTIONAL_TEXT = (
    "content_type",
    "content_encoding",
    "message_id",
    "correlation_id",
    "type",
    "app_id",
)


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    reason: str
    detail: str
    route: str | None
    failed_at_ms: int


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(raw).decode()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):  # orjson handles datetimes; this covers subclasses
        return value.isoformat()
    return str(value)


_JSON_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS


def headers_json(headers: Any) -> bytes:
    """Headers as a JSON object: non-UTF-8 bytes as ``base64:...`` (names too), timestamps
    RFC 3339."""
    try:
        return orjson.dumps(headers, default=_json_default, option=_JSON_OPTIONS)
    except TypeError:
        if not _has_bytes_key(headers):
            raise
    return orjson.dumps(_text_keys(headers), default=_json_default, option=_JSON_OPTIONS)


def _has_bytes_key(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(isinstance(k, bytes) or _has_bytes_key(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_bytes_key(item) for item in value)
    return False


def _text_keys(value: Any) -> Any:
    """``value`` with every name that is bytes (not UTF-8) written as a value would be."""
    if isinstance(value, Mapping):
        return {
            (_json_default(k) if isinstance(k, bytes) else k): _text_keys(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_text_keys(item) for item in value]
    return value


def unix_seconds(timestamp: datetime) -> int:
    return int(timestamp.timestamp())


class _SecondsText:
    """The stream's ``timestamp`` field, remembering the last one: consecutive messages mostly
    share their second, and comparing two datetimes costs a twentieth of converting one (a
    cache keyed by hash would not pay: every message brings a new datetime to hash)."""

    def __init__(self) -> None:
        self._last: tuple[datetime | None, str] = (None, "")

    def __call__(self, timestamp: datetime) -> str:
        last, text = self._last
        if timestamp != last:
            text = str(unix_seconds(timestamp))
            self._last = (timestamp, text)
        return text


_seconds_text = _SecondsText()


def entry_fields(message: Message) -> Fields:
    fields: Fields = {
        "body": message.body,
        "routing_key": message.routing_key,
        "exchange": message.exchange,
        "queue": message.queue,
    }
    # The instance dict in one comprehension: six getattr calls in a loop cost a third more.
    values = message.__dict__
    fields.update({name: values[name] for name in _OPTIONAL_TEXT if values[name] is not None})
    if message.timestamp is not None:
        fields["timestamp"] = _seconds_text(message.timestamp)
    if message.headers:
        fields["headers"] = headers_json(message.headers)
    return fields


# --- the same entry in Redis's wire format ----------------------------------------------------


def _bulk_string(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


# Per field after the body, its bit in an entry's shape (which fields it has), in field order.
_FIXED_AFTER_BODY = ("routing_key", "exchange", "queue")
_SHAPE_BITS = tuple((name, 1 << bit) for bit, name in enumerate(_OPTIONAL_TEXT))
_TIMESTAMP_BIT, _HEADERS_BIT = 1 << len(_OPTIONAL_TEXT), 2 << len(_OPTIONAL_TEXT)
_BODY_NAME = _bulk_string(b"body")


@functools.cache
def _rest_format(shape: int) -> tuple[int, bytes]:
    """For an entry of this shape: its field count, and the ``%``-format of every field after
    the body (the CRLF that ends the body first), a ``%d`` and a ``%b`` per value."""
    names = [*_FIXED_AFTER_BODY, *(name for name, bit in _SHAPE_BITS if shape & bit)]
    if shape & _TIMESTAMP_BIT:
        names.append("timestamp")
    if shape & _HEADERS_BIT:
        names.append("headers")
    packed = b"".join(_bulk_string(name.encode()) + b"$%d\r\n%b\r\n" for name in names)
    return 1 + len(names), b"\r\n" + packed


def entry_resp(message: Message) -> tuple[int, bytes, bytes, bytes]:
    """``entry_fields(message)`` as the fields of an XADD in RESP, without building them: the
    number of fields, the body's name and length prefix, the body (not copied), and every field
    after it. The stream sink's hot path; a test holds it to ``entry_fields``, byte for byte."""
    values = message.__dict__
    routing_key = message.routing_key.encode()
    exchange = message.exchange.encode()
    queue = message.queue.encode()
    args: list[int | bytes] = [
        len(routing_key),
        routing_key,
        len(exchange),
        exchange,
        len(queue),
        queue,
    ]
    shape = 0
    for name, bit in _SHAPE_BITS:
        value = values[name]
        if value is not None:
            raw = value.encode()
            args += (len(raw), raw)
            shape |= bit
    timestamp = message.timestamp
    if timestamp is not None:
        raw = _seconds_text(timestamp).encode()
        args += (len(raw), raw)
        shape |= _TIMESTAMP_BIT
    if message.headers:
        raw = headers_json(message.headers)
        args += (len(raw), raw)
        shape |= _HEADERS_BIT
    count, rest = _rest_format(shape)
    body = message.body
    return count, b"%b$%d\r\n" % (_BODY_NAME, len(body)), body, rest % tuple(args)


def one_line(text: str, limit: int = 500) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def dead_letter_fields(message: Message, info: DeadLetterInfo) -> Fields:
    fields = entry_fields(message)
    fields["error"] = info.reason
    fields["detail"] = one_line(info.detail)
    if info.route is not None:
        fields["route"] = info.route
    fields["failed_at"] = str(info.failed_at_ms)
    return fields


def dead_letter_headers(info: DeadLetterInfo, message: Message) -> dict[str, Any]:
    """For dead letters sent to an exchange: the same facts as AMQP headers, and where the
    message came from (a dead letter is published with the dead-letter exchange and routing key,
    so its delivery no longer says), which ``message-proxy replay --from-queue`` sends it back
    to."""
    headers: dict[str, Any] = {
        "x-message-proxy-error": info.reason,
        "x-message-proxy-detail": one_line(info.detail),
        "x-message-proxy-failed-at": info.failed_at_ms,
    }
    if info.route is not None:
        headers["x-message-proxy-route"] = info.route
    headers["x-message-proxy-exchange"] = message.exchange
    headers["x-message-proxy-routing-key"] = message.routing_key
    headers["x-message-proxy-queue"] = message.queue
    return headers
