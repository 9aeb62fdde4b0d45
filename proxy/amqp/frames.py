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
_END_THEN_HEAD = struct.Struct(">BBHI")  # a frame's end octet, then the next frame's head
FRAME_OVERHEAD = 8  # head and end octet
HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"

_METHOD_ID = struct.Struct(">HH")
_DELIVER_TAG = struct.Struct(">QB")
_HEADER_SIZE_FLAGS = struct.Struct(">QH")
_HEADER_HEAD = struct.Struct(">HHQH")  # class, weight, body size, property flags
_PUBLISH_HEAD = struct.Struct(">HHH")  # class, method, reserved
_CONFIRM = struct.Struct(">QB")  # delivery tag, flag bits
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ACK = struct.Struct(">BHIHHQB")  # frame head, class, method, delivery tag, flag bits; then 0xCE
_FRAME_END = b"\xce"

BASIC_CLASS = 60
BASIC_DELIVER = (60, 60)
DELIVER_METHOD = b"\x01\x00\x01"  # how a method frame on channel 1 starts
_DELIVER_ID = b"\x00\x3c\x00\x3c"  # basic.deliver
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
    return _checked_properties(payload, 0, len(payload))


def read_delivery(data: bytes, start: int) -> tuple[str, int, dict[str, Any], int] | None:
    """A whole delivery at ``start`` in the bytes read from the socket: ``basic.deliver``, its
    content header and its body, the body in one frame, each frame complete and well formed.

    Returns the consumer tag, the delivery tag, the message's fields (``Message``'s names, the
    body included, ``queue`` left to the caller) and where the next frame starts. None when the
    three frames are not all in ``data`` yet, or not in this shape, or the properties cannot be
    read: the frame-by-frame path takes them then (and says why a header is unreadable). Nearly
    every delivery comes this way, read in one pass without a payload copied per frame.
    """
    if not data.startswith(_DELIVER_ID, start + 7):
        return None
    try:
        return _whole_delivery(data, start)
    except (FrameError, ValueError, IndexError, OverflowError, OSError, struct.error):
        return None


def _whole_delivery(data: bytes, start: int) -> tuple[str, int, dict[str, Any], int] | None:
    size_of_data = len(data)
    method_end = start + 7 + _U32.unpack_from(data, start + 3)[0]
    if method_end >= size_of_data or data[method_end] != FRAME_END:
        return None
    offset = start + 12  # frame head, class and method, the consumer tag's length
    size = data[offset - 1]
    consumer_tag = data[offset : offset + size].decode("utf-8", "replace")
    delivery_tag, bits = _DELIVER_TAG.unpack_from(data, offset + size)
    offset += size + 9
    size = data[offset]
    exchange = data[offset + 1 : offset + 1 + size].decode("utf-8", "replace")
    offset += 1 + size
    size = data[offset]
    routing_key = data[offset + 1 : offset + 1 + size].decode("utf-8", "replace")
    if offset + 1 + size != method_end:
        return None
    header_start = method_end + 1
    if header_start + FRAME_OVERHEAD > size_of_data:
        return None
    kind, _channel, size = FRAME_HEAD.unpack_from(data, header_start)
    header_end = header_start + 7 + size
    if kind != FRAME_HEADER or header_end >= size_of_data or data[header_end] != FRAME_END:
        return None
    body_size, values = _properties(data, header_start + 7, header_end)
    next_frame = header_end + 1
    if body_size == 0:
        body = b""
    else:
        if next_frame + FRAME_OVERHEAD > size_of_data:
            return None
        kind, _channel, size = FRAME_HEAD.unpack_from(data, next_frame)
        body_end = next_frame + 7 + size
        if kind != FRAME_BODY or size != body_size or body_end >= size_of_data:
            return None
        if data[body_end] != FRAME_END:
            return None
        body = data[next_frame + 7 : body_end]
        next_frame = body_end + 1
    values["exchange"] = exchange
    values["routing_key"] = routing_key
    values["redelivered"] = bool(bits & 1)
    values["body"] = body
    return consumer_tag, delivery_tag, values, next_frame


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


def _checked_properties(data: bytes, start: int, end: int) -> tuple[int, dict[str, Any]]:
    try:
        return _properties(data, start, end)
    except FrameError:
        raise
    except (ValueError, IndexError, OverflowError, OSError, struct.error) as exc:
        raise FrameError(str(exc) or type(exc).__name__) from exc


