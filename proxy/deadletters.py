"""Dead letters read back for a replay: a stream entry or a dead-letter queue's message turned
into the message to publish again, its failure's facts, and the filters: pure, no I/O.

What comes back from a dead-letter **stream entry** is what the entry holds (docs/REFERENCE.md):
the body, the routing key, exchange and queue, the text properties, ``timestamp`` (whole
seconds) and the headers as JSON. What the entry does not hold is not restored:
``delivery_mode`` (replays are published persistent), ``priority``, ``reply_to``,
``expiration`` and ``user_id``. Headers come back as JSON types: a ``base64:`` string becomes
bytes again (so does a text header that happened to start with ``base64:``), a timestamp stays
the RFC 3339 text it was written as, a decimal the float it was written as, and a byte array is
a long string. A ``too-large`` entry that kept only the head of its body is never replayed.

A message from a **dead-letter queue** comes back whole (body and every property); where it came
from is read from the ``x-message-proxy-*`` headers the worker adds when it dead-letters to an
exchange, or else from RabbitMQ's own ``x-death`` (a queue's dead-letter exchange).

Either way the relay's own headers are taken off (the hop count included: a replay is a fresh
publish, counted as one hop again; a message that still loops is dead-lettered again after
``MAX_HOPS``), and RabbitMQ's ``x-death`` history is kept.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.message import HOPS_HEADER, Message

PERSISTENT = 2
RELAY_HEADERS = frozenset(
    {
        HOPS_HEADER,
        "x-message-proxy-error",
        "x-message-proxy-detail",
        "x-message-proxy-route",
        "x-message-proxy-failed-at",
        "x-message-proxy-exchange",
        "x-message-proxy-routing-key",
        "x-message-proxy-queue",
    }
)
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter as read back: the message to publish again and its failure's facts."""

    message: Message  # exchange, routing key and queue are where it came from
    reason: str | None
    route: str | None
    failed_at_ms: int | None
    unreplayable: str | None = None  # why it must not be published again (a truncated body)


@dataclass(frozen=True, slots=True)
class Filter:
    """Which dead letters to replay: every given condition must hold."""

    reasons: frozenset[str] = frozenset()
    routes: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self.routes and letter.route not in self.routes:
            return False
        if self.since_ms is None and self.until_ms is None:
            return True
        at = letter.failed_at_ms
        if at is None:
            return False  # a time filter needs a time
        if self.since_ms is not None and at < self.since_ms:
            return False
        return self.until_ms is None or at <= self.until_ms


def parse_moment(text: str, now: float) -> int:
    """Unix milliseconds of an RFC 3339 time (``2026-01-01T00:00:00Z``) or of a time that far
    back from ``now`` (``90s``, ``30m``, ``2h``, ``7d``, ``1w``); ``ValueError`` otherwise."""
    relative = _RELATIVE.match(text)
    if relative is not None:
        return round((now - float(relative[1]) * _UNITS[relative[2]]) * 1000)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an RFC 3339 time (2026-01-01T00:00:00Z) nor a time back "
            "from now (90s, 30m, 2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} needs its offset from UTC, e.g. 2026-01-01T00:00:00Z")
    return round(moment.timestamp() * 1000)


def make_filter(
    reasons: Collection[str] = (),
    routes: Collection[str] = (),
    since: str | None = None,
    until: str | None = None,
    *,
    now: float,
) -> Filter:
    return Filter(
        frozenset(reasons),
        frozenset(routes),
        None if since is None else parse_moment(since, now),
        None if until is None else parse_moment(until, now),
    )


# --- a dead-letter stream entry ---------------------------------------------------------------


def _text(fields: Mapping[bytes, bytes], name: str) -> str | None:
    value = fields.get(name.encode())
    return None if value is None else value.decode(errors="replace")


