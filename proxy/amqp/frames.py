"""AMQP 0-9-1 frames for the consuming side: pure functions, no I/O.

Deliveries are the hot path (three frames per message), so ``basic.deliver``, the content header
and the acks are read and written here by hand; every other method goes through pamqp, which is
exact and fast enough for what happens a few times per connection.

Decoding is as pamqp decodes, with two differences where pamqp raises inside a client's frame
reader (the connection drops, RabbitMQ redelivers the message to the head of the queue, and the
queue is wedged for good): timestamps in micro- or nanoseconds are read as such, and a short
string that is not UTF-8 is read with U+FFFD in place of the bad bytes.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

import pamqp.decode
from pamqp import frame as pamqp_frame
from pamqp.base import Frame
from pamqp.common import FieldTable

from proxy.message import RawProperties

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size
FRAME_OVERHEAD = 8  # head and end octet
HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"

_METHOD_ID = struct.Struct(">HH")
_DELIVER_TAG = struct.Struct(">QB")
_HEADER_SIZE_FLAGS = struct.Struct(">QH")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ACK = struct.Struct(">BHIHHQB")  # frame head, class, method, delivery tag, flag bits; then 0xCE

BASIC_DELIVER = (60, 60)


class FrameError(ValueError):
    """The bytes are not what AMQP 0-9-1 allows here."""


_pamqp_timestamp = pamqp.decode.timestamp


def lenient_timestamp(value: bytes) -> tuple[int, datetime]:
    """pamqp's timestamp decoder, also reading Unix times in microseconds and nanoseconds.

    pamqp reads seconds, or milliseconds above 2**32; anything larger (a publisher that sends µs
    or ns) raises.
    """
    try:
        return _pamqp_timestamp(value)
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:
            raise
        raw = int.from_bytes(value[:8], "big")
        return 8, datetime.fromtimestamp(raw / (1e6 if raw < 10**17 else 1e9), tz=UTC)


# Process-wide on purpose: the exchange sink's connection (aiormq) decodes returned messages too.
pamqp.decode.METHODS["timestamp"] = lenient_timestamp
pamqp.decode.TABLE_MAPPING[b"T"] = lenient_timestamp


# --- methods other than deliveries -----------------------------------------------------------


def method_frame(channel: int, method: Frame) -> bytes:
    return pamqp_frame.marshal(method, channel)


def decode_method(payload: bytes) -> Frame:
    """A method frame's payload as a pamqp object."""
    try:
        return pamqp_frame._unmarshal_method_frame(payload)
    except Exception as exc:  # pamqp raises several types for bytes it cannot read
        raise FrameError(f"undecodable method frame: {exc}") from exc


def method_id(payload: bytes) -> tuple[int, int]:
    return _METHOD_ID.unpack_from(payload)


# --- deliveries ------------------------------------------------------------------------------


def decode_deliver(payload: bytes) -> tuple[str, int, dict[str, Any]]:
    """``basic.deliver``: consumer tag, delivery tag, and the message's routing facts."""
    offset = 4
    consumer_tag, offset = _short_str(payload, offset)
    delivery_tag, bits = _DELIVER_TAG.unpack_from(payload, offset)
    exchange, offset = _short_str(payload, offset + 9)
    routing_key, offset = _short_str(payload, offset)
    return (
        consumer_tag,
        delivery_tag,
        {
            "exchange": exchange,
            "routing_key": routing_key,
            "redelivered": bool(bits & 1),
        },
    )


def body_size(payload: bytes) -> int:
    """A content header's body size, read alone."""
    try:
        return int(_U64.unpack_from(payload, 4)[0])
    except struct.error as exc:
        raise FrameError("content header too short") from exc


def decode_content_header(payload: bytes) -> tuple[int, dict[str, Any]]:
    """A content header: the body size, and every property under ``Message``'s field names."""
    try:
        return _content_header(payload)
    except FrameError:
        raise
    except (ValueError, IndexError, OverflowError, OSError, struct.error) as exc:
        raise FrameError(str(exc) or type(exc).__name__) from exc


NO_PROPERTIES: dict[str, Any] = dict.fromkeys(
    (
        "content_type",
        "content_encoding",
        "headers",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "type",
        "user_id",
        "app_id",
        "raw_properties",
    )
)


