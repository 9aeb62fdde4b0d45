"""Redis Cluster: a batch's entries grouped by the node that owns their slot, one pipelined round
trip per node (all nodes at once), each ending with ``WAIT`` when ``min_replicas`` asks for it.

redis-py's cluster client keeps the topology (slot map, nodes, their connections); the writing is
ours, on those connections, in the same packed form as the standalone sink. Replies that redirect:

- ``MOVED``: the slot has a new owner for good (failover, resharding): the slot map is updated and
  the entry written again to the new owner, in the same ``publish_batch``.
- ``ASK``: the slot is being migrated and this key is already on the target: the entry is sent
  there, after ``ASKING``, this once; the slot map stays as it is.
- ``NOSCRIPT`` (a node that never saw the dedupe script, a promoted replica): sent again as
  ``EVAL`` with the script's text, which also caches it there.

``CLUSTERDOWN``, ``TRYAGAIN`` (a multi-key script call whose keys are split by a migration),
``LOADING``, ``READONLY`` and a node that cannot be reached are transient: the batch is held and
retried, readiness turns false, and the slot map is loaded again before the next attempt.

De-duplication is the Lua script of the standalone sink: a stream and its dedupe keys share a hash
tag, so each stream's check-and-write is one script call on one node.

Stream-queue offsets are kept here too, but not written in the same step as the entries (the keys
of a batch span slots): a batch's items at or below their source's recorded offset are left out
(read first), and the offsets are recorded once every destination accepted the batch. At least
once: a batch written but not recorded (a kill, a lost reply) is written again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot

from proxy.config import RedisSettings
from proxy.errors import TransientError
from proxy.sinks import Accepted, Outcome, Publish
from proxy.sinks.redis_clients import cluster_client
from proxy.sinks.redis_offsets import RECORD_SCRIPT, parse_offsets
from proxy.sinks.redis_stream import (
    _DEDUPE_SCRIPT,
    _UNREACHABLE,
    _reply_outcome,
    _script_call,
    check_replicas,
    packed_xadds,
    plan_batch,
    wait_command,
)
from proxy.sinks.resp import Command, pack_commands, read_replies

log = logging.getLogger(__name__)

_PING: Command = ["PING"]
_ASKING: Command = ["ASKING"]
# Redirections followed within one publish_batch before the batch is held as transient.
MAX_REDIRECT_ROUNDS = 5
_SCRIPT_SHA = hashlib.sha1(_DEDUPE_SCRIPT.encode()).hexdigest()


@dataclass(slots=True)
class _Command:
    args: Command
    slot: int
    ask: tuple[str, int] | None = None  # where an ASK sent it, for the next round only


class RedisClusterSink:
    def __init__(self, settings: RedisSettings, *, dedupe_window: float = 86400.0) -> None:
        self._client = cluster_client(settings)
        self._window_ms = max(1, round(dedupe_window * 1000))
        self._wait = wait_command(settings)
        self._timeout = settings.timeout + (settings.replica_timeout if self._wait else 0.0)
        self._started = False
        self._stale = False  # the slot map must be loaded again before the next write
        self._ask_nodes: dict[tuple[str, int], ClusterNode] = {}

    @property
    def broker(self) -> str:
        return "redis"

    @property
    def node(self) -> str:
        return ""  # every master of the cluster

    async def connect(self) -> None:
        await self.ping()

    async def ping(self) -> None:
        """Every master answers (a slot without one would hold its entries)."""

        async def ping_all() -> None:
            await self._refresh()
            masters = self._client.get_primaries()
            if not masters:
                raise redis_errors.ClusterDownError("no master known")
            await _first_error(
                await asyncio.gather(
                    *(self._send(node, [_PING], ask=[False]) for node in masters),
                    return_exceptions=True,
                )
            )

        await self._guarded(ping_all())

    async def aclose(self) -> None:
        await self._client.aclose()
        for node in self._ask_nodes.values():
            await node.disconnect()
        self._ask_nodes.clear()

    async def publish_batch(self, items: Sequence[Publish]) -> list[Outcome]:
        outcomes, plain, deduped = plan_batch(items)
        calls = [_script_call(t, e, self._window_ms) for t, e in deduped.items()]
        commands = [
            _Command(command, key_slot(target.name.encode()))
            for (_, target, _, _), command in zip(plain, packed_xadds(plain), strict=True)
        ]
        for call, target in zip(calls, deduped, strict=True):
            call.args[1] = _SCRIPT_SHA
            commands.append(_Command(call.args, key_slot(target.name.encode())))
        replies = await self._guarded(self._write(commands))
        try:
            for (index, target, _, _), reply in zip(plain, replies, strict=False):
                if isinstance(reply, Exception):
                    outcomes[index] = _reply_outcome(reply, target)
            scripted = list(zip(calls, replies[len(plain) :], strict=True))
            for call, reply in scripted:
                for index, outcome in zip(call.indexes, call.outcomes(reply), strict=True):
                    outcomes[index] = outcome
        except TransientError:  # CLUSTERDOWN, TRYAGAIN, LOADING...: the topology may be moving
            self._stale = True
            raise
        return outcomes

    # --- stream-queue offsets (OffsetStore), recorded after the batch ---

    async def read_offsets(self, keys: Sequence[str]) -> dict[str, int]:
        commands = [_Command(["GET", key], key_slot(key.encode())) for key in keys]
        replies = await self._guarded(self._write(commands))
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, Exception):
                raise TransientError(f"redis cluster: offset key {key}: {reply}")
        try:
            return parse_offsets(keys, replies)
        except ValueError as exc:
            raise TransientError(f"redis cluster: {exc}") from None

    async def record_offsets(self, offsets: Mapping[str, int]) -> None:
        commands = [
            _Command(["EVAL", RECORD_SCRIPT, 1, key, offset], key_slot(key.encode()))
            for key, offset in offsets.items()
        ]
        for key, reply in zip(offsets, await self._guarded(self._write(commands)), strict=True):
            if isinstance(reply, Exception):
                raise TransientError(f"redis cluster: recording offset {key}: {reply}")

    async def publish_recording(
        self, items: Sequence[Publish], offsets: Mapping[str, int]
    ) -> tuple[list[Outcome], bool]:
        keys = sorted({item.position.key for item in items if item.position is not None})
        recorded = await self.read_offsets(keys) if keys else {}
        outcomes: list[Outcome] = [Accepted.ALREADY_WRITTEN] * len(items)
        fresh = [
            index
            for index, item in enumerate(items)
            if item.position is None
            or item.position.offset is None
            or item.position.offset > recorded.get(item.position.key, -1)
        ]
        written = await self.publish_batch([items[index] for index in fresh])
        for index, outcome in zip(fresh, written, strict=True):
            outcomes[index] = outcome
        return outcomes, False  # the caller records the offsets once everything was accepted

    async def _write(self, commands: list[_Command]) -> list[Any]:
        """Every command's final reply (redirections followed), in order."""
        replies: list[Any] = [None] * len(commands)
        pending = list(range(len(commands)))
        seen: Counter[str] = Counter()
        for _round in range(MAX_REDIRECT_ROUNDS):
            await self._refresh()
            by_node: dict[ClusterNode, list[int]] = {}
            for position in pending:
                by_node.setdefault(self._node_for(commands[position]), []).append(position)
            nodes = list(by_node)
            results = await asyncio.gather(
                *(self._send_commands(n, [commands[p] for p in by_node[n]]) for n in nodes),
                return_exceptions=True,
            )
            await _first_error(results)
            pending = []
            for node, node_replies in zip(nodes, results, strict=True):
                positions = by_node[node]
                for position, reply in zip(positions, cast(list[Any], node_replies), strict=True):
                    if await self._redirected(commands[position], reply, seen):
                        pending.append(position)
                    else:
                        replies[position] = reply
            if seen:
                log.info(
                    "redis cluster: redirected %s",
                    ", ".join(f"{n} by {kind}" for kind, n in sorted(seen.items())),
                )
                seen.clear()
            if not pending:
                return replies
        self._stale = True
        raise redis_errors.TryAgainError(f"still redirected after {MAX_REDIRECT_ROUNDS} rounds")

    async def _redirected(self, command: _Command, reply: Any, seen: Counter[str]) -> bool:
        """Whether ``reply`` sends ``command`` elsewhere (or again); ready for the next round."""
        command.ask = None
        if isinstance(reply, redis_errors.MovedError):
            seen["MOVED"] += 1
            await self._client.nodes_manager.move_slot(reply)
            return True
        if isinstance(reply, redis_errors.AskError):
            seen["ASK"] += 1
            command.ask = (reply.host, reply.port)
            return True
        if isinstance(reply, redis_errors.NoScriptError) and type(command.args) is list:
            command.args[0], command.args[1] = "EVAL", _DEDUPE_SCRIPT
            return True
        return False

    def _node_for(self, command: _Command) -> ClusterNode:
        if command.ask is None:
            return self._client.nodes_manager.get_node_from_slot(command.slot)
        host, port = command.ask
        node = self._client.nodes_manager.get_node(host=host, port=port)
        if node is None:  # a node the slot map does not know yet: the import target
            node = self._ask_nodes.get(command.ask)
            if node is None:
                kwargs = self._client.nodes_manager.connection_kwargs
                node = self._ask_nodes[command.ask] = ClusterNode(host, port, **kwargs)
        return node

    async def _send_commands(self, node: ClusterNode, commands: list[_Command]) -> list[Any]:
        replies: list[Any] = await self._send(
            node, [c.args for c in commands], ask=[c.ask is not None for c in commands]
        )
        return replies

    async def _send(self, node: ClusterNode, commands: list[Command], *, ask: list[bool]) -> Any:
        """One write of ``commands`` (each after ``ASKING`` where ``ask``), WAIT last when asked
        for, on one of the node's connections; the replies in order, errors as exceptions."""
        packed: list[Command] = []
        for args, asking in zip(commands, ask, strict=True):
            if asking:
                packed.append(_ASKING)
            packed.append(args)
        writes = commands != [_PING]
        if self._wait and writes:
            packed.append(self._wait)
        connection = node.acquire_connection()
        try:
            await connection.send_packed_command(pack_commands(packed), check_health=False)
            every = await read_replies(connection, len(packed))
            replies = [r for r, c in zip(every, packed, strict=True) if c is not _ASKING]
        except BaseException:
            await connection.disconnect()  # half read: its next user would get our replies
            raise
        finally:
            node.release(connection)
        if self._wait and writes:
            check_replicas(replies.pop(), self._wait)
        return replies

    async def _refresh(self) -> None:
        if not self._started:  # the client's own start, so that its aclose closes every node
            await self._client.initialize()
            self._started = True
            self._stale = False
        elif self._stale:
            await self._client.nodes_manager.initialize()
            self._stale = False

    async def _guarded(self, awaitable: Any) -> Any:
        """Within the timeout; unreachable or a cluster in trouble becomes ``TransientError``,
        and the slot map is loaded again before the next try."""
        try:
            async with asyncio.timeout(self._timeout):
                return await awaitable
        except TransientError:
            self._stale = True
            raise
        except _UNREACHABLE as exc:
            # Idle connections to a node that went away are as dead as the one that failed.
            for node in list(self._client.nodes_manager.nodes_cache.values()):
                await node.disconnect_free_connections()
            self._stale = True
            raise TransientError(f"redis cluster: {exc or type(exc).__name__}") from exc
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            self._stale = True
            raise TransientError(f"redis cluster: {exc or type(exc).__name__}") from exc


async def _first_error(results: Sequence[Any]) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result
