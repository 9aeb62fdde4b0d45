"""An experiment, not a peer: the stream bridge with hand-packed RESP for plain XADDs.

``python -m bench.peers.packed_sink_bridge --config F`` runs ``workers.stream_bridge`` unchanged
except for ``RedisStreamSink.publish_batch``: a batch of plain entries (no dedupe, no dead
letters) is written as one pre-packed RESP buffer on one connection and its replies read back
raw, instead of going through redis-py's pipeline (which packs every argument of every XADD in
Python and runs a response callback per reply). Anything else goes to the real method. It sizes
the change proposed for ``proxy/sinks/redis_stream.py`` in docs/BENCHMARKS.md; the product does
not use it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors

from proxy.cli import role_main
from proxy.encoding import entry_fields
from proxy.errors import PermanentError, TransientError
from proxy.routing import StreamTarget
from proxy.sinks import Outcome, Publish
from proxy.sinks.redis_stream import RedisStreamSink

_original = RedisStreamSink.publish_batch
_UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError)


def _bulk(value: bytes | str) -> bytes:
    raw = value if isinstance(value, bytes) else value.encode()
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


_prefixes: dict[StreamTarget, tuple[int, bytes]] = {}


def _prefix(target: StreamTarget) -> tuple[int, bytes]:
    """(argument count, packed arguments) of ``XADD name [MAXLEN ~ n] *``, once per target."""
    found = _prefixes.get(target)
    if found is None:
        args: list[bytes | str] = ["XADD", target.name]
        if target.maxlen is not None:
            args += ["MAXLEN", "~", str(target.maxlen)]
        args.append("*")
        found = _prefixes[target] = (len(args), b"".join(_bulk(a) for a in args))
    return found


async def publish_batch(self: RedisStreamSink, items: Sequence[Publish]) -> list[Outcome]:
    plain = all(
        isinstance(i.target, StreamTarget) and not i.target.dedupe and i.dead_letter is None
        for i in items
    )
    if not plain:
        return await _original(self, items)
    chunks: list[bytes] = []
    packed: dict[int, tuple[int, bytes]] = {}
    for item in items:
        fields = packed.get(id(item.message))
        if fields is None:
            pairs = entry_fields(item.message)
            body = b"".join(_bulk(k) + _bulk(v) for k, v in pairs.items())
            fields = packed[id(item.message)] = (2 * len(pairs), body)
        count, prefix = _prefix(item.target)  # type: ignore[arg-type]
        chunks.append(b"*%d\r\n" % (count + fields[0]))
        chunks.append(prefix)
        chunks.append(fields[1])
    pool = self.client.connection_pool
    try:
        async with asyncio.timeout(self._timeout):
            connection = await pool.get_connection()
            try:
                await connection.send_packed_command(b"".join(chunks), check_health=False)
                replies: list[Any] = []
                for _ in items:
                    try:
                        replies.append(await connection.read_response(disable_decoding=True))
                    except redis_errors.ResponseError as exc:
                        replies.append(exc)
            except BaseException:
                await connection.disconnect()
                raise
            finally:
                await pool.release(connection)
    except _UNREACHABLE as exc:
        raise TransientError(f"redis: {exc or type(exc).__name__}") from exc
    outcomes: list[Outcome] = []
    for item, reply in zip(items, replies, strict=True):
        if isinstance(reply, Exception):
            outcomes.append(PermanentError("rejected", f"{item.target!r} refused: {reply}"))
        else:
            outcomes.append(None)
    return outcomes


RedisStreamSink.publish_batch = publish_batch  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(role_main("stream-bridge"))
