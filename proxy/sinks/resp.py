"""Redis's wire format (RESP) for the sinks: commands packed by hand, replies read in bulk.

Packing was the largest cost of a stream entry, so the hot command, a plain ``XADD``, is packed
from parts: the head of a target's XADD (``XADD``, the stream, ``MAXLEN ~ n``, ``*``) once per
batch, the entry's fields in one ``%``-format per message (``encoding.entry_resp``: the field
names are in the format), the body as it is. The parts of every command are joined once, for
the whole batch. Other commands (scripts, ``WAIT``, ``PING``) are lists of arguments, packed one
argument at a time.

Replies are read off a redis-py connection's socket: one deadline for the whole batch (the
caller's), and with hiredis (the ``redis[hiredis]`` extra) one ``Reader.gets()`` per reply
instead of redis-py's ``read_response``, which enters a timeout and several calls per reply.
Error replies come back as exceptions in the list, not raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from redis import exceptions as redis_errors
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.asyncio.connection import AbstractConnection

from proxy.encoding import Fields

try:  # the reader redis-py's parser uses when hiredis is installed (the redis extra installs it)
    import hiredis
except ImportError:  # pragma: no cover - tested by giving a connection redis-py's own parser
    hiredis = None  # type: ignore[assignment]

_ARRAY_PREFIXES = [b"*%d\r\n" % count for count in range(128)]


# A command: its arguments, or its RESP already, in parts to be joined with the rest of its batch.
Packed = tuple[bytes, ...]
Command = list[Any] | Packed


def bulk(value: bytes | str | int) -> bytes:
    """One argument as a RESP bulk string."""
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        raw = value.encode()
    else:
        raw = str(value).encode()  # integers: window, maxlen, counts
    return b"$%d\r\n%b\r\n" % (len(raw), raw)


def _array_prefix(count: int) -> bytes:
    return _ARRAY_PREFIXES[count] if count < len(_ARRAY_PREFIXES) else b"*%d\r\n" % count


def pack_commands(commands: Sequence[Command]) -> bytes:
    """Commands in the RESP wire format, ready to write in one go."""
    parts: list[bytes] = []
    append, extend = parts.append, parts.extend
    for command in commands:
        if type(command) is tuple:
            extend(command)
        else:
            append(_array_prefix(len(command)))
            extend(map(bulk, command))
    return b"".join(parts)


class XaddHead(NamedTuple):
    """The start of every XADD to one stream: its arguments before the fields, packed."""

    arguments: int  # how many: XADD, the key, [MAXLEN ~ n], *
    packed: bytes

    @classmethod
    def of(cls, stream: str, maxlen: int | None) -> XaddHead:
        arguments: list[str | int] = ["XADD", stream]
        if maxlen is not None:
            arguments += ("MAXLEN", "~", maxlen)
        arguments.append("*")
        return cls(len(arguments), b"".join(map(bulk, arguments)))


# An entry's fields in RESP, in the form ``encoding.entry_resp`` gives: the field count, the
# bytes before the body's value, the body, the bytes after it.
PackedEntry = tuple[int, bytes, bytes, bytes]


def packed_xadd(head: XaddHead, entry: PackedEntry) -> Packed:
    """``XADD`` of one entry: ``head``, then the entry's fields, the body uncopied."""
    count, before, body, after = entry
    return (_array_prefix(head.arguments + 2 * count), head.packed, before, body, after)


def packed_fields(fields: Fields) -> PackedEntry:
    """Any entry's fields as a ``PackedEntry`` (all of them before the body's place)."""
    packed = b"".join([bulk(part) for pair in fields.items() for part in pair])
    return len(fields), packed, b"", b""


async def read_replies(connection: AbstractConnection, count: int) -> list[Any]:
    """The next ``count`` replies on ``connection``, undecoded; error replies as exceptions.

    No deadline of its own: the caller bounds the whole batch. A connection whose replies were
    not all read must not be reused (its next reader would get ours): the caller disconnects it
    on any exception.
    """
    parser: Any = connection._parser
    reader = getattr(parser, "_reader", None)
    if hiredis is None or not isinstance(reader, hiredis.Reader):
        return await _read_one_by_one(connection, count)
    replies: list[Any] = []
    append, gets = replies.append, reader.gets
    while len(replies) < count:
        reply = gets(False)
        if reply is NOT_ENOUGH_DATA:
            await parser.read_from_socket()  # raises ConnectionError when the server closed
            continue
        if isinstance(reply, redis_errors.ConnectionError):
            raise reply
        append(reply)
    return replies


async def _read_one_by_one(connection: AbstractConnection, count: int) -> list[Any]:
    """Without hiredis: redis-py's own parser, one reply at a time."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await connection.read_response(disable_decoding=True))
        except redis_errors.ResponseError as exc:
            replies.append(exc)
    return replies
