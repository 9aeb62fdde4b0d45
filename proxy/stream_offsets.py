"""Stream-queue sources: where a consumer starts, and the offsets that say what was written.

A RabbitMQ stream is a log: reading it removes nothing, an ack is only flow control, and a new
consumer starts wherever its ``x-stream-offset`` argument says. So the worker keeps, per stream
source, the offset of the last delivery it wrote, in Redis under ``offset_key`` (written in the
same atomic step as the batch's entries where it can), and resumes right after it on every connect;
only the first connect of a source with no recorded offset uses its ``stream_offset``.

Pure functions and values; the I/O is the consumer's (reading) and the sinks' (writing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

OFFSET_HEADER = "x-stream-offset"  # on every delivery from a stream: the message's offset
OFFSET_ARGUMENT = "x-stream-offset"  # basic.consume argument: where the consumer starts
KEY_PREFIX = "message-proxy:stream-offset"

StreamStart = str | datetime  # "first" | "last" | "next" | a time


def offset_key(vhost: str, queue: str) -> str:
    """The default key of a source's offset: readable, one per vhost and queue.

    The vhost is URL-encoded (``/`` is ``%2F``, as in the AMQP URL), so it holds no ``:`` and
    the key cannot be read two ways whatever the queue is called.
    """
    return f"{KEY_PREFIX}:{quote(vhost, safe='')}:{queue}"


def consume_arguments(start: StreamStart, recorded: int | None) -> dict[str, Any]:
    """``basic.consume`` arguments: right after the recorded offset, else ``start``."""
    return {OFFSET_ARGUMENT: start if recorded is None else recorded + 1}


def describe_start(start: StreamStart, recorded: int | None) -> str:
    if recorded is not None:
        return f"resuming at offset {recorded + 1}"
    if isinstance(start, datetime):
        return f"no recorded offset: starting at {start.isoformat()}"
    return f"no recorded offset: starting at {start!r}"


def parse_recorded(key: str, value: bytes | str | None) -> int | None:
    """A recorded offset as stored (a decimal integer); ValueError naming the key otherwise."""
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    try:
        offset = int(text)
    except ValueError:
        offset = -2
    if offset < -1:
        raise ValueError(
            f"{key} holds {text[:40]!r}, not a stream offset: DEL it (start at the source's "
            "stream_offset) or SET it to the last offset written"
        )
    return offset


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where one delivery sits in its stream: its source's offset key and its offset.

    ``offset`` is None in the rare delivery whose headers could not be read and that had no
    delivery before it on the same consumer to count from; it is then written unconditionally.
    """

    key: str
    offset: int | None


class PositionCounter:
    """The positions of one consumer's deliveries, in order.

    RabbitMQ puts the offset in every delivery's ``x-stream-offset`` header, and a consumer's
    offsets follow one another (one per message). A delivery whose headers could not be read
    takes the one after its predecessor's.
    """

    __slots__ = ("_key", "_last", "_on_gap")

    def __init__(
        self,
        key: str,
        recorded: int | None,
        on_gap: Callable[[int, int], None] | None = None,
    ) -> None:
        self._key = key
        self._last = recorded  # what the consumer was started after, when known
        self._on_gap = on_gap  # called with the first and last offset missing

    def next(self, headers: Mapping[str, Any] | None) -> StreamPosition:
        value = headers.get(OFFSET_HEADER) if headers else None
        last = self._last
        if isinstance(value, int) and not isinstance(value, bool):
            if last is not None and value > last + 1 and self._on_gap is not None:
                self._on_gap(last + 1, value - 1)  # retention removed them before they were read
            self._last = value
        elif last is not None:
            self._last = last + 1
        return StreamPosition(self._key, self._last)


class WrittenOffsets:
    """The offsets this worker recorded, per offset key: a delivery at or below one is a replay
    (a reconnect resumes at the offset read from the store, which a batch still in flight may
    pass), already written, so not written again."""

    def __init__(self) -> None:
        self._recorded: dict[str, int] = {}

    def replayed(self, position: StreamPosition, seen: set[StreamPosition]) -> bool:
        """At or below what was recorded, or already ``seen`` in this batch (which it joins)."""
        if position.offset is None:
            return False
        if position.offset <= self._recorded.get(position.key, -1) or position in seen:
            return True
        seen.add(position)
        return False

    def beyond(self, positions: Iterable[StreamPosition | None]) -> dict[str, int]:
        """Per key, the last of ``positions`` where it is beyond what was recorded."""
        recorded = self._recorded
        return {
            key: offset
            for key, offset in last_offsets(positions).items()
            if offset > recorded.get(key, -1)
        }

    def recorded(self, offsets: Mapping[str, int]) -> None:
        for key, offset in offsets.items():
            self._recorded[key] = max(offset, self._recorded.get(key, -1))


def last_offsets(positions: Iterable[StreamPosition | None]) -> dict[str, int]:
    """Per offset key, the highest known offset among ``positions``."""
    last: dict[str, int] = {}
    for position in positions:
        if position is None or position.offset is None:
            continue
        if position.offset > last.get(position.key, -1):
            last[position.key] = position.offset
    return last
