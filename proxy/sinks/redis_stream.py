"""Redis Streams: one pipelined round trip per batch; the entry fields are ``proxy.encoding``'s.

Plain destinations get one XADD per entry. A ``dedupe = true`` destination writes a message with a
``message_id`` at most once per stream within ``[dedupe] window``, the check and the XADD being one
atomic step on the server:

- Redis >= 8.6 has idempotent XADD (``XADD key IDMP producer-id idempotent-id ...``): used when the
  server offers it, see ``_NativeDedupe``. Detected from INFO once per connection (again after any
  connection failure: a reconnect may reach another server).
- Older servers get one Lua script call per stream per batch (``_DEDUPE_SCRIPT``), loaded once with
  SCRIPT LOAD and called with EVALSHA. A NOSCRIPT reply (script cache flushed, server restarted or
  failed over) loads it again and re-runs only the calls that did not run.

Messages without a ``message_id`` are written at-least-once, in order with the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.crc import key_slot

from proxy.config import RedisSettings
from proxy.encoding import DeadLetterInfo, Fields, dead_letter_fields, entry_fields, entry_resp
from proxy.errors import PermanentError, TransientError
from proxy.message import EMPTY_HEADERS, Message
from proxy.routing import StreamTarget
from proxy.sinks import Accepted, Outcome, Publish
from proxy.sinks.redis_offsets import ALREADY_WRITTEN, parse_offsets, record_call, recording_call
from proxy.sinks.redis_offsets import Entry as RecordingEntry
from proxy.sinks.resp import (
    Command,
    PackedEntry,
    XaddHead,
    pack_commands,
    packed_fields,
    packed_xadd,
    read_replies,
)

log = logging.getLogger(__name__)

# Replies that mean "the server is busy or failing over", not "this entry is wrong".
_TRANSIENT_REPLIES = (
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.BusyLoadingError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
)
_TRANSIENT_PREFIXES = ("OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS")
_UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError)

# A too-large message is dead-lettered with only the head of its body (enough to recognise it) and
# its size in ``body_size``: copying the whole body into Redis would store what the limit refuses.
TOO_LARGE_BODY_KEPT = 1024

# The Lua path keeps one key per (stream, message id): ``{stream}:dedupe:{id}`` (``dedupe_key``:
# a stream with its own hash tag keeps it, ``orders{eu}:dedupe:{id}``), set with NX and a
# PX expiry of the window. Why keys rather than one sorted set per stream: memory is about the same
# (~100 bytes per id either way, per-entry overhead dominates; budget rate x window), but Redis
# expires keys itself, incrementally and exactly at the window's end. A sorted set would need
# trimming code in the script, leave a large key behind when a dynamic stream goes quiet and stall
# the server when that key is finally freed. The hash tag keeps a stream and its keys in one
# cluster slot, so the per-stream script stays valid on a cluster. The value is "1": Redis
# shares that object, so a key costs no more than its name and its expiry.
#
# KEYS: the stream, then one dedupe key per entry that has an id, in entry order.
# ARGV: window in ms, maxlen ('' for none), then per entry: has-id ('1'/'0'), n, then n field and
# value strings. Returns per entry: the new entry id, 0 for a duplicate, or an error text.
_DEDUPE_SCRIPT = """
local stream, window, maxlen = KEYS[1], ARGV[1], ARGV[2]
local results, next_key, i = {}, 2, 3
while i <= #ARGV do
  local has_id, n = ARGV[i] == '1', tonumber(ARGV[i + 1])
  local args = {'XADD', stream}
  if maxlen ~= '' then
    args[3], args[4], args[5] = 'MAXLEN', '~', maxlen
  end
  args[#args + 1] = '*'
  for j = i + 2, i + 1 + n do
    args[#args + 1] = ARGV[j]
  end
  i = i + 2 + n
  local key = nil
  if has_id then
    key, next_key = KEYS[next_key], next_key + 1
  end
  local fresh = true
  if key then
    fresh = redis.pcall('SET', key, '1', 'NX', 'PX', window)
  end
  if type(fresh) == 'table' and fresh.err then
    results[#results + 1] = fresh.err
  elseif not fresh then
    results[#results + 1] = 0
  else
    local reply = redis.pcall(unpack(args))
    if type(reply) == 'table' and reply.err then
      if key then
        redis.call('DEL', key)
      end
      results[#results + 1] = reply.err
    else
      results[#results + 1] = reply
    end
  end
end
return results
"""


def dedupe_key(stream: str, message_id: str) -> str:
    """The key that remembers ``message_id`` for ``stream``, in the stream's cluster slot."""
    return f"{_slot_prefix(stream)}:dedupe:{message_id}"


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes when it has one: between the first ``{`` and the
    first ``}`` after it, when not empty."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


@functools.lru_cache(maxsize=4096)
def _slot_prefix(stream: str) -> str:
    """A key prefix that hashes to the stream's slot.

    A stream with its own hash tag (``orders{eu}``) starts the key: the first ``{`` is the stream's.
    Any other name is wrapped whole as the tag (``{orders}``), unless it holds a ``}``, which would
    end that tag early; such a name gets the shortest tag of digits that lands in the same slot.
    """
    if hash_tag(stream) is not None:
        return stream
    if "}" not in stream:
        return f"{{{stream}}}"
    slot = key_slot(stream.encode())
    candidate = 0
    while key_slot(str(candidate).encode()) != slot:
        candidate += 1
    return f"{{{candidate}}}{stream}"


def wait_command(settings: RedisSettings) -> list[Any] | None:
    """``WAIT N timeout`` to end each pipeline with, or None when no replica is asked for."""
    replicas = settings.replicas_required()
    if not replicas:
        return None
    return ["WAIT", replicas, max(1, round(settings.replica_timeout * 1000))]


def check_replicas(reply: Any, wait: list[Any]) -> None:
    """WAIT's reply: how many replicas have every write before it. Fewer than asked is transient."""
    if isinstance(reply, Exception):
        raise TransientError(f"redis: WAIT failed: {reply}")
    if int(reply) < wait[1]:
        raise TransientError(
            f"redis: {int(reply)} of {wait[1]} replicas acknowledged within {wait[2]} ms"
        )


def dedupe_id(message: Message) -> str | None:
    """The id to de-duplicate by; an empty ``message_id`` is no id."""
    return message.message_id or None


def _refused(target: StreamTarget, text: str) -> Outcome:
    if text.startswith(_TRANSIENT_PREFIXES):
        raise TransientError(f"redis: {text}")
    return PermanentError("rejected", f"stream {target.name!r} refused the entry: {text}")


def _reply_outcome(reply: Any, target: StreamTarget) -> Outcome:
    if not isinstance(reply, Exception):
        return None
    if isinstance(reply, _TRANSIENT_REPLIES):
        raise TransientError(f"redis: {reply}")
    return _refused(target, str(reply))


def _xadd_args(target: StreamTarget) -> list[Any]:
    if target.maxlen is None:
        return ["XADD", target.name]
    return ["XADD", target.name, "MAXLEN", "~", target.maxlen]


def _flat(fields: Fields) -> list[bytes | str]:
    return [part for pair in fields.items() for part in pair]


def _too_large_entry(message: Message, info: DeadLetterInfo) -> Fields:
    head = dataclasses.replace(message, body=message.body[:TOO_LARGE_BODY_KEPT])
    fields = dead_letter_fields(head, info)
    fields["body_size"] = str(len(message.body))
    return fields


def _encode(item: Publish) -> Fields:
    info = item.dead_letter
    if info is None:
        return entry_fields(item.message)
    if info.reason == "too-large":
        return _too_large_entry(item.message, info)
    try:
        return dead_letter_fields(item.message, info)
    except Exception:  # headers that cannot be encoded must not keep the dead letter out
        return dead_letter_fields(dataclasses.replace(item.message, headers=EMPTY_HEADERS), info)


def _written(has_id: bool) -> Outcome:
    return None if has_id else Accepted.NO_MESSAGE_ID


def _script_outcome(result: Any, target: StreamTarget, has_id: bool) -> Outcome:
    if result == 0:
        return Accepted.DUPLICATE
    text = result.decode(errors="replace") if isinstance(result, bytes) else str(result)
    if text[:1].isdigit():
        return _written(has_id)
    return _refused(target, text)


# An entry to write to a de-duplicated stream: (item index, message id or None, fields).
Entry = tuple[int, str | None, Fields]


@dataclass(slots=True)
class _Call:
    """One command of a batch's pipeline, the items it writes and how to read its reply."""

    args: list[Any]
    indexes: list[int]
    outcomes: Callable[[Any], list[Outcome]]


def _script_call(target: StreamTarget, entries: list[Entry], window_ms: int) -> _Call:
    keys: list[str] = [target.name]
    args: list[Any] = [window_ms, "" if target.maxlen is None else target.maxlen]
    for _index, message_id, fields in entries:
        flat = _flat(fields)
        if message_id is not None:
            keys.append(dedupe_key(target.name, message_id))
        args += ("0" if message_id is None else "1", len(flat), *flat)

    def outcomes(reply: Any) -> list[Outcome]:
        if isinstance(reply, Exception):
            return [_reply_outcome(reply, target)] * len(entries)
        return [
            _script_outcome(result, target, message_id is not None)
            for result, (_i, message_id, _f) in zip(reply, entries, strict=True)
        ]

    # args[1], the script's sha, is filled in when the pipeline runs: it may need loading first.
    return _Call(
        ["EVALSHA", _DEDUPE_SCRIPT, len(keys), *keys, *args], [i for i, _, _ in entries], outcomes
    )


class RedisStreamSink:
    """One Redis server (``mode = "standalone"``) or the master behind Sentinel (``"sentinel"``).

    With ``min_replicas`` N > 0 each pipeline ends with ``WAIT N timeout`` on the connection that
    wrote it: the batch counts as accepted only when N replicas have every write before it; fewer
    raises ``TransientError`` (the batch is held and written again; with dedupe, nothing twice).
    The idempotent-XADD path is then not used: its transaction goes through redis-py's pipeline,
    which does not say which connection it wrote on.
    """

    def __init__(self, settings: RedisSettings, *, dedupe_window: float = 86400.0) -> None:
        from proxy.sinks.redis_clients import sentinel_client, standalone_client

        self._timeout = settings.timeout
        self._window_ms = max(1, round(dedupe_window * 1000))
        self._wait = wait_command(settings)
        if self._wait:  # the whole pipeline, WAIT included, within one time budget
            self._timeout += settings.replica_timeout
        # Our own retry loop decides when to try again; the client must fail fast instead.
        if settings.mode == "sentinel":
            self._client = sentinel_client(settings)
        else:
            self._client = standalone_client(settings)
        # What we learnt from the server on this connection; forgotten when it fails.
        self._script_shas: dict[str, str] = {}  # script text -> its sha, once loaded
        self._server: _Server | None = None

    @property
    def broker(self) -> str:
        return "redis"

    @property
    def node(self) -> str:
        return ""  # not reported for Redis

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def connect(self) -> None:
        await self.ping()

    async def ping(self) -> None:
        await self._guarded(self._client.ping())

    async def aclose(self) -> None:
        await self._client.aclose()
        sentinels = getattr(self._client.connection_pool, "sentinel_manager", None)
        for sentinel in sentinels.sentinels if sentinels is not None else ():
            await sentinel.aclose()  # the master's client does not own the sentinels' clients

    async def publish_batch(self, items: Sequence[Publish]) -> list[Outcome]:
        outcomes, plain, deduped = plan_batch(items)
        calls: list[_Call] = []
        native = None
        if deduped:
            native = None if self._wait else (await self._detect()).native
            if native is None:
                calls = [_script_call(t, e, self._window_ms) for t, e in deduped.items()]
            else:
                calls = native.calls(deduped)
        transaction = native is not None
        commands = xadd_arguments(plain) if transaction else packed_xadds(plain)
        commands += [call.args for call in calls]
        replies = await self._execute(commands, transaction=transaction)
        for (index, target, _, _), reply in zip(plain, replies, strict=False):
            if isinstance(reply, Exception):
                outcomes[index] = _reply_outcome(reply, target)
        for call, reply in zip(calls, replies[len(plain) :], strict=True):
            for index, outcome in zip(call.indexes, call.outcomes(reply), strict=True):
                outcomes[index] = outcome
        return outcomes

    # --- stream-queue offsets (OffsetStore) ---

    async def read_offsets(self, keys: Sequence[str]) -> dict[str, int]:
        values = await self._guarded(self._client.mget(list(keys)))
        try:
            return parse_offsets(keys, values)
        except ValueError as exc:
            raise TransientError(f"redis: {exc}") from None

    async def record_offsets(self, offsets: Mapping[str, int]) -> None:
        (reply,) = await self._execute([record_call(offsets)], transaction=False)
        if isinstance(reply, Exception):
            raise TransientError(f"redis: recording stream offsets: {reply}")

    async def publish_recording(
        self, items: Sequence[Publish], offsets: Mapping[str, int]
    ) -> tuple[list[Outcome], bool]:
        outcomes, entries, written = recording_entries(items)
        # An item refused before the write still needs its dead letter: record nothing yet.
        record = len(entries) == len(items)
        call = recording_call(entries, offsets, self._window_ms, record=record)
        (reply,) = await self._execute([call], transaction=False)
        if isinstance(reply, Exception):  # the script did not run: an offset key holds junk, OOM
            raise TransientError(f"redis: {reply}")
        *results, done = reply
        for (index, deduped), (target, _, dedupe, _), result in zip(
            written, entries, results, strict=True
        ):
            outcomes[index] = _recording_outcome(result, target, deduped, dedupe is not None)
        return outcomes, record and done == 1

    async def _execute(self, commands: list[Command], *, transaction: bool) -> list[Any]:
        # An EVALSHA command carries its script's text until here, then the script's sha.
        calls = {
            position: command
            for position, command in enumerate(commands)
            if type(command) is list and command[0] == "EVALSHA"
        }
        scripts = {position: command[1] for position, command in calls.items()}
        for position, script in scripts.items():
            calls[position][1] = await self._sha(script)
        replies = await self._pipeline(commands, transaction=transaction)
        missing = [
            position
            for position, reply in enumerate(replies)
            if isinstance(reply, redis_errors.NoScriptError)
        ]
        if missing:  # those calls did not run at all: load the script and run just them again
            self._script_shas.clear()
            for position in missing:
                calls[position][1] = await self._sha(scripts[position])
            again = await self._pipeline([commands[p] for p in missing], transaction=False)
            for position, reply in zip(missing, again, strict=True):
                replies[position] = reply
        return replies

    async def _sha(self, script: str) -> str:
        sha = self._script_shas.get(script)
        if sha is None:
            sha = self._script_shas[script] = await self._guarded(self._client.script_load(script))
        return sha

    async def _pipeline(self, commands: list[Command], *, transaction: bool) -> list[Any]:
        if transaction:
            pipe = self._client.pipeline(transaction=True)
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Any] = await self._guarded(pipe.execute(raise_on_error=False))
            return replies
        if self._wait:
            commands = [*commands, self._wait]
        replies = await self._guarded(self._send_packed(pack_commands(commands), len(commands)))
        if self._wait:
            check_replicas(replies.pop(), self._wait)
        return list(replies)

    async def _send_packed(self, packed: bytes, count: int) -> list[Any]:
        """One write of every command, then their replies, raw, on one pooled connection.

        redis-py's pipeline packs each argument in Python and runs a reply callback per command:
        about 13 us per XADD, the largest single cost of a delivery. Replies stay undecoded (an
        entry id is only checked for being one); error replies come back as exceptions. The
        caller's deadline (``_guarded``) bounds the write and every reply together.
        """
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(packed, check_health=False)
            replies = await read_replies(connection, count)
        except BaseException:
            # A half-read connection must not go back to the pool: its next reader would get
            # our replies.
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        return replies

    async def _detect(self) -> _Server:
        if self._server is None:
            info = await self._guarded(self._client.info("server"))
            version = str(info.get("redis_version", ""))
            native = _NativeDedupe(self._window_ms) if _has_idmp(version) else None
            self._server = _Server(version, native)
            how = "idempotent XADD (IDMP)" if native else "a Lua script"
            log.info("redis: server %s; dedupe by %s", version or "of unknown version", how)
        return self._server

    async def _guarded(self, awaitable: Any) -> Any:
        """Await a Redis call within the timeout; unreachable becomes ``TransientError``."""
        try:
            async with asyncio.timeout(self._timeout):
                return await awaitable
        except _UNREACHABLE as exc:
            self._forget_server()
            raise TransientError(f"redis: {exc or type(exc).__name__}") from exc
        except redis_errors.RedisError as exc:
            self._forget_server()
            raise TransientError(f"redis: {exc}") from exc

    def _forget_server(self) -> None:
        # The next connection may reach another server (restart, failover, upgrade).
        self._script_shas.clear()
        self._server = None


# Plain entries, one XADD each (the hot path): item index, target, item, its fields packed.
Plain = list[tuple[int, StreamTarget, Publish, PackedEntry]]


def packed_xadds(plain: Plain) -> list[Command]:
    """The XADD of every plain entry, packed (each target's head once)."""
    heads: dict[int, XaddHead] = {}  # by target, for this call (its targets outlive it)
    commands: list[Command] = []
    append = commands.append
    for _index, target, _item, entry in plain:
        head = heads.get(id(target))
        if head is None:
            head = heads[id(target)] = XaddHead.of(target.name, target.maxlen)
        append(packed_xadd(head, entry))
    return commands


def xadd_arguments(plain: Plain) -> list[Command]:
    """The XADD of every plain entry as arguments (for redis-py's own pipeline)."""
    return [[*_xadd_args(t), "*", *_flat(_encode(item))] for _i, t, item, _e in plain]


def plan_batch(
    items: Sequence[Publish],
) -> tuple[list[Outcome], Plain, dict[StreamTarget, list[Entry]]]:
    """Each item encoded once per message (or dead letter): refused ones get their outcome now, the
    rest become a plain XADD or an entry of their stream's de-duplicated write."""
    outcomes: list[Outcome] = [None] * len(items)
    encoded: dict[int, Fields | PermanentError] = {}
    packed: dict[int, PackedEntry | PermanentError] = {}
    plain: Plain = []
    deduped: dict[StreamTarget, list[Entry]] = {}
    for index, item in enumerate(items):
        target = item.target
        if type(target) is not StreamTarget:
            raise TypeError(f"a Redis sink cannot publish to {target!r}")
        key = id(item.message) if item.dead_letter is None else id(item)
        if target.dedupe and item.dead_letter is None:
            fields = encoded.get(key)
            if fields is None:
                fields = encoded[key] = _encode_or_refuse(item)
            if isinstance(fields, PermanentError):
                outcomes[index] = fields
            else:
                deduped.setdefault(target, []).append((index, dedupe_id(item.message), fields))
            continue
        entry = packed.get(key)
        if entry is None:
            entry = packed[key] = _pack_or_refuse(item)
        if isinstance(entry, PermanentError):
            outcomes[index] = entry
        else:
            plain.append((index, target, item, entry))
    return outcomes, plain, deduped


def recording_entries(
    items: Sequence[Publish],
) -> tuple[list[Outcome], list[RecordingEntry], list[tuple[int, bool]]]:
    """``items`` for the recording script: outcomes (refused ones filled in now), the entries to
    send, and per entry its item's index and whether dedupe applies to it."""
    outcomes: list[Outcome] = [None] * len(items)
    encoded: dict[int, Fields | PermanentError] = {}
    entries: list[RecordingEntry] = []
    written: list[tuple[int, bool]] = []
    for index, item in enumerate(items):
        target = item.target
        if not isinstance(target, StreamTarget):
            raise TypeError(f"a Redis sink cannot publish to {target!r}")
        key = id(item.message) if item.dead_letter is None else id(item)
        fields = encoded.get(key)
        if fields is None:
            fields = encoded[key] = _encode_or_refuse(item)
        if isinstance(fields, PermanentError):
            outcomes[index] = fields
            continue
        deduped = target.dedupe and item.dead_letter is None
        message_id = dedupe_id(item.message) if deduped else None
        dedupe = None if message_id is None else dedupe_key(target.name, message_id)
        entries.append((target, fields, dedupe, item.position))
        written.append((index, deduped))
    return outcomes, entries, written


def _recording_outcome(result: Any, target: StreamTarget, deduped: bool, has_id: bool) -> Outcome:
    if result == ALREADY_WRITTEN:
        return Accepted.ALREADY_WRITTEN
    if deduped:
        return _script_outcome(result, target, has_id)
    text = result.decode(errors="replace") if isinstance(result, bytes) else str(result)
    return None if text[:1].isdigit() else _refused(target, text)


def _pack_or_refuse(item: Publish) -> PackedEntry | PermanentError:
    try:
        if item.dead_letter is None:
            return entry_resp(item.message)
        return packed_fields(_encode(item))
    except Exception as exc:  # headers that cannot be encoded cost this message, not the worker
        return PermanentError("rejected", f"cannot encode the entry: {type(exc).__name__}: {exc}")


def _encode_or_refuse(item: Publish) -> Fields | PermanentError:
    try:
        return _encode(item)
    except Exception as exc:  # headers that cannot be encoded cost this message, not the worker
        return PermanentError("rejected", f"cannot encode the entry: {type(exc).__name__}: {exc}")


def _has_idmp(version: str) -> bool:
    numbers: list[int] = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers) >= (8, 6)


@dataclass(frozen=True, slots=True)
class _Server:
    version: str
    native: _NativeDedupe | None  # None: this server has no idempotent XADD


# --- the native path (Redis >= 8.6) --------------------------------------------------------------


class _NativeDedupe:
    """``XADD ... IDMP producer message-id``, every replica under one producer id so that each
    recognises the others' writes.

    ``XCFGSET`` sets how long a stream keeps ids: the window, within the server's limits (24 h and
    10,000 ids per producer: past that many newer ids, an old id is forgotten early). Setting new
    values clears a stream's ids, so it is sent once per stream per connection: before the writes
    (an error on a stream that does not exist yet, ignored) and after them (for a stream the writes
    just created; a no-op when the values already hold).

    A duplicate's reply is the id of the entry first written, so an entry counts as new when its id
    is not older than the batch's transaction (TIME, first in the same MULTI; 1 ms of slack for the
    server's cached command time) and newer than the entries before it in the batch.
    """

    PRODUCER = "message-proxy"
    MAX_DURATION_S = 86400
    MAX_IDS = 10_000

    def __init__(self, window_ms: int) -> None:
        self._config = [
            "IDMP-DURATION",
            min(self.MAX_DURATION_S, max(1, window_ms // 1000)),
            "IDMP-MAXSIZE",
            self.MAX_IDS,
        ]
        self._configured: set[str] = set()

    def calls(self, deduped: dict[StreamTarget, list[Entry]]) -> list[_Call]:
        started_ms = [0]

        def record_time(reply: Any) -> list[Outcome]:
            if not isinstance(reply, Exception):
                started_ms[0] = int(reply[0]) * 1000 + int(reply[1]) // 1000 - 1
            return []

        calls = [_Call(["TIME"], [], record_time)]
        for target, entries in deduped.items():
            name = target.name
            configure = name not in self._configured
            if configure:
                calls.append(_Call(["XCFGSET", name, *self._config], [], lambda _reply: []))
            newest = [(0, 0)]
            for index, message_id, fields in entries:
                args: list[Any] = ["XADD", name]
                if message_id is not None:
                    args += ("IDMP", self.PRODUCER, message_id)
                args += [*_xadd_args(target)[2:], "*", *_flat(fields)]
                calls.append(
                    _Call(args, [index], self._classify(target, message_id, started_ms, newest))
                )
            if configure:
                calls.append(_Call(["XCFGSET", name, *self._config], [], self._mark(name)))
        return calls

    def _mark(self, name: str) -> Callable[[Any], list[Outcome]]:
        def mark(reply: Any) -> list[Outcome]:
            if not isinstance(reply, Exception):
                self._configured.add(name)
            return []

        return mark

    @staticmethod
    def _classify(
        target: StreamTarget, message_id: str | None, started_ms: list[int], newest: list[Any]
    ) -> Callable[[Any], list[Outcome]]:
        def classify(reply: Any) -> list[Outcome]:
            if isinstance(reply, Exception):
                return [_reply_outcome(reply, target)]
            text = reply.decode() if isinstance(reply, bytes) else str(reply)
            millis, _, seq = text.partition("-")
            entry_id = (int(millis), int(seq or 0))
            if message_id is not None and (entry_id[0] < started_ms[0] or entry_id <= newest[0]):
                return [Accepted.DUPLICATE]
            newest[0] = max(newest[0], entry_id)
            return [_written(message_id is not None)]

        return classify