def _properties(data: bytes, start: int, end: int) -> tuple[int, dict[str, Any]]:  # noqa: C901
    """The content header whose payload is ``data[start:end]``: body size and properties.

    Straight-line on purpose, in wire order, short strings read inline: this runs once per
    message. A string or table that runs past ``end`` ends past it, which the last check sees.
    """
    body_size, flags = _HEADER_SIZE_FLAGS.unpack_from(data, start + 4)
    if flags & 0x0001:
        raise FrameError("content header with a second property-flags word")
    offset = start + 14
    content_type = content_encoding = headers = delivery_mode = priority = None
    correlation_id = reply_to = expiration = message_id = timestamp = None
    message_type = user_id = app_id = None
    if flags & 0x8000:
        size = data[offset]
        offset += 1 + size
        content_type = data[offset - size : offset].decode("utf-8", "replace")
    if flags & 0x4000:
        size = data[offset]
        offset += 1 + size
        content_encoding = data[offset - size : offset].decode("utf-8", "replace")
    headers_at = offset
    if flags & 0x2000:
        headers, offset = decode_table(data, offset, end)
    headers_end = offset
    if flags & 0x1000:
        delivery_mode = data[offset]
        offset += 1
    if flags & 0x0800:
        priority = data[offset]
        offset += 1
    if flags & 0x0400:
        size = data[offset]
        offset += 1 + size
        correlation_id = data[offset - size : offset].decode("utf-8", "replace")
    if flags & 0x0200:
        size = data[offset]
        offset += 1 + size
        reply_to = data[offset - size : offset].decode("utf-8", "replace")
    if flags & 0x0100:
        size = data[offset]
        offset += 1 + size
        expiration = data[offset - size : offset].decode("utf-8", "replace")
    if flags & 0x0080:
        size = data[offset]
        offset += 1 + size
        message_id = data[offset - size : offset].decode("utf-8", "replace")
    if flags & 0x0040:
        (count,) = _U64.unpack_from(data, offset)
        offset += 8
        # Seconds, as nearly every publisher sends, the short way; other units as tables read them.
        timestamp = _from_seconds(count, UTC) if count <= 0xFFFFFFFF else timestamp_of(count)
    if flags & 0x0020:
        size = data[offset]
        offset += 1 + size
        message_type = data[offset - size : offset].decode("utf-8", "replace")
    if flags & 0x0010:
        size = data[offset]
        offset += 1 + size
        user_id = data[offset - size : offset].decode("utf-8", "replace")
    if flags & 0x0008:
        size = data[offset]
        offset += 1 + size
        app_id = data[offset - size : offset].decode("utf-8", "replace")
    if flags & 0x0004:  # cluster-id: deprecated, read past and dropped
        offset += 1 + data[offset]
    if offset > end:
        raise FrameError("content header shorter than its properties")
    raw = _new_tuple(
        RawProperties,
        (
            flags,
            data[start + 14 : headers_at],
            data[headers_at:headers_end],
            data[headers_end:offset],
        ),
    )
    return body_size, {
        "content_type": content_type,
        "content_encoding": content_encoding,
        "headers": headers,
        "delivery_mode": delivery_mode,
        "priority": priority,
        "correlation_id": correlation_id,
        "reply_to": reply_to,
        "expiration": expiration,
        "message_id": message_id,
        "timestamp": timestamp,
        "type": message_type,
        "user_id": user_id,
        "app_id": app_id,
        "raw_properties": raw,
    }


_from_seconds = datetime.fromtimestamp
_new_tuple = tuple.__new__  # a NamedTuple without its Python-level __new__: once per message


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
    """The content header frame and the body frames of one publish (none for an empty body), as
    parts to join: the header and a body that fits one frame are not copied into their frames."""
    size = len(body)
    if size == 0:
        return [FRAME_HEAD.pack(FRAME_HEADER, channel, len(header)), header, _FRAME_END]
    limit = frame_max - FRAME_OVERHEAD
    if size <= limit:  # the common case: each frame's end and the next one's head in one part
        return [
            FRAME_HEAD.pack(FRAME_HEADER, channel, len(header)),
            header,
            _END_THEN_HEAD.pack(FRAME_END, FRAME_BODY, channel, size),
            body,
            _FRAME_END,
        ]
    frames = [frame(FRAME_HEADER, channel, header)]
    frames.extend(
        frame(FRAME_BODY, channel, body[start : start + limit]) for start in range(0, size, limit)
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
