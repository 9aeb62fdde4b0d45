"""The AMQP source: connect, declare, consume; reconnect with backoff when the connection is lost.

With several nodes (a cluster), a lost or refused connection goes on with the next node in this
process's shuffled order (``nodes``), at once; the backoff waits only once every node failed.

The connection is ``connection``'s, built for this: deliveries are decoded by hand and handed
to the pipeline synchronously, with no Task and no queue per message. The reconnect loop is ours,
so that a lost consumer is seen (readiness turns false) and re-created, never silently gone.

One source never costs the others: a consumer the broker cancels (its queue was deleted) is
re-created on its own, on the same connection and channel, with backoff while its queue cannot be
declared or found; the other consumers and every delivery held unacked are left alone. A
reconnect would give all of those back, and on a quorum queue with ``x-delivery-limit`` every
return counts towards dead-lettering or dropping the message.

A stream queue is consumed from right after the offset its source last wrote, read from the
offset store whenever its consumer starts (``stream_offsets``); each of its deliveries carries its
position. While the store cannot be read, that source alone waits, retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from proxy.amqp.connection import AmqpConnection, Consumer
from proxy.amqp.nodes import Node, NodeRotation, nodes_of
from proxy.backoff import Backoff
from proxy.config import AmqpSettings, Source, amqp_vhost
from proxy.errors import AmqpError, TransientError
from proxy.message import EMPTY_HEADERS, Message
from proxy.metrics import Metrics
from proxy.sinks import OffsetStore
from proxy.state import HealthState
from proxy.stream_offsets import (
    PositionCounter,
    StreamPosition,
    consume_arguments,
    describe_start,
)
from proxy.timeouts import bounded

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5
CLOSE_TIMEOUT_S = 5.0


class Settler(Protocol):
    """Where a delivery is acked or rejected: the connection (one channel) it arrived on."""

    @property
    def is_closed(self) -> bool: ...

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None: ...

    def reject(self, delivery_tag: int, *, requeue: bool = False) -> None: ...


class Delivery(NamedTuple):
    """One message as delivered, until it is settled. A tuple: one is made per delivery."""

    message: Message
    tag: int
    channel: Settler
    received_at: float  # monotonic
    defect: str | None = None  # why the message cannot be handled as delivered: dead-letter it
    position: StreamPosition | None = None  # from a stream queue: never rejected

    @property
    def settleable(self) -> bool:
        """False once the channel is gone: the broker has requeued it and will redeliver."""
        return not self.channel.is_closed


@dataclass(slots=True)
class _Retry:
    """A source not consumed: its backoff, and when (monotonic) to try again."""

    backoff: Backoff = field(default_factory=Backoff)
    due: float = 0.0


class AmqpSource:
    def __init__(
        self,
        settings: AmqpSettings,
        sources: Sequence[Source],
        deliver: Callable[[Delivery], None],
        *,
        health: HealthState,
        metrics: Metrics,
        connection_name: str = "message-proxy",
        clock: Callable[[], float] = time.monotonic,
        offsets: OffsetStore | None = None,
        nodes: NodeRotation | None = None,
    ) -> None:
        if offsets is None and any(source.is_stream for source in sources):
            raise ValueError("stream-queue sources need an offset store")
        self._offsets = offsets
        self._settings = settings
        self._sources = tuple(sources)
        self._deliver = deliver
        self._health = health
        self._metrics = metrics
        self._connection_name = connection_name
        self._clock = clock
        self._stopping = asyncio.Event()
        self._news = asyncio.Event()  # wakes the watcher
        self._nodes = nodes or NodeRotation(nodes_of(settings))
        self._vhost = amqp_vhost(settings)
        self._connection: AmqpConnection | None = None
        # Strong references: a consumer nobody holds is a consumer silently gone.
        self._consumer_tags: dict[str, str] = {}
        self._retries: dict[str, _Retry] = {}  # queues not consumed, and when to try again
        # Held while consumers start or stop: the watcher and a reload must not both start one.
        self._consumers_lock = asyncio.Lock()
        self._health.expect_consumers(len(self._sources))

    async def run(self) -> None:
        """Stay connected and consuming until ``stop_consuming``; broker trouble never raises."""
        backoff = Backoff()
        first = True
        while not self._stopping.is_set():
            if not first:
                self._metrics.reconnects.labels(broker="amqp").inc()
            first = False
            node = self._nodes.current
            try:
                # One deadline for the whole set-up, not just the handshake: a broker that accepts
                # and then hangs on channel, qos, declare or consume is retried, not waited on.
                async with asyncio.timeout(self._settings.connect_timeout):
                    await self._connect_and_consume(node)
                backoff.reset()
                self._nodes.connected()
                problem = await self._watch()
            except Exception as exc:
                # Refused, reset, closed by the broker, TLS, timeout: for this loop every one
                # means "retry with backoff".
                problem = self._failure(exc)
                self._down(problem)
                log.debug("amqp: connection failure", exc_info=True)
            connected = self._connection is not None and not self._connection.is_closed
            if self._stopping.is_set() and connected:
                break  # still connected: the drain acks on this channel, then aclose() closes it
            await self._close_connection()
            if self._stopping.is_set():
                break
            if not self._nodes.failed():  # a node of the cluster not tried since: at once
                log.warning(
                    "amqp: connection to %s lost or refused: %s; trying %s",
                    node.shown,
                    problem,
                    self._nodes.current.address,
                )
                continue
            delay = backoff.next_delay()
            log.warning(
                "amqp: connection to %s lost or refused; retry %d in %.1fs: %s",
                node.shown,
                backoff.attempts,
                delay,
                problem,
            )
            try:
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            except TimeoutError:
                pass

    async def _connect_and_consume(self, node: Node) -> None:
        self._connection = connection = await AmqpConnection.open(
            node.endpoint,
            connection_name=self._connection_name,
            max_inflight_bytes=self._settings.max_inflight_bytes,
        )
        connection.on_cancel = self._news.set
        connection.closed.add_done_callback(lambda _: self._news.set())
        await connection.qos(self._per_consumer())
        await self._start_consumers(connection)
        self._health.set_broker("amqp", True, node=node.address)
        self._metrics.broker_up.labels(broker="amqp").set(1)
        log.info(
            "amqp: consuming %s from %s",
            ", ".join(self._consumer_tags) or "no queue yet",
            node.shown,
        )

    def _per_consumer(self) -> int:
        return max(1, self._settings.prefetch // max(1, len(self._sources)))

    async def _start_consumers(self, connection: AmqpConnection) -> None:
        async with self._consumers_lock:
            await self._start_due(connection)

    async def _start_due(self, connection: AmqpConnection) -> None:
        """Start every source not consumed yet whose retry is due; a source whose queue cannot
        be declared or found is retried with backoff and costs the others nothing."""
        live = connection.consumer_tags
        now = self._clock()
        for source in self._sources:
            if self._consumer_tags.get(source.queue) in live:
                continue
            retry = self._retries.get(source.queue)
            if retry is not None and retry.due > now:
                continue
            try:
                await self._declare(connection, source)
                self._consumer_tags[source.queue] = await self._consume(connection, source)
            except (AmqpError, TransientError) as exc:  # transient: a stream's offset unread
                if connection.is_closed:
                    raise  # the consuming channel is gone: the run loop reconnects
                retry = self._retries.setdefault(source.queue, _Retry())
                delay = retry.backoff.next_delay()
                retry.due = now + delay
                log.warning(
                    "amqp: cannot consume %s; retry %d in %.1fs: %s",
                    source.queue,
                    retry.backoff.attempts,
                    delay,
                    exc,
                )
                continue
            if self._retries.pop(source.queue, None) is not None:
                log.info("amqp: consuming %s again", source.queue)
        self._health.set_consumers(self._consumed(connection))

    async def _declare(self, connection: AmqpConnection, source: Source) -> None:
        """Declare the source's queue and bindings, or (``declare = false``) check that the queue
        exists: on the side channel, where a refusal closes that channel only."""
        if not source.declare:
            await connection.declare_queue(source.queue, None, passive=True, side=True)
            return
        await connection.declare_queue(source.queue, source.queue_arguments() or None, side=True)
        for binding in source.bindings:
            await connection.declare_exchange(binding.exchange, binding.exchange_type, side=True)
            await connection.bind(source.queue, binding.exchange, binding.routing_key, side=True)

    async def _consume(self, connection: AmqpConnection, source: Source) -> str:
        """Start consuming ``source``; returns the consumer tag. A stream queue starts right
        after its recorded offset (raises ``TransientError`` while the store cannot be read)."""
        if not source.is_stream or self._offsets is None:
            return await connection.consume(
                source.queue, self._consumer_for(source.queue, connection)
            )
        key = source.offset_key_in(self._vhost)
        recorded = (await self._offsets.read_offsets([key])).get(key)
        start = source.stream_offset
        log.info("amqp: stream queue %s: %s", source.queue, describe_start(start, recorded))

        def on_gap(first: int, last: int) -> None:
            log.error(
                "stream queue %s: offsets %d to %d are no longer in the stream (its retention "
                "removed them before the worker read them): %d messages never written",
                source.queue,
                first,
                last,
                last - first + 1,
            )

        positions = PositionCounter(key, recorded, on_gap)
        return await connection.consume(
            source.queue,
            self._stream_consumer_for(source.queue, connection, positions),
            arguments=consume_arguments(start, recorded),
        )

    def _stream_consumer_for(
        self, queue: str, connection: AmqpConnection, positions: PositionCounter
    ) -> Consumer:
        deliver, clock, message_of, position_of = (
            self._deliver,
            self._clock,
            Message.of,
            positions.next,
        )

        def on_message(values: dict[str, Any], tag: int, defect: str | None) -> None:
            values["queue"] = queue
            headers = values["headers"]
            if headers is None:
                values["headers"] = EMPTY_HEADERS
            position = position_of(headers)
            deliver(Delivery(message_of(values), tag, connection, clock(), defect, position))

        return on_message

    def _consumed(self, connection: AmqpConnection) -> int:
        live = connection.consumer_tags
        return sum(1 for tag in self._consumer_tags.values() if tag in live)

    def _consumer_for(self, queue: str, connection: AmqpConnection) -> Consumer:
        deliver, clock, message_of = self._deliver, self._clock, Message.of
        new_tuple = tuple.__new__

        def on_message(values: dict[str, Any], tag: int, defect: str | None) -> None:
            values["queue"] = queue
            if values["headers"] is None:
                values["headers"] = EMPTY_HEADERS
            # Delivery(...) without the NamedTuple's Python-level __new__: once per delivery.
            fields = (message_of(values), tag, connection, clock(), defect, None)
            deliver(new_tuple(Delivery, fields))

        return on_message

    async def _watch(self) -> str:
        """Return why, when the connection or its channel is gone; "" on stop. Meanwhile, start
        again every consumer the broker cancelled."""
        while not self._stopping.is_set():
            problem = self._problem()
            if problem:
                self._down(problem)
                return problem
            connection = self._connection
            if connection is not None and self._consumed(connection) < len(self._sources):
                await self._restart_consumers(connection)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._until_next_look(connection)):
                    await self._news.wait()  # a cancel, the connection closing, or stop
            self._news.clear()
        return ""

    def _until_next_look(self, connection: AmqpConnection | None) -> float:
        if connection is None or connection.reading_paused:  # no retry before reading resumes
            return WATCH_INTERVAL_S
        due = min((retry.due for retry in self._retries.values()), default=math.inf)
        return max(0.0, min(WATCH_INTERVAL_S, due - self._clock()))

    def _failure(self, exc: Exception) -> str:
        """One line for a failed attempt: the broker's own reason when it gave one."""
        if isinstance(exc, AmqpError):
            return str(exc)  # e.g. "closed by the broker: 403 ACCESS_REFUSED - Login was refused"
        if isinstance(exc, TimeoutError):
            return f"no answer within connect_timeout ({self._settings.connect_timeout:g}s)"
        return f"{type(exc).__name__}: {exc}".rstrip(": ")

    async def _restart_consumers(self, connection: AmqpConnection) -> None:
        live = connection.consumer_tags
        for queue, tag in self._consumer_tags.items():
            if tag not in live and queue not in self._retries:
                # Not at once: an operator deleting a queue to declare it anew goes first.
                retry = self._retries[queue] = _Retry()
                retry.due = self._clock() + retry.backoff.next_delay()
                log.warning(
                    "amqp: the broker cancelled the consumer of %s (the queue was deleted?); "
                    "starting it again, the other queues go on",
                    queue,
                )
        self._health.set_consumers(self._consumed(connection))
        if connection.reading_paused:
            return  # a request's reply would wait behind the unread deliveries: later
        async with self._consumers_lock:  # outside the deadline: a reload may hold it a while
            try:
                async with asyncio.timeout(self._settings.connect_timeout):
                    await self._start_due(connection)
            except TimeoutError:  # a request left unanswered: the channel's state is unknown
                connection.abort(
                    AmqpError("no answer to a request while starting a consumer again")
                )
            except AmqpError:
                pass  # the connection is gone: the watcher sees it next

    def _problem(self) -> str:
        connection = self._connection
        if connection is None:
            return "connection closed"
        if connection.is_closed:
            return str(connection.closed.result()) if connection.closed.done() else "closed"
        return ""

    def _down(self, problem: str) -> None:
        """Down, with the node it was on (or tried) named in ``/ready``."""
        node = self._nodes.current.address
        detail = f"{node}: {problem}"
        if self._health.set_broker("amqp", False, detail, node=node):
            log.warning("amqp: down: %s", detail)
        self._metrics.broker_up.labels(broker="amqp").set(0)
        self._health.set_consumers(0)

    # --- reload: sources added and removed while running ---

    async def add_sources(self, sources: Sequence[Source]) -> None:
        """Consume ``sources`` too, declared and bound as at start. A source that cannot be
        consumed yet is retried with backoff, like one at start; without a connection, the next
        connect starts them with the others."""
        async with self._consumers_lock:
            self._sources = (*self._sources, *sources)
            self._health.expect_consumers(len(self._sources))
            connection = self._connection
            if connection is None or connection.is_closed or self._stopping.is_set():
                return
            try:
                async with asyncio.timeout(self._settings.connect_timeout):
                    # Applies to the consumers started from now on; the running ones keep
                    # theirs until the next connect.
                    await connection.qos(self._per_consumer())
                    await self._start_due(connection)
            except TimeoutError:  # a request left unanswered: the channel's state is unknown
                connection.abort(AmqpError("no answer to a request while starting a consumer"))
            except AmqpError:
                pass  # the connection is gone: the run loop reconnects and starts every source
        self._news.set()

    async def remove_sources(self, queues: Collection[str]) -> None:
        """Stop consuming ``queues``: once this returns RabbitMQ sends nothing more from them.
        Their deliveries already received stay for the pipeline to settle."""
        async with self._consumers_lock:
            self._sources = tuple(s for s in self._sources if s.queue not in queues)
            self._health.expect_consumers(len(self._sources))
            tags = [self._consumer_tags.pop(q) for q in queues if q in self._consumer_tags]
            for queue in queues:
                self._retries.pop(queue, None)
            connection = self._connection
            if connection is None or connection.is_closed:
                return
            for tag in tags:
                if tag not in connection.consumer_tags:
                    continue
                try:
                    cancelled, _ = await bounded(connection.cancel(tag), CLOSE_TIMEOUT_S)
                except Exception as exc:  # the channel went away: nothing more is delivered
                    log.warning("amqp: cancelling consumer %s failed: %s", tag, exc)
                    continue
                if not cancelled:
                    log.warning("amqp: cancelling consumer %s timed out", tag)
            self._health.set_consumers(self._consumed(connection))

    async def stop_consuming(self, *, within: float = 5.0) -> None:
        """Cancel the consumers; deliveries already received stay for the pipeline to finish."""
        self._stopping.set()
        self._news.set()
        connection = self._connection
        if connection is None or connection.is_closed:
            return
        live = connection.consumer_tags
        for tag in [tag for tag in self._consumer_tags.values() if tag in live]:
            try:
                cancelled, _ = await bounded(connection.cancel(tag), within)
            except Exception as exc:  # the channel went away: nothing more will be delivered
                log.warning("amqp: cancelling consumer %s failed: %s", tag, exc)
                continue
            if not cancelled:
                log.warning("amqp: cancelling consumer %s timed out", tag)
        self._health.set_consumers(0)

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._consumer_tags.clear()
        self._retries.clear()  # a new connection tries every source at once
        if connection is not None:
            await connection.close(CLOSE_TIMEOUT_S)

    async def aclose(self) -> None:
        self._stopping.set()
        self._news.set()
        await self._close_connection()
        self._health.set_broker("amqp", False, "closed")
        self._metrics.broker_up.labels(broker="amqp").set(0)
