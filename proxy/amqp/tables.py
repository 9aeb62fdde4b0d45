"""AMQP field tables in both directions: pure functions, no I/O.

Reading is faithful to what RabbitMQ accepts (``t b B s u I i l L f d D S x A T F V``, nested
tables and arrays): a key or long string that is not UTF-8 stays ``bytes`` instead of failing
the whole message, ``L`` is unsigned, and a timestamp in milli-, micro- or nanoseconds is still a
time. Only bytes that are not a field table at all raise ``FrameError``.

Writing has two forms. ``field_table`` encodes Python values (for a message built here).
``splice_table`` edits a table as it was delivered: it sets the entries it is given and keeps
every other byte, so that what a relay passes on is what arrived except the entries it owns.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

Table = dict[str | bytes, Any]


class FrameError(ValueError):
    """The bytes are not what AMQP 0-9-1 allows here."""


_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_DOUBLE = struct.Struct(">d")
_DECIMAL = struct.Struct(">Bi")

# --- reading ---------------------------------------------------------------------------------


def timestamp_of(raw: int) -> datetime:
    """A 64-bit count since 1970 as a time: seconds up to 2**32, then (as pamqp reads it)
    milliseconds, and where that overflows a ``datetime``, micro- or nanoseconds."""
    if raw <= 0xFFFFFFFF:
        return datetime.fromtimestamp(raw, UTC)
    try:
        return datetime.fromtimestamp(raw / 1000.0, UTC)
    except (ValueError, OverflowError, OSError):
        return datetime.fromtimestamp(raw / (1e6 if raw < 10**17 else 1e9), UTC)


def _fixed(layout: str, convert: Callable[[Any], Any] = lambda v: v) -> Any:
    unpack_from, size = struct.Struct(layout).unpack_from, struct.calcsize(layout)

    def read(data: bytes, offset: int) -> tuple[Any, int]:
        return convert(unpack_from(data, offset)[0]), offset + size

    return read


def _long_string(data: bytes, offset: int) -> tuple[str | bytes, int]:
    (size,) = _U32.unpack_from(data, offset)
    end = offset + 4 + size
    raw = data[offset + 4 : end]
    if len(raw) != size:
        raise FrameError("long string longer than its table")
    try:
        return raw.decode(), end
    except UnicodeDecodeError:
        return raw, end  # as pamqp reads it: the bytes


def _byte_array(data: bytes, offset: int) -> tuple[bytearray, int]:
    (size,) = _U32.unpack_from(data, offset)
    end = offset + 4 + size
    if end > len(data):
        raise FrameError("byte array longer than its table")
    return bytearray(data[offset + 4 : end]), end


def _decimal(data: bytes, offset: int) -> tuple[Decimal, int]:
    scale, digits = _DECIMAL.unpack_from(data, offset)
    return Decimal(digits).scaleb(-scale), offset + 5


def _array(data: bytes, offset: int) -> tuple[list[Any], int]:
    (size,) = _U32.unpack_from(data, offset)
    offset += 4
    end = offset + size
    if end > len(data):
        raise FrameError("array longer than its table")
    items: list[Any] = []
    while offset < end:
        kind = data[offset]
        value, offset = _read(kind)(data, offset + 1)
        items.append(value)
    if offset != end:
        raise FrameError("array items overrun its length")
    return items, end


def _void(_data: bytes, offset: int) -> tuple[None, int]:
    return None, offset


_READERS: dict[int, Callable[[bytes, int], tuple[Any, int]]] = {
    ord("t"): _fixed(">B", bool),
    ord("b"): _fixed(">b"),
    ord("B"): _fixed(">B"),
    ord("s"): _fixed(">h"),
    ord("u"): _fixed(">H"),
    ord("I"): _fixed(">i"),
    ord("i"): _fixed(">I"),
    ord("l"): _fixed(">q"),
    ord("L"): _fixed(">Q"),
    ord("f"): _fixed(">f"),
    ord("d"): _fixed(">d"),
    ord("D"): _decimal,
    ord("S"): _long_string,
    ord("x"): _byte_array,
    ord("A"): _array,
    ord("T"): _fixed(">Q", timestamp_of),
    # "F" (a nested table) is added below, once decode_table exists.
    ord("V"): _void,
    0: _void,  # not in the errata, but seen in the wild (pamqp reads it too)
}


def _read(kind: int) -> Callable[[bytes, int], tuple[Any, int]]:
    reader = _READERS.get(kind)
    if reader is None:
        raise FrameError(f"unknown field type {bytes([kind])!r}")
    return reader


def decode_table(data: bytes, offset: int, limit: int | None = None) -> tuple[Table, int]:
    """A field table at ``offset`` (its length first): the table, and the offset after it.
    ``limit``: where the frame holding it ends (default: the end of ``data``)."""
    try:
        (length,) = _U32.unpack_from(data, offset)
        offset += 4
        end = offset + length
        if end > (len(data) if limit is None else limit):
            raise FrameError("field table longer than its frame")
        table: Table = {}
        while offset < end:
            size = data[offset]  # the key, read inline: once per header of every message
            key_end = offset + 1 + size
            raw_key = data[offset + 1 : key_end]
            if len(raw_key) != size:
                raise FrameError("field name longer than its table")
            try:
                key: str | bytes = raw_key.decode()
            except UnicodeDecodeError:
                key = raw_key  # kept, not replaced: encoded like a non-UTF-8 value downstream
            offset = key_end
            kind = data[offset]
            if kind == 0x53:  # "S", a long string: by far the most common, read inline
                (size,) = _U32.unpack_from(data, offset + 1)
                start = offset + 5
                offset = start + size
                raw = data[start:offset]
                try:
                    table[key] = raw.decode()
                except UnicodeDecodeError:
                    table[key] = raw
                continue
            table[key], offset = _read(kind)(data, offset + 1)
        if offset != end:
            raise FrameError("field table entries overrun its length")
        return table, end
    except FrameError:
        raise
    except RecursionError:  # nested deeper than Python's stack: RabbitMQ sets no limit
        raise FrameError("field tables nested too deep to read") from None
    except (struct.error, IndexError, ValueError, OverflowError, OSError) as exc:
        raise FrameError(f"field table cannot be read: {exc}") from exc


_READERS[ord("F")] = decode_table


# --- writing from values ---------------------------------------------------------------------


def short_string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 255:
        raise ValueError(f"{raw[:40]!r}... is longer than 255 bytes")
    return _U8.pack(len(raw)) + raw


def _long(raw: bytes) -> bytes:
    return _U32.pack(len(raw)) + raw


def timestamp_count(value: datetime) -> int:
    """A time as the 64-bit count ``timestamp_of`` reads back: seconds, or past 2106 (where a
    count of seconds would read as milliseconds) milliseconds."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # naive is UTC, as pamqp reads it
    count = int(value.timestamp())
    return count if count <= 0xFFFFFFFF else int(value.timestamp() * 1000)


