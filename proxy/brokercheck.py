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
checked without writing (``redis_checks``). Passwords never appear: URLs are shown masked and
broker replies do not hold them.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, TextIO

from proxy.amqp.connection import AmqpConnection
from proxy.amqp.nodes import Node, nodes_of
from proxy.config import (
    AmqpSettings,
    Config,
    ExchangeDestination,
    Source,
    StreamDestination,
)
from proxy.errors import AmqpError, ChannelClosed
from proxy.redis_checks import (
    close_redis,
    redis_shown,
    redis_user,
    stream_destination,
    stream_offset,
)
from proxy.templates import Template


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
    shown = redis_shown(config)
    try:
        async with asyncio.timeout(config.redis.timeout * 2):
            await client.ping()
    except Exception as exc:  # the client's errors: unreachable, refused login, no master
        report.add("FAIL", "redis", f"cannot reach {shown}: {exc or type(exc).__name__}")
        del connections["redis"]
        await close_redis(client)
    else:
        report.add("ok", "redis", f"connected to {shown} as user {redis_user(config)!r}")


async def _close(connections: dict[str, Any]) -> None:
    for name, connection in connections.items():
        if name == "redis":
            await close_redis(connection)
        elif name == "amqp" or connection is not connections.get("amqp"):
            with contextlib.suppress(Exception):
                await connection.close(2.0)


# --- sources --------------------------------------------------------------------------------


async def _sources(config: Config, report: Report, connections: dict[str, Any]) -> None:
    connection: AmqpConnection = connections["amqp"]
    for source in config.sources:
        await _source(connection, source, report, config.amqp.connect_timeout)
        if source.is_stream:
            await stream_offset(config, source, report, connections.get("redis"))


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
        await stream_destination(
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
        await stream_destination(
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
