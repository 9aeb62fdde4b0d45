"""``message-proxy check --brokers``: connect with the config's URLs and verify what it relies on.

Checks run in classes, in order; the first class with a failure ends the run (exit 1), since
the ones after it depend on it (no queue can be checked without a connection):

1. **connections**: the source broker (``[amqp]``), the publisher's (``[amqp_out]``, or
   ``[amqp]`` again) when there are exchange destinations, and Redis when something needs it.
2. **sources**: each queue exists, or will be declared (``declare = true``); an existing queue is
   declared again with the source's arguments, which changes nothing when they are the same and
   is refused (406, naming the argument) when they differ. Each binding's exchange likewise, with
   its type. A stream-queue source's offset key is read.
3. **destinations**: every exchange destination with a fixed name exists (or will be declared);
   every stream destination accepts ``XADD`` for the configured Redis user.
4. **dead letters**: the ``[dead_letter]`` destination, the same way.

Nothing is created or written. Declarations go on a side channel (a refusal closes only that
channel), and only after a passive declare found the queue or exchange. Redis permissions are
checked by queueing the command inside ``MULTI`` and discarding it: Redis checks a queued
command's ACL (the command and its keys) and its memory limit as it queues it, and runs nothing
on ``DISCARD``. A stream name with placeholders is checked with each placeholder filled in with
``message-proxy-check``, which is what key patterns such as ``~orders:*`` see. Passwords never
appear: URLs are shown masked and broker replies do not hold them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from proxy.amqp.connection import AmqpConnection
from proxy.amqp.nodes import Node, nodes_of
from proxy.config import (
    AmqpSettings,
    Config,
    ExchangeDestination,
    Source,
    StreamDestination,
    amqp_vhost,
    display_url,
)
from proxy.errors import AmqpError, ChannelClosed
from proxy.templates import Template

SAMPLE = "message-proxy-check"
CHECK_SCRIPT = "return 1"


@dataclass(frozen=True, slots=True)
class Result:
    status: str  # "ok", "FAIL", "warn" (does not fail the run) or "skip"
    what: str
    detail: str

    def line(self) -> str:
        return f"[{self.status:^4}] {self.what}: {self.detail}"


@dataclass
class Report:
    out: TextIO
    results: list[Result] = field(default_factory=list)

    def add(self, status: str, what: str, detail: str) -> None:
        result = Result(status, what, detail)
        self.results.append(result)
        print(result.line(), file=self.out, flush=True)

    def failures(self, since: int) -> int:
        return sum(result.status == "FAIL" for result in self.results[since:])


def _refusal(exc: BaseException) -> str:
    if isinstance(exc, ChannelClosed):
        return f"{exc.reply_code} {exc.reply_text}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


async def check_brokers(config: Config, out: TextIO) -> bool:
    """Run every check class in order, printing one line per check; True when all passed."""
    report = Report(out)
    connections: dict[str, Any] = {}
    try:
        steps = (
            ("connections", _connect(config, report, connections)),
            ("sources", _sources(config, report, connections)),
            ("destinations", _destinations(config, report, connections)),
            ("dead letters", _dead_letters(config, report, connections)),
        )
        for position, (name, step) in enumerate(steps):
            start = len(report.results)
            try:
                await step
            except Exception as exc:  # a broker lost mid-check: that class failed
                report.add("FAIL", name, f"{type(exc).__name__}: {_refusal(exc)}")
            failed = report.failures(start)
            if failed:
                for _, later in steps[position + 1 :]:
                    later.close()  # never awaited: the checks that depend on these
                print(
                    f"check failed: {failed} in {name}; the checks after them were not run",
                    file=out,
                )
                return False
    finally:
        await _close(connections)
    print("brokers OK", file=out)
    return True


# --- connections ----------------------------------------------------------------------------


async def _connect_amqp(name: str, settings: AmqpSettings, report: Report) -> AmqpConnection | None:
    """A connection to the first node that accepts one; every node is tried, and one that does
    not answer is a warning while another does (the worker moves on to the next node)."""
    connected: AmqpConnection | None = None
    failures: list[tuple[Node, BaseException]] = []
    for node in nodes_of(settings):
        try:
            async with asyncio.timeout(settings.connect_timeout):
                connection = await AmqpConnection.open(
                    node.endpoint, connection_name=f"message-proxy check {name}"
                )
        except Exception as exc:  # refused, reset, TLS, timeout: reported, not raised
            failures.append((node, exc))
            continue
        if connected is None:
            connected = connection
            report.add("ok", name, f"connected to {node.shown}")
        else:
            report.add("ok", name, f"node {node.shown} accepts a connection too")
            with contextlib.suppress(Exception):
                await connection.close(2.0)
    for node, failure in failures:
        status = "FAIL" if connected is None else "warn"
        report.add(status, name, f"cannot connect to {node.shown}: {_refusal(failure)}")
    return connected


def _redis_user(config: Config) -> str:
    url = config.redis.urls()[0].get_secret_value()
    return unquote(urlsplit(url).username or "") or "default"


async def _connect(config: Config, report: Report, connections: dict[str, Any]) -> None:
    wanted = [("amqp", config.amqp)]
    if config.uses_exchanges() and config.amqp_out is not None:
        wanted.append(("amqp_out", config.amqp_out))
    for name, settings in wanted:
        connection = await _connect_amqp(name, settings, report)
        if connection is not None:
            connections[name] = connection
    if config.uses_exchanges() and config.amqp_out is None and "amqp" in connections:
        connections["amqp_out"] = connections["amqp"]
    if not config.needs_redis():
        return
    from proxy.sinks.redis_clients import client_for  # the sinks' construction, every mode

    client = connections["redis"] = client_for(config.redis)
    shown = _redis_shown(config)
    try:
        async with asyncio.timeout(config.redis.timeout * 2):
            await client.ping()
    except Exception as exc:  # the client's errors: unreachable, refused login, no master
        report.add("FAIL", "redis", f"cannot reach {shown}: {exc or type(exc).__name__}")
        del connections["redis"]
        await _close_redis(client)
    else:
        report.add("ok", "redis", f"connected to {shown} as user {_redis_user(config)!r}")


def _redis_shown(config: Config) -> str:
    redis = config.redis
    if redis.mode == "sentinel":
        sentinels = ", ".join(display_url(url) for url in redis.sentinels)
        return f"the master of {redis.service_name!r} via {sentinels}"
    return ", ".join(display_url(url) for url in redis.urls())


async def _close_redis(client: Any) -> None:
    from proxy.sinks.redis_clients import aclose_client

    await aclose_client(client)


async def _close(connections: dict[str, Any]) -> None:
    for name, connection in connections.items():
        if name == "redis":
            await _close_redis(connection)
        elif name == "amqp" or connection is not connections.get("amqp"):
            with contextlib.suppress(Exception):
                await connection.close(2.0)


# --- sources --------------------------------------------------------------------------------


async def _sources(config: Config, report: Report, connections: dict[str, Any]) -> None:
    connection: AmqpConnection = connections["amqp"]
    for source in config.sources:
        await _source(connection, source, report, config.amqp.connect_timeout)
        if source.is_stream:
            await _stream_offset(config, source, report, connections.get("redis"))


async def _declare(connection: AmqpConnection, within: float, request: Any) -> str | None:
    """None when the broker accepted ``request``, else its refusal."""
    try:
        async with asyncio.timeout(within):
            await request
    except (AmqpError, TimeoutError) as exc:
        if connection.is_closed:
            raise
        return _refusal(exc)
    return None


async def _source(
    connection: AmqpConnection, source: Source, report: Report, within: float
) -> None:
    await _queue(connection, source, report, within)
    if not source.declare:
        return  # bindings are made only by a declaring source
    for binding in source.bindings:
        await _exchange(
            connection,
            binding.exchange,
            binding.exchange_type,
            declare=True,
            what=f"binding {source.queue} <- {binding.exchange} ({binding.routing_key})",
            report=report,
            within=within,
        )


async def _queue(connection: AmqpConnection, source: Source, report: Report, within: float) -> None:
    what = f"source {source.queue}"
    try:
        async with asyncio.timeout(within):
            found = await connection.declare_queue(source.queue, None, passive=True, side=True)
    except ChannelClosed as exc:
        if exc.reply_code != 404:
            report.add("FAIL", what, _refusal(exc))
        elif source.declare:
            report.add("ok", what, "does not exist yet; the worker declares it at start")
        else:
            report.add("FAIL", what, "does not exist, and declare = false: create it first")
        return
    counts = f"exists ({found.message_count} messages, {found.consumer_count} consumers)"
    if not source.declare:
        report.add("ok", what, f"{counts}; declare = false: used as it is")
        return
    refused = await _declare(
        connection,
        within,
        connection.declare_queue(source.queue, source.queue_arguments() or None, side=True),
    )
    if refused is None:
        report.add("ok", what, f"{counts}, with the same arguments")
    else:
        report.add(
            "FAIL", what, f"exists with other arguments or flags than the source's: {refused}"
        )


async def _exchange(
    connection: AmqpConnection,
    name: str,
    exchange_type: str,
    *,
    declare: bool,
    what: str,
    report: Report,
    within: float,
) -> None:
    try:
        async with asyncio.timeout(within):
            await connection.declare_exchange(name, exchange_type, side=True, passive=True)
    except ChannelClosed as exc:
        if exc.reply_code != 404:
            report.add("FAIL", what, f"exchange {name!r}: {_refusal(exc)}")
        elif declare:
            report.add(
                "ok",
                what,
                f"exchange {name!r} does not exist yet; declared at start "
                f"({exchange_type}, durable)",
            )
        else:
            report.add(
                "FAIL",
                what,
                f"exchange {name!r} does not exist (404): declare it, or set declare = true",
            )
        return
    if not declare:
        report.add("ok", what, f"exchange {name!r} exists")
        return
    refused = await _declare(
        connection, within, connection.declare_exchange(name, exchange_type, side=True)
    )
    if refused is None:
        report.add("ok", what, f"exchange {name!r} exists ({exchange_type}, durable)")
    else:
        report.add(
            "FAIL",
            what,
            f"exchange {name!r} exists, not as a durable {exchange_type} exchange: {refused}",
        )


async def _stream_offset(config: Config, source: Source, report: Report, client: Any) -> None:
    key = source.offset_key_in(amqp_vhost(config.amqp))
    what = f"source {source.queue} offset"
    if client is None:
        report.add("FAIL", what, "no Redis to keep its offset in")
        return
    user = _redis_user(config)
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


# --- destinations ---------------------------------------------------------------------------


def _exchanges(config: Config) -> list[tuple[str, ExchangeDestination]]:
    found: dict[str, tuple[str, ExchangeDestination]] = {}
    for route in config.routes:
        for destination in route.to:
            if isinstance(destination, ExchangeDestination):
                key = destination.exchange
                if key not in found or destination.declare:
                    found[key] = (route.name, destination)
    return list(found.values())


def _streams(config: Config) -> list[tuple[str, StreamDestination]]:
    found: dict[str, tuple[str, StreamDestination]] = {}
    for route in config.routes:
        for destination in route.to:
            if isinstance(destination, StreamDestination):
                key = destination.stream
                if key not in found or destination.dedupe:
                    found[key] = (route.name, destination)
    return list(found.values())


async def _destinations(config: Config, report: Report, connections: dict[str, Any]) -> None:
    for route, exchange in _exchanges(config):
        await _exchange_destination(
            config,
            exchange,
            f"destination {exchange.exchange!r} (route {route})",
            report,
            connections,
        )
    for route, stream in _streams(config):
        await _stream_destination(
            config,
            stream,
            f"destination stream {stream.stream!r} (route {route})",
            report,
            connections.get("redis"),
        )


async def _exchange_destination(
    config: Config,
    destination: ExchangeDestination,
    what: str,
    report: Report,
    connections: dict[str, Any],
) -> None:
    template = Template.parse(destination.exchange)
    if not template.is_constant:
        report.add("skip", what, "a template: the exchange is named by each message")
        return
    name = destination.exchange
    if name == "":
        report.add("ok", what, "the default exchange (routes by queue name)")
        return
    settings = config.amqp_out or config.amqp
    await _exchange(
        connections["amqp_out"],
        name,
        "topic",
        declare=destination.declare,
        what=what,
        report=report,
        within=settings.connect_timeout,
    )


def sample_key(template: str) -> str:
    """The template with every placeholder filled in with ``SAMPLE``."""
    parsed = Template.parse(template)
    return "".join(part if isinstance(part, str) else SAMPLE for part in parsed.parts)


async def _stream_destination(
    config: Config, destination: StreamDestination, what: str, report: Report, client: Any
) -> None:
    if client is None:
        report.add("FAIL", what, "no Redis connection")
        return
    key = sample_key(destination.stream)
    where = f"{key!r}" if key == destination.stream else f"{key!r} (placeholders filled in)"
    user = _redis_user(config)
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


# --- dead letters ---------------------------------------------------------------------------


async def _dead_letters(config: Config, report: Report, connections: dict[str, Any]) -> None:
    dead_letter = config.dead_letter
    if dead_letter is None:
        report.add(
            "skip",
            "dead letters",
            "no [dead_letter]: rejected without requeue, to the "
            "queue's own dead-letter exchange if it has one",
        )
        return
    destination = dead_letter.destination()
    if isinstance(destination, StreamDestination):
        await _stream_destination(
            config,
            destination,
            f"dead letters to stream {destination.stream!r}",
            report,
            connections.get("redis"),
        )
    else:
        await _exchange_destination(
            config,
            destination,
            f"dead letters to exchange {destination.exchange!r}",
            report,
            connections,
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

    from proxy.sinks.redis_stream import pack_commands

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