def integer(value: int) -> bytes:
    """The smallest signed type that holds ``value`` (as pamqp picks), ``L`` above 2**63."""
    if -128 <= value <= 127:
        return b"b" + struct.pack(">b", value)
    if -32768 <= value <= 32767:
        return b"s" + struct.pack(">h", value)
    if -(2**31) <= value < 2**31:
        return b"I" + struct.pack(">i", value)
    if -(2**63) <= value < 2**63:
        return b"l" + struct.pack(">q", value)
    if 0 <= value < 2**64:
        return b"L" + _U64.pack(value)
    raise ValueError(f"{value} does not fit in 64 bits")


def field_value(value: Any) -> bytes:
    """One field value, as RabbitMQ and this module read it back to the same Python value."""
    if isinstance(value, str):
        return b"S" + _long(value.encode())
    if isinstance(value, bool):
        return b"t" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, float):
        return b"d" + _DOUBLE.pack(value)  # a double: pamqp would narrow it to 32 bits
    if isinstance(value, bytes):
        return b"S" + _long(value)  # how a long string that is not UTF-8 is read
    if isinstance(value, bytearray):
        return b"x" + _long(bytes(value))
    if isinstance(value, Decimal):
        return b"D" + _decimal_bytes(value)
    if isinstance(value, datetime):
        return b"T" + _U64.pack(timestamp_count(value))
    if isinstance(value, Mapping):
        return b"F" + field_table(value)
    if isinstance(value, list | tuple):
        return b"A" + _long(b"".join(field_value(item) for item in value))
    if value is None:
        return b"V"
    raise TypeError(f"a header value of type {type(value).__name__} cannot be sent")


