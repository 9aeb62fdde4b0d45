"""One worker's lifecycle: connect, consume, drain, close, in that order, each with a timeout."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from proxy.amqp.consumer import AmqpSource
from proxy.config import Config, StreamDestination
from proxy.errors import ConfigError, PermanentError, TransientError
from proxy.logs import set_level
from proxy.metrics import Metrics
from proxy.pipeline import DeadLetterDestination, Pipeline, Rules
from proxy.reload import describe, plan_reload
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
                config.first_stream_key(),
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
        load: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.role = role
        self.metrics = metrics
        self.health = health
        self.sinks = dict(sinks) if sinks is not None else build_sinks(config, role)
        if config.stream_sources() and self._offset_store() is None:
            raise TypeError(f"stream sources need an offset store, not {self.sinks}")
        self._load = load  # reads the config file again, for a reload; None: no reloads
        self._reload_requested = asyncio.Event()
        rules = self._rules(config)
        self.pipeline = Pipeline(
            rules.router,
            self.sinks,
            batch=config.batch,
            health=health,
            metrics=metrics,
            dead_letter=rules.dead_letter,
            drop_unrouted=rules.drop_unrouted,
            max_batch_bytes=config.amqp.max_inflight_bytes // BATCH_SHARE_OF_INFLIGHT,
            offsets=rules.offsets,
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
            offsets=self._offset_store(),
        )
        self.stop_requested = asyncio.Event()
        self._reloader: asyncio.Task[None] | None = None

    def _offset_store(self) -> OffsetStore | None:
        """Where stream-queue sources keep their offsets: the stream sink, when it can."""
        store = self.sinks.get(StreamTarget)
        return store if isinstance(store, OffsetStore) else None

    def _rules(self, config: Config) -> Rules:
        return Rules(
            router=Router.from_config(config),
            dead_letter=DeadLetterDestination(config.dead_letter) if config.dead_letter else None,
            drop_unrouted=config.unrouted == "drop",
            batch=config.batch,
            # Offset bookkeeping per batch only while some source is a stream queue.
            offsets=self._offset_store() if config.stream_sources() else None,
        )

    async def run(self) -> None:
        """Run until ``stop_requested`` is set, then shut down in order. Raises on a fatal bug."""
        self._reloader = asyncio.create_task(self._reloads(), name="reloads")
        tasks = {
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._watch_sinks(), name="watch-sinks"),
            asyncio.create_task(self.source.run(), name="amqp-source"),
            self._reloader,
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
        if self._reloader is not None:  # a reload half done must not start consumers now
            self._reloader.cancel()
            await asyncio.wait({self._reloader}, timeout=CLOSE_TIMEOUT_S)
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

    # --- reload ---

    def request_reload(self) -> None:
        """Read the config file again and apply it (SIGHUP); requests made while one runs are
        taken together, by one more reload once it is done."""
        self._reload_requested.set()

    async def _reloads(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in a reload must not end the worker
                log.error("config reload failed: %s: %s", type(exc).__name__, exc)
                log.debug("config reload failed", exc_info=True)
                self.metrics.config_reloads.labels(result="rejected").inc()

    async def reload(self) -> str:
        """Apply the config file as it is now, or keep the running config; returns the result
        (``applied``, ``unchanged``, ``rejected``), which is also counted and logged."""
        if self._load is None:
            return self._rejected([("", "this worker was started without a config file")])
        try:
            new = await asyncio.to_thread(self._load)
            check_role(new, self.role)
        except ConfigError as exc:
            return self._rejected(exc.problems)
        plan = plan_reload(self.config, new, destination_kinds=self._destination_kinds())
        if plan.problems:
            return self._rejected(plan.problems)
        if plan.unchanged:
            log.info("config reload: nothing changed")
            self.metrics.config_reloads.labels(result="unchanged").inc()
            return "unchanged"
        refused = await self._declare_new_exchanges(new)
        if refused:
            return self._rejected([refused])
        if plan.removed:
            log.info(
                "config reload: stopping %s; what they delivered is written by the running "
                "config first",
                ", ".join(plan.removed),
            )
            await self.source.remove_sources(plan.removed)
            await self.pipeline.settle(plan.removed)
        await self.pipeline.reconfigure(self._rules(new))
        if new.log_level != self.config.log_level:
            set_level(new.log_level)
        self.config = new
        log.info("config reload applied: %s", describe(plan))
        if plan.added:
            await self.source.add_sources(plan.added)
        self.metrics.config_reloads.labels(result="applied").inc()
        return "applied"

    def _destination_kinds(self) -> set[str]:
        kinds = set()
        if StreamTarget in self.sinks:
            kinds.add("stream")
        if ExchangeTarget in self.sinks:
            kinds.add("exchange")
        return kinds

    async def _declare_new_exchanges(self, new: Config) -> tuple[str, str] | None:
        """Declare the ``declare = true`` exchanges the new file adds; the problem if one cannot
        be, now: a reload never leaves the worker retrying a declaration forever."""
        from proxy.sinks.amqp_exchange import AmqpExchangeSink

        sink = self.sinks.get(ExchangeTarget)
        if not isinstance(sink, AmqpExchangeSink):
            return None
        try:
            await sink.declare_too(new.declared_exchanges())
        except PermanentError as exc:
            return ("declare", f"refused by the broker: {exc.detail}")
        except TransientError as exc:
            return ("declare", f"cannot declare the new exchanges now ({exc}); reload again")
        return None

    def _rejected(self, problems: Sequence[tuple[str, str]]) -> str:
        text = "; ".join(f"{key}: {problem}" if key else problem for key, problem in problems)
        log.error("config reload rejected, the running config is kept: %s", text)
        self.metrics.config_reloads.labels(result="rejected").inc()
        return "rejected"

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
                    if self.health.set_broker(sink.broker, True, node=sink.node):
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

    def on_hangup() -> None:
        if worker.stop_requested.is_set():
            return  # stopping: no reload
        log.info("SIGHUP received: reloading the config")
        worker.request_reload()

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