def _restore(value: Any) -> Any:
    """A header value as the entry's JSON wrote it, with ``base64:`` strings bytes again."""
    if isinstance(value, str) and value.startswith("base64:"):
        try:
            return base64.b64decode(value[7:], validate=True)
        except (binascii.Error, ValueError):
            return value
    if isinstance(value, dict):
        return {_restore(key): _restore(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore(item) for item in value]
    return value


def _own_headers_removed(headers: Mapping[Any, Any]) -> dict[Any, Any]:
    return {name: value for name, value in headers.items() if name not in RELAY_HEADERS}


def from_stream_entry(fields: Mapping[bytes, bytes]) -> DeadLetter:
    """The dead letter an entry of a dead-letter stream holds."""
    headers: dict[Any, Any] = {}
    raw_headers = fields.get(b"headers")
    if raw_headers is not None:
        decoded = orjson.loads(raw_headers)
        if isinstance(decoded, dict):
            headers = _own_headers_removed(_restore(decoded))
    seconds = _text(fields, "timestamp")
    timestamp = (
        datetime.fromtimestamp(int(seconds), UTC) if seconds and seconds.isdigit() else None
    )
    body = fields.get(b"body", b"")
    message = Message(
        body=body,
        routing_key=_text(fields, "routing_key") or "",
        exchange=_text(fields, "exchange") or "",
        queue=_text(fields, "queue") or "",
        headers=headers,
        delivery_mode=PERSISTENT,
        timestamp=timestamp,
        content_type=_text(fields, "content_type"),
        content_encoding=_text(fields, "content_encoding"),
        message_id=_text(fields, "message_id"),
        correlation_id=_text(fields, "correlation_id"),
        type=_text(fields, "type"),
        app_id=_text(fields, "app_id"),
    )
    failed_at = _text(fields, "failed_at")
    size = _text(fields, "body_size")
    unreplayable = None
    if size is not None and size.isdigit() and int(size) != len(body):
        unreplayable = f"body truncated: {len(body)} of {size} bytes kept"
    return DeadLetter(
        message,
        _text(fields, "error"),
        _text(fields, "route"),
        int(failed_at) if failed_at and failed_at.isdigit() else None,
        unreplayable,
    )


# --- a message from a dead-letter queue -------------------------------------------------------


def _header_text(headers: Mapping[Any, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _first_death(headers: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """RabbitMQ's most recent ``x-death`` entry (the list is newest first), or nothing."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return {}


def from_queue_message(delivered: Message) -> DeadLetter:
    """The dead letter a message consumed from a dead-letter queue is."""
    headers = delivered.headers
    death = _first_death(headers)
    death_keys = death.get("routing-keys")
    death_key = death_keys[0] if isinstance(death_keys, list) and death_keys else None
    exchange = _header_text(headers, "x-message-proxy-exchange")
    routing_key = _header_text(headers, "x-message-proxy-routing-key")
    queue = _header_text(headers, "x-message-proxy-queue")
    if exchange is None:  # dead-lettered by RabbitMQ (the queue's x-dead-letter-exchange)
        exchange = _header_text(death, "exchange")
        routing_key = death_key.decode() if isinstance(death_key, bytes) else death_key
        queue = _header_text(death, "queue")
    failed_at = headers.get("x-message-proxy-failed-at")
    if not isinstance(failed_at, int) or isinstance(failed_at, bool):
        when = death.get("time")
        failed_at = round(when.timestamp() * 1000) if isinstance(when, datetime) else None
    reason = _header_text(headers, "x-message-proxy-error") or _header_text(death, "reason")
    message = Message(
        body=delivered.body,
        routing_key=routing_key if isinstance(routing_key, str) else delivered.routing_key,
        exchange=exchange if exchange is not None else delivered.exchange,
        queue=queue if queue is not None else delivered.queue,
        headers=_own_headers_removed(headers),
        content_type=delivered.content_type,
        content_encoding=delivered.content_encoding,
        delivery_mode=delivered.delivery_mode,
        priority=delivered.priority,
        correlation_id=delivered.correlation_id,
        reply_to=delivered.reply_to,
        expiration=delivered.expiration,
        message_id=delivered.message_id,
        timestamp=delivered.timestamp,
        type=delivered.type,
        user_id=delivered.user_id,
        app_id=delivered.app_id,
    )
    return DeadLetter(message, reason, _header_text(headers, "x-message-proxy-route"), failed_at)
