"""AMQP 0-9-1 frames in both directions: pure functions, no I/O.

Deliveries and publishes are the hot path (three frames per message each way), so
``basic.deliver``, content headers, ``basic.publish``, acks and publisher confirms are read and
written here by hand; every other method goes through pamqp, which is exact and fast enough for
what happens a few times per connection. Field tables are ``tables``'.

Reading is lenient where pamqp would raise inside a client's frame reader (the connection drops,
RabbitMQ redelivers the message to the head of the queue, and the queue is wedged for good):
timestamps in micro- or nanoseconds are read as such, and a short string that is not UTF-8 is
read with U+FFFD in place of the bad bytes (the relay passes the original bytes on).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.base import Frame

from proxy.amqp.tables import (
    FrameError,
    decode_table,
    field_table,
    short_string,
    splice_table,
    timestamp_count,
    timestamp_of,
)
from proxy.message import RawProperties

__all__ = ["FrameError"]

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size
FRAME_OVERHEAD = 8  # head and end octet
HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"

_METHOD_ID = struct.Struct(">HH")
_DELIVER_TAG = struct.Struct(">QB")
_HEADER_SIZE_FLAGS = struct.Struct(">QH")
_HEADER_HEAD = struct.Struct(">HHQH")  # class, weight, body size, property flags
_PUBLISH_HEAD = struct.Struct(">HHH")  # class, method, reserved
_CONFIRM = struct.Struct(">QB")  # delivery tag, flag bits
_U8 = struct.Struct(">B")
_U64 = struct.Struct(">Q")
_ACK = struct.Struct(">BHIHHQB")  # frame head, class, method, delivery tag, flag bits; then 0xCE
_FRAME_END = b"\xce"

BASIC_CLASS = 60
BASIC_DELIVER = (60, 60)
BASIC_ACK = (60, 80)
BASIC_NACK = (60, 120)
_BASIC_PUBLISH = 40
_MANDATORY = b"\x01"
HEADERS_FLAG = 0x2000


def lenient_timestamp(value: bytes) -> tuple[int, datetime]:
    """A timestamp's 8 bytes as a time, in whatever unit the publisher counted (see
    ``tables.timestamp_of``); pamqp reads seconds and milliseconds only, and raises beyond."""
    if len(value) < 8:
        raise FrameError("timestamp shorter than 8 bytes")
    return 8, timestamp_of(_U64.unpack_from(value)[0])


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
        (count,) = _U64.unpack_from(payload, offset)
        if count <= 0xFFFFFFFF:  # seconds, as nearly every publisher sends: the short way
            values["timestamp"] = datetime.fromtimestamp(count, UTC)
        else:
            values["timestamp"] = timestamp_of(count)
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


def _short_str(data: bytes, offset: int) -> tuple[str, int]:
    size = data[offset]
    end = offset + 1 + size
    if end > len(data):
        raise FrameError("short string longer than its frame")
    return data[offset + 1 : end].decode("utf-8", "replace"), end


# --- settling and confirms ------------------------------------------------------------------


def ack_frame(channel: int, delivery_tag: int, *, multiple: bool) -> bytes:
    return _ACK.pack(FRAME_METHOD, channel, 13, 60, 80, delivery_tag, int(multiple)) + b"\xce"


def reject_frame(channel: int, delivery_tag: int, *, requeue: bool) -> bytes:
    return _ACK.pack(FRAME_METHOD, channel, 13, 60, 90, delivery_tag, int(requeue)) + b"\xce"


def decode_confirm(payload: bytes) -> tuple[int, bool]:
    """A publisher confirm (``basic.ack`` or ``basic.nack`` from the broker): the delivery tag
    and whether it covers every earlier tag too (``multiple``)."""
    tag, bits = _CONFIRM.unpack_from(payload, 4)
    return tag, bool(bits & 1)


# --- publishing ------------------------------------------------------------------------------


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return FRAME_HEAD.pack(kind, channel, len(payload)) + payload + _FRAME_END


def publish_method(exchange: str, routing_key: str) -> bytes:
    """The payload of a mandatory ``basic.publish`` method frame."""
    return (
        _PUBLISH_HEAD.pack(BASIC_CLASS, _BASIC_PUBLISH, 0)
        + short_string(exchange)
        + short_string(routing_key)
        + _MANDATORY
    )


def content_frames(channel: int, header: bytes, body: bytes, frame_max: int) -> list[bytes]:
    """The content header frame and the body frames of one publish (none for an empty body)."""
    frames = [frame(FRAME_HEADER, channel, header)]
    size = frame_max - FRAME_OVERHEAD
    if len(body) <= size:
        if body:
            frames.append(frame(FRAME_BODY, channel, body))
        return frames
    frames.extend(
        frame(FRAME_BODY, channel, body[start : start + size])
        for start in range(0, len(body), size)
    )
    return frames


def _identity_encoded(p: spec.Basic.Properties, append: Any) -> int:
    """The properties after priority, in wire order; returns their flags."""
    flags = 0
    if p.correlation_id is not None:
        flags |= 0x0400
        append(short_string(p.correlation_id))
    if p.reply_to is not None:
        flags |= 0x0200
        append(short_string(p.reply_to))
    if p.expiration is not None:
        flags |= 0x0100
        append(short_string(p.expiration))
    if p.message_id is not None:
        flags |= 0x0080
        append(short_string(p.message_id))
    if p.timestamp is not None:
        flags |= 0x0040
        append(_U64.pack(timestamp_count(p.timestamp)))
    if p.message_type is not None:
        flags |= 0x0020
        append(short_string(p.message_type))
    if p.user_id is not None:
        flags |= 0x0010
        append(short_string(p.user_id))
    if p.app_id is not None:
        flags |= 0x0008
        append(short_string(p.app_id))
    return flags


def content_header(properties: spec.Basic.Properties, body_size: int) -> bytes:
    """The payload of a content header frame (class, weight, body size, flags, properties)."""
    p = properties
    flags = 0
    parts: list[bytes] = []
    append = parts.append
    # Straight-line on purpose: this runs once per message. Flag order is the wire order.
    if p.content_type is not None:
        flags |= 0x8000
        append(short_string(p.content_type))
    if p.content_encoding is not None:
        flags |= 0x4000
        append(short_string(p.content_encoding))
    if p.headers is not None:
        flags |= HEADERS_FLAG
        append(field_table(p.headers))
    if p.delivery_mode is not None:
        flags |= 0x1000
        append(_U8.pack(p.delivery_mode))
    if p.priority is not None:
        flags |= 0x0800
        append(_U8.pack(p.priority))
    flags |= _identity_encoded(p, append)
    return _HEADER_HEAD.pack(BASIC_CLASS, 0, body_size, flags) + b"".join(parts)


def passed_on_header(
    raw: RawProperties, body_size: int, headers: Mapping[str, bytes], *, present: bool
) -> bytes:
    """The content header of a message passed on: its properties as delivered, byte for byte,
    except the header entries in ``headers`` (name -> encoded value), set as ``splice_table``
    sets them. ``present``: whether any of those names is among the delivered headers."""
    table = splice_table(raw.headers, headers, present=present)
    head = _HEADER_HEAD.pack(BASIC_CLASS, 0, body_size, raw.flags | HEADERS_FLAG)
    return b"".join((head, raw.before_headers, table, raw.after_headers))


def returned_header(raw: RawProperties, body_size: int) -> bytes:
    """The content header payload a message with these delivered properties was published with
    (to tell which publish a ``basic.return`` gave back)."""
    head = _HEADER_HEAD.pack(BASIC_CLASS, 0, body_size, raw.flags)
    return b"".join((head, raw.before_headers, raw.headers, raw.after_headers))