def _content_header(payload: bytes) -> tuple[int, dict[str, Any]]:
    body_size, flags = _HEADER_SIZE_FLAGS.unpack_from(payload, 4)
    if flags & 0x0001:
        raise FrameError("content header with a second property-flags word")
    offset = 14
    values: dict[str, Any] = {}
    # Straight-line on purpose, in wire order: this runs once per message.
    if flags & 0x8000:
        values["content_type"], offset = _short_str(payload, offset)
    else:
        values["content_type"] = None
    if flags & 0x4000:
        values["content_encoding"], offset = _short_str(payload, offset)
    else:
        values["content_encoding"] = None
    headers_at = offset
    if flags & 0x2000:
        values["headers"], offset = decode_table(payload, offset)
    else:
        values["headers"] = None
    headers_end = offset
    if flags & 0x1000:
        values["delivery_mode"] = payload[offset]
        offset += 1
    else:
        values["delivery_mode"] = None
    if flags & 0x0800:
        values["priority"] = payload[offset]
        offset += 1
    else:
        values["priority"] = None
    offset = _identity_properties(payload, offset, flags, values)
    if offset > len(payload):
        raise FrameError("content header shorter than its properties")
    values["raw_properties"] = RawProperties(
        flags,
        payload[14:headers_at],
        payload[headers_at:headers_end],
        payload[headers_end:offset],
    )
    return body_size, values


def _identity_properties(payload: bytes, offset: int, flags: int, values: dict[str, Any]) -> int:
    """The properties after priority, in wire order; returns the offset after them."""
    for name, bit in _SHORT_STRINGS_BEFORE_TIMESTAMP:
        if flags & bit:
            values[name], offset = _short_str(payload, offset)
        else:
            values[name] = None
    if flags & 0x0040:
        (seconds,) = _U64.unpack_from(payload, offset)
        if seconds <= 0xFFFFFFFF:  # seconds, as nearly every publisher sends: the short way
            values["timestamp"] = datetime.fromtimestamp(seconds, UTC)
        else:
            values["timestamp"] = lenient_timestamp(payload[offset : offset + 8])[1]
        offset += 8
    else:
        values["timestamp"] = None
    for name, bit in _SHORT_STRINGS_AFTER_TIMESTAMP:
        if flags & bit:
            values[name], offset = _short_str(payload, offset)
        else:
            values[name] = None
    if flags & 0x0004:  # cluster-id: deprecated, read past and dropped
        _, offset = _short_str(payload, offset)
    return offset


_SHORT_STRINGS_BEFORE_TIMESTAMP = (
    ("correlation_id", 0x0400),
    ("reply_to", 0x0200),
    ("expiration", 0x0100),
    ("message_id", 0x0080),
)
_SHORT_STRINGS_AFTER_TIMESTAMP = (("type", 0x0020), ("user_id", 0x0010), ("app_id", 0x0008))


def decode_table(data: bytes, offset: int) -> tuple[FieldTable, int]:
    """A field table at ``offset``: the table, and the offset after it."""
    (length,) = _U32.unpack_from(data, offset)
    offset += 4
    end = offset + length
    if end > len(data):
        raise FrameError("field table longer than its frame")
    table: FieldTable = {}
    while offset < end:
        key, offset = _short_str(data, offset)
        kind = data[offset]
        offset += 1
        if kind == 0x53:  # "S", a long string: by far the most common, read inline
            (size,) = _U32.unpack_from(data, offset)
            raw = data[offset + 4 : offset + 4 + size]
            offset += 4 + size
            try:
                table[key] = raw.decode()
            except UnicodeDecodeError:
                table[key] = raw  # as pamqp reads it: the bytes
            continue
        try:
            consumed, value = pamqp.decode.embedded_value(data[offset - 1 : end])
        except Exception as exc:  # pamqp raises several types for bytes it cannot read
            raise FrameError(f"header {key!r}: {exc}") from exc
        table[key] = value
        offset += consumed - 1
    if offset != end:
        raise FrameError("field table entries overrun its length")
    return table, end


def _short_str(data: bytes, offset: int) -> tuple[str, int]:
    size = data[offset]
    end = offset + 1 + size
    if end > len(data):
        raise FrameError("short string longer than its frame")
    return data[offset + 1 : end].decode("utf-8", "replace"), end


# --- settling --------------------------------------------------------------------------------


def ack_frame(channel: int, delivery_tag: int, *, multiple: bool) -> bytes:
    return _ACK.pack(FRAME_METHOD, channel, 13, 60, 80, delivery_tag, int(multiple)) + b"\xce"


def reject_frame(channel: int, delivery_tag: int, *, requeue: bool) -> bytes:
    return _ACK.pack(FRAME_METHOD, channel, 13, 60, 90, delivery_tag, int(requeue)) + b"\xce"