def _decimal_bytes(value: Decimal) -> bytes:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        raise ValueError(f"{value} is not a finite decimal")
    scale = max(0, -exponent)
    unscaled = int(value.scaleb(scale))
    if scale > 255 or not -(2**31) <= unscaled < 2**31:
        raise ValueError(f"{value} does not fit an AMQP decimal")
    return _DECIMAL.pack(scale, unscaled)


def field_table(table: Mapping[str, Any] | Mapping[str | bytes, Any]) -> bytes:
    """An AMQP field table with its length, keys in their given order."""
    parts: list[bytes] = []
    append = parts.append
    for key, value in table.items():
        append(short_string(key))
        if type(value) is str:  # by far the most common: inline
            raw = value.encode()
            append(b"S" + _U32.pack(len(raw)) + raw)
            continue
        try:
            append(field_value(value))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"header {key!r}: {exc}") from None
    return _long(b"".join(parts))


# --- editing a table as delivered ------------------------------------------------------------

_FIXED_SIZES = dict(zip(b"tbBsuIilLfdTD", (1, 1, 1, 2, 2, 4, 4, 8, 8, 4, 8, 8, 5), strict=True))
_SIZED = frozenset(map(ord, "SxAF"))  # a 32-bit length, then that many bytes


def value_end(data: bytes, offset: int) -> int:
    """Where the field value whose type octet is at ``offset`` ends, without reading it."""
    kind = data[offset]
    size = _FIXED_SIZES.get(kind)
    if size is not None:
        return offset + 1 + size
    if kind in _SIZED:
        return offset + 5 + int(_U32.unpack_from(data, offset + 1)[0])
    if kind in (ord("V"), 0):
        return offset + 1
    raise FrameError(f"unknown field type {bytes([kind])!r}")


def entries(table: bytes) -> list[tuple[bytes, int, int]]:
    """The raw key, start and end of every entry of ``table`` (its length first)."""
    found: list[tuple[bytes, int, int]] = []
    offset, end = 4, 4 + _U32.unpack_from(table, 0)[0]
    while offset < end:
        start = offset
        key_end = offset + 1 + table[offset]
        offset = value_end(table, key_end)
        found.append((table[start + 1 : key_end], start, offset))
    if offset != end or end != len(table):
        raise FrameError("field table entries overrun its length")
    return found


def splice_table(table: bytes, updates: Mapping[str, bytes], *, present: bool = True) -> bytes:
    """``table`` (with its length; ``b""`` for none) with each entry of ``updates`` (name ->
    encoded field value) set: in place where the name is there already (a repeat of it dropped),
    appended in ``updates``' order otherwise. Every other byte stays as it was.

    ``present=False`` says none of the names is in the table (the decoded headers tell), which
    skips walking it.
    """
    body = table[4:]
    if present and updates and body:
        wanted = {name.encode(): name for name in updates}
        kept: list[bytes] = []
        done: set[str] = set()
        for key, start, end in entries(table):
            name = wanted.get(key)
            if name is None:
                kept.append(table[start:end])
            elif name not in done:
                done.add(name)
                kept.append(table[start : start + 1 + len(key)] + updates[name])
        body = b"".join(kept)
        updates = {name: value for name, value in updates.items() if name not in done}
    if len(updates) == 1:  # the relay's hop count alone, nearly always
        ((name, value),) = updates.items()
        key = _name(name)
        return b"".join((_U32.pack(len(body) + len(key) + len(value)), body, key, value))
    added = b"".join(_name(name) + value for name, value in updates.items())
    return _long(body + added)


@functools.lru_cache(maxsize=256)
def _name(name: str) -> bytes:
    """A field name as a short string: the relay's few names, encoded once."""
    return short_string(name)
