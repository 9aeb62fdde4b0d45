"""``check --brokers`` on Redis: permissions checked without writing, on the server that
serves each key.

A command is checked by queueing it inside ``MULTI`` and discarding the transaction: Redis checks
a queued command's ACL (the command and every key it names) and its memory limit as it queues it,
and runs nothing on ``DISCARD``. ``MULTI`` is sent alone first: were it refused, the command after
it would run. Where the user may not run ``MULTI``, ``ACL DRYRUN`` asks instead. A stream name
with placeholders is checked with each one filled in with ``message-proxy-check``, which is what
key patterns such as ``~orders:*`` see.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from proxy.config import Config, Source, StreamDestination, amqp_vhost, display_url
from proxy.templates import Template

if TYPE_CHECKING:
    from proxy.brokercheck import Report

SAMPLE = "message-proxy-check"
CHECK_SCRIPT = "return 1"


def redis_user(config: Config) -> str:
    url = config.redis.urls()[0].get_secret_value()
    return unquote(urlsplit(url).username or "") or "default"


def redis_shown(config: Config) -> str:
    redis = config.redis
    if redis.mode == "sentinel":
        sentinels = ", ".join(display_url(url) for url in redis.sentinels)
        return f"the master of {redis.service_name!r} via {sentinels}"
    return ", ".join(display_url(url) for url in redis.urls())


async def close_redis(client: Any) -> None:
    from proxy.sinks.redis_clients import aclose_client

    await aclose_client(client)


async def stream_offset(config: Config, source: Source, report: Report, client: Any) -> None:
    key = source.offset_key_in(amqp_vhost(config.amqp))
    what = f"source {source.queue} offset"
    if client is None:
        report.add("FAIL", what, "no Redis to keep its offset in")
        return
    user = redis_user(config)
    read, queued = await _on_key(
        client, key, user, [["MGET", key], Queued(["EVAL", CHECK_SCRIPT, 1, key])]
    )
    if isinstance(read, Exception):
        report.add("FAIL", what, f"cannot read {key!r}: {read}")
    elif isinstance(queued, Exception):
        report.add("FAIL", what, f"cannot record it in {key!r} (a script): {queued}")
    elif isinstance(queued, str):
        report.add("skip", what, f"{key!r} can be read; recording it cannot be checked: {queued}")
    else:
        value = read[0] if isinstance(read, list) and read else None
        kept = f"offset {value.decode()} recorded" if value else "no offset recorded yet"
        report.add("ok", what, f"{key!r}: {kept}; recording allowed")


def sample_key(template: str) -> str:
    """The template with every placeholder filled in with ``SAMPLE``."""
    parsed = Template.parse(template)
    return "".join(part if isinstance(part, str) else SAMPLE for part in parsed.parts)


async def stream_destination(
    config: Config, destination: StreamDestination, what: str, report: Report, client: Any
) -> None:
    if client is None:
        report.add("FAIL", what, "no Redis connection")
        return
    key = sample_key(destination.stream)
    where = f"{key!r}" if key == destination.stream else f"{key!r} (placeholders filled in)"
    user = redis_user(config)
    commands: list[list[Any] | Queued] = [["TYPE", key], Queued(["XADD", key, "*", SAMPLE, "1"])]
    if destination.dedupe:
        from proxy.sinks.redis_stream import dedupe_key

        script = ["EVAL", CHECK_SCRIPT, 2, key, dedupe_key(key, SAMPLE)]
        commands += [["INFO", "server"], Queued(script)]
    replies = await _on_key(client, key, user, commands)
    kind, xadd = replies[0], replies[1]
    if isinstance(xadd, Exception):
        report.add("FAIL", what, f"XADD to {where} refused for user {user!r}: {xadd}")
        return
    if isinstance(kind, bytes) and kind not in (b"none", b"stream"):
        report.add("FAIL", what, f"{where} holds a {kind.decode()}, not a stream")
        return
    if destination.dedupe:
        problem = next((r for r in replies[2:] if isinstance(r, Exception)), None)
        if problem is not None:
            report.add(
                "FAIL", what, f"dedupe needs INFO and scripts, refused for user {user!r}: {problem}"
            )
            return
    if isinstance(xadd, str):
        report.add("skip", what, f"XADD to {where} cannot be checked for user {user!r}: {xadd}")
        return
    report.add(
        "ok",
        what,
        f"XADD to {where} allowed for user {user!r} (checked without "
        "writing: queued in a MULTI, then discarded)",
    )


# --- Redis: commands on the connection that serves a key ------------------------------------


@dataclass(frozen=True, slots=True)
class Queued:
    """A command checked and never run: queued in ``MULTI``, then ``DISCARD``. Where the user may
    not run ``MULTI``, ``ACL DRYRUN`` asks instead (it needs rights of its own)."""

    command: list[Any]


Unknown = str  # why a queued command could not be checked


@contextlib.asynccontextmanager
async def _connection_for(client: Any, key: str) -> AsyncIterator[Any]:
    """A connection to the server that serves ``key``, given back afterwards (dropped when a
    reply may be left unread: its next user would get it)."""
    from redis import exceptions as redis_errors
    from redis.asyncio.cluster import RedisCluster

    give_back: Callable[[Any], Awaitable[None] | None]
    if isinstance(client, RedisCluster):
        await client.initialize()
        node = client.get_node_from_key(key)
        if node is None:
            raise redis_errors.ClusterDownError(f"no node serves {key!r}")
        connection, give_back = node.acquire_connection(), node.release
    else:
        pool = client.connection_pool
        connection, give_back = await pool.get_connection(), pool.release
    try:
        yield connection
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        released = give_back(connection)
        if released is not None:
            await released


async def _on_key(
    client: Any, key: str, user: str, commands: Sequence[list[Any] | Queued]
) -> list[Any]:
    """The reply to each command, in order (errors as exceptions; for a ``Queued`` one: None when
    allowed, the refusal, or an ``Unknown`` text), on one connection to the server that serves
    ``key``, one command at a time: ``MULTI`` must be known to hold before anything follows it."""
    from redis import exceptions as redis_errors

    from proxy.sinks.resp import pack_commands

    async with _connection_for(client, key) as connection:

        async def ask(command: list[Any]) -> Any:
            await connection.send_packed_command(pack_commands([command]), check_health=False)
            try:
                return await connection.read_response(disable_decoding=True)
            except redis_errors.ResponseError as exc:
                return exc

        return [
            await (
                _checked(ask, command.command, user)
                if isinstance(command, Queued)
                else ask(command)
            )
            for command in commands
        ]


async def _checked(ask: Any, command: list[Any], user: str) -> Exception | Unknown | None:
    from redis import exceptions as redis_errors

    opened = await ask(["MULTI"])
    if not isinstance(opened, Exception):
        queued = await ask(command)
        await ask(["DISCARD"])
        return queued if isinstance(queued, Exception) else None
    dry = await ask(["ACL", "DRYRUN", user, *command])
    if isinstance(dry, Exception):
        return f"neither MULTI ({opened}) nor ACL DRYRUN ({dry}) is allowed"
    if dry == b"OK":
        return None
    return redis_errors.NoPermissionError(dry.decode(errors="replace"))
