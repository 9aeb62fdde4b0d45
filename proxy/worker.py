"""One worker's lifecycle: connect, consume, drain, close, in that order, each with a timeout."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping

from proxy.amqp.consumer import AmqpSource
from proxy.config import Config, StreamDestination
from proxy.errors import ConfigError, TransientError
from proxy.metrics import Metrics
from proxy.pipeline import DeadLetterDestination, Pipeline
from proxy.routing import ExchangeTarget, Router, StreamTarget, Target
from proxy.sinks import OffsetStore, Sink
from proxy.state import HealthState
from proxy.timeouts import bounded

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.25
# A batch takes at most this share of [amqp] max_inflight_bytes in bodies: on its way out a
# batch is copied (the Redis client packs each command, the socket buffers what it cannot send
# at once), so the worker holds max_inflight_bytes plus about twice a batch. Measured, 8 MiB
# bodies at the defaults: peak RSS 225 MiB with whole batches, 150 MiB with an eighth.
BATCH_SHARE_OF_INFLIGHT = 8
PING_INTERVAL_S = 0.5  # + PING_TIMEOUT_S: a silent broker shows in readiness within 1.5 s
PING_TIMEOUT_S = 1.0
CLOSE_TIMEOUT_S = 5.0
# After shutdown_timeout: the consumer cancel, the sink closes and the connection close, each
# bounded by CLOSE_TIMEOUT_S, plus a margin.
STUCK_SHUTDOWN_GRACE_S = 4 * CLOSE_TIMEOUT_S
EXIT_STUCK = 1

ROLE_KINDS: Mapping[str, frozenset[str]] = {
    "all": frozenset({"stream", "exchange"}),
    "stream-bridge": frozenset({"stream"}),
    "exchange-relay": frozenset({"exchange"}),
}


def _kind(destination: object) -> str:
    return "stream" if isinstance(destination, StreamDestination) else "exchange"


def _with_article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def check_role(config: Config, role: str) -> None:
    """A role that cannot serve a configured destination kind is a config error naming each."""
    kinds = ROLE_KINDS[role]
    problems = [
        (
            f"routes[{index}].to[{position}]",
            f"route {route.name!r} sends to {_with_article(_kind(destination))}, "
            f"which the {role} role cannot serve",
        )
        for index, route in enumerate(config.routes)
        for position, destination in enumerate(route.to)
        if _kind(destination) not in kinds
    ]
    if config.dead_letter is not None:
        kind = _kind(config.dead_letter.destination())
        if kind not in kinds:
            problems.append(
                (
                    f"dead_letter.{kind}",
                    f"the {role} role cannot dead-letter to {_with_article(kind)}",
                )
            )
    if "stream" not in kinds:
        problems += [
            (
                f"sources[{index}]",
                f"queue {source.queue!r} is a stream queue, whose offsets are kept in Redis, "
                f"which the {role} role has not: consume it with `message-proxy run`",
            )
            for index, source in enumerate(config.sources)
            if source.is_stream
        ]
    if problems:
        raise ConfigError.of(problems)


def build_sinks(config: Config, role: str) -> dict[type[Target], Sink]:
    check_role(config, role)
    sinks: dict[type[Target], Sink] = {}
    if config.needs_redis():
        try:
            from proxy.sinks.redis_stream import RedisStreamSink  # not in the relay's image
        except ImportError as exc:
            what = "stream destinations" if config.uses_streams() else "stream-queue sources"
            raise ConfigError(
                _first_stream_key(config),
                f"{what} need the redis package ({exc}); install message-proxy[redis]",
            ) from None

        if config.redis.mode == "cluster":
            from proxy.sinks.redis_cluster import RedisClusterSink

            sinks[StreamTarget] = RedisClusterSink(config.redis, dedupe_window=config.dedupe.window)
        else:
            sinks[StreamTarget] = RedisStreamSink(config.redis, dedupe_window=config.dedupe.window)
    if config.uses_exchanges():
        from proxy.sinks.amqp_exchange import AmqpExchangeSink

        sinks[ExchangeTarget] = AmqpExchangeSink(
            config.amqp_out or config.amqp,
            connection_name=f"message-proxy {role} publisher",
            declare=config.declared_exchanges(),
        )
    return sinks


def _first_stream_key(config: Config) -> str:
    for index, route in enumerate(config.routes):
        for position, destination in enumerate(route.to):
            if isinstance(destination, StreamDestination):
                return f"routes[{index}].to[{position}]"
    if config.dead_letter is not None and config.dead_letter.stream is not None:
        return "dead_letter.stream"
    streams = [index for index, source in enumerate(config.sources) if source.is_stream]
    return f"sources[{streams[0]}]" if streams else "dead_letter.stream"


class Worker:
    def __init__(
        self,
        config: Config,
        *,
        role: str,
        metrics: Metrics,
        health: HealthState,
        sinks: Mapping[type[Target], Sink] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.role = role
        self.metrics = metrics
        self.health = health
        self.sinks = dict(sinks) if sinks is not None else build_sinks(config, role)
        offsets = self.sinks.get(StreamTarget) if config.stream_sources() else None
        if offsets is not None and not isinstance(offsets, OffsetStore):
            raise TypeError(f"stream sources need an offset store, not {offsets!r}")
        self.pipeline = Pipeline(
            Router.from_config(config),
            self.sinks,
            batch=config.batch,
            health=health,
            metrics=metrics,
            dead_letter=DeadLetterDestination(config.dead_letter) if config.dead_letter else None,
            drop_unrouted=config.unrouted == "drop",
            max_batch_bytes=config.amqp.max_inflight_bytes // BATCH_SHARE_OF_INFLIGHT,
            offsets=offsets,
            clock=clock,
        )
        self.source = AmqpSource(
            config.amqp,
            config.sources,
            self.pipeline.submit,
            health=health,
            metrics=metrics,
            connection_name=f"message-proxy {role}",
            clock=clock,
            offsets=offsets,
        )
        self.stop_requested = asyncio.Event()

    async def run(self) -> None:
        """Run until ``stop_requested`` is set, then shut down in order. Raises on a fatal bug."""
        tasks = {
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._watch_sinks(), name="watch-sinks"),
            asyncio.create_task(self.source.run(), name="amqp-source"),
        }
        flusher = asyncio.create_task(self.pipeline.run(), name="pipeline")
        stop = asyncio.create_task(self.stop_requested.wait(), name="stop")
        try:
            done, _ = await asyncio.wait(
                {*tasks, flusher, stop}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done - {stop}:
                task.result()  # a background task must never end: surface its exception
                raise RuntimeError(f"task {task.get_name()} ended unexpectedly")
            await self._shutdown(flusher)
        finally:
            everything = (*tasks, flusher, stop)
            for task in everything:
                task.cancel()
            # Bounded: a task that swallows its cancellation must not keep the worker alive.
            await asyncio.wait(everything, timeout=CLOSE_TIMEOUT_S)
            await self._close()

    async def _shutdown(self, flusher: asyncio.Task[None]) -> None:
        self.health.stopping()
        log.info("stopping: no new deliveries; draining %d in flight", self.pipeline.pending)
        await self.source.stop_consuming(within=CLOSE_TIMEOUT_S)
        drained, _ = await bounded(self.pipeline.drain(), self.config.shutdown_timeout)
        if not drained:
            log.warning(
                "shutdown timeout: %d deliveries not acked; RabbitMQ redelivers them",
                self.pipeline.pending,
            )
        flusher.cancel()

    async def _close(self) -> None:
        for sink in self.sinks.values():
            try:
                closed, _ = await bounded(sink.aclose(), CLOSE_TIMEOUT_S)
            except Exception as exc:  # closing must go on whatever one sink does
                closed = False
                log.warning("%s: close failed: %s", sink.broker, exc)
            else:
                if not closed:
                    log.warning("%s: close timed out", sink.broker)
        await self.source.aclose()

    async def _heartbeat(self) -> None:
        while True:
            self.health.beat()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _watch_sinks(self) -> None:
        """Ping every destination broker so readiness reflects it even when no traffic flows."""
        while True:
            for sink in self.sinks.values():
                try:
                    async with asyncio.timeout(PING_TIMEOUT_S):
                        await sink.ping()
                except (TransientError, TimeoutError) as exc:
                    detail = str(exc) or "ping timed out"
                    if self.health.set_broker(sink.broker, False, detail):
                        self.metrics.broker_up.labels(broker=sink.broker).set(0)
                        log.warning("%s: down: %s", sink.broker, detail)
                else:
                    if self.health.set_broker(sink.broker, True):
                        self.metrics.broker_up.labels(broker=sink.broker).set(1)
                        log.info("%s: up", sink.broker)
            await asyncio.sleep(PING_INTERVAL_S)


def _exit_if_stuck(after: float) -> None:
    """The last line of defence: a shutdown still running ``after`` seconds on is ended.

    Every step of the shutdown is bounded, but the client libraries run code of their own on the
    way out (asyncio's runner waits for every task they left). What was acked is safe; what was
    not is redelivered by RabbitMQ.
    """

    def stuck() -> None:
        log.error("shutdown still running after %.0fs: exiting now", after)
        logging.shutdown()
        os._exit(EXIT_STUCK)

    timer = threading.Timer(after, stuck)
    timer.daemon = True
    timer.start()


def install_signal_handlers(worker: Worker, main_task: asyncio.Task[None]) -> None:
    """First SIGTERM/SIGINT: graceful stop. Second: stop at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if worker.stop_requested.is_set():
            log.warning("second %s: exiting without draining", signal.Signals(signum).name)
            main_task.cancel()
            return
        log.info("%s received: shutting down", signal.Signals(signum).name)
        worker.stop_requested.set()
        _exit_if_stuck(worker.config.shutdown_timeout + STUCK_SHUTDOWN_GRACE_S)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
