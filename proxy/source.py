"""The AMQP source: connect, declare, consume; reconnect with backoff when the connection is lost.

aio-pika opens the connection and declares the topology. Deliveries are taken from the underlying
aiormq channel directly: it skips aio-pika's per-message wrapper, the largest per-message cost of
the consumer. The reconnect loop is ours rather than ``connect_robust``'s, so that a lost consumer
is seen (readiness turns false) and re-created, never silently gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pamqp.decode
from aiormq.abc import AbstractChannel, DeliveredMessage

from proxy.backoff import Backoff
from proxy.config import AmqpSettings, Source, display_url
from proxy.message import EMPTY_HEADERS, Message
from proxy.metrics import Metrics
from proxy.state import HealthState
from proxy.timeouts import bounded

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.5
CLOSE_TIMEOUT_S = 5.0

_pamqp_timestamp = pamqp.decode.timestamp


def lenient_timestamp(value: bytes) -> tuple[int, datetime]:
    """pamqp's timestamp decoder, also reading Unix times in microseconds and nanoseconds.

    pamqp reads seconds, or milliseconds above 2**32; anything larger (a publisher that sends µs
    or ns) raises inside aiormq's frame reader. The connection drops before we ever see the
    message, RabbitMQ puts it back at the head of the queue, and the queue is wedged for good.
    """
    try:
        return _pamqp_timestamp(value)
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:
            raise
        raw = int.from_bytes(value[:8], "big")
        return 8, datetime.fromtimestamp(raw / (1e6 if raw < 10**17 else 1e9), tz=UTC)


# Process-wide on purpose: the exchange sink's connection decodes returned messages too.
pamqp.decode.METHODS["timestamp"] = lenient_timestamp
pamqp.decode.TABLE_MAPPING[b"T"] = lenient_timestamp


@dataclass(slots=True, eq=False)
class Delivery:
    message: Message
    tag: int
    channel: AbstractChannel
    received_at: float  # monotonic

    @property
    def settleable(self) -> bool:
        """False once the channel is gone: the broker has requeued it and will redeliver."""
        return not self.channel.is_closed


def to_message(delivered: DeliveredMessage, queue: str) -> Message:
    props = delivered.header.properties
    deliver = delivered.delivery
    return Message.of(
        {
            "body": delivered.body,
            "routing_key": deliver.routing_key or "",  # type: ignore[union-attr]
            "exchange": deliver.exchange or "",  # type: ignore[union-attr]
            "queue": queue,
            "headers": props.headers or EMPTY_HEADERS,
            "content_type": props.content_type,
            "content_encoding": props.content_encoding,
            "delivery_mode": props.delivery_mode,
            "priority": props.priority,
            "correlation_id": props.correlation_id,
            "reply_to": props.reply_to,
            "expiration": props.expiration,
            "message_id": props.message_id,
            "timestamp": props.timestamp,
            "type": props.message_type,
            "user_id": props.user_id,
            "app_id": props.app_id,
            "redelivered": bool(getattr(deliver, "redelivered", False)),
        }
    )


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
    ) -> None:
        self._settings = settings
        self._sources = tuple(sources)
        self._deliver = deliver
        self._health = health
        self._metrics = metrics
        self._connection_name = connection_name
        self._clock = clock
        self._stopping = asyncio.Event()
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        # Strong references: a consumer nobody holds is a consumer silently gone.
        self._consumer_tags: dict[str, str] = {}
        self._health.expect_consumers(len(self._sources))

    async def run(self) -> None:
        """Stay connected and consuming until ``stop_consuming``; broker trouble never raises."""
        backoff = Backoff()
        first = True
        while not self._stopping.is_set():
            if not first:
                self._metrics.reconnects.labels(broker="amqp").inc()
            first = False
            try:
                # One deadline for the whole set-up, not just the handshake: a broker that accepts
                # and then hangs on channel, qos, declare or consume is retried, not waited on.
                async with asyncio.timeout(self._settings.connect_timeout):
                    await self._connect_and_consume()
                backoff.reset()
                await self._watch()
            except Exception as exc:
                # aiormq surfaces a dropped connection as many types (even StopAsyncIteration
                # mid-handshake); for this loop every one of them means "retry with backoff".
                self._down(f"{type(exc).__name__}: {exc}".rstrip(": "))
                log.debug("amqp: connection failure", exc_info=True)
            connected = self._connection is not None and not self._connection.is_closed
            if self._stopping.is_set() and connected:
                break  # still connected: the drain acks on this channel, then aclose() closes it
            await self._close_connection()
            if self._stopping.is_set():
                break
            delay = backoff.next_delay()
            log.warning(
                "amqp: connection to %s lost or refused; retry %d in %.1fs",
                display_url(self._settings.url),
                backoff.attempts,
                delay,
            )
            try:
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            except TimeoutError:
                pass

    async def _connect_and_consume(self) -> None:
        connection = await aio_pika.connect(
            self._settings.connection_url(),
            timeout=self._settings.connect_timeout,
            client_properties={"connection_name": self._connection_name},
        )
        self._connection = connection
        channel = await connection.channel(publisher_confirms=False)
        per_consumer = max(1, self._settings.prefetch // len(self._sources))
        await channel.set_qos(prefetch_count=per_consumer)
        for source in self._sources:
            if source.declare:
                await self._declare(channel, source)
        raw = await channel.get_underlay_channel()
        self._channel = raw
        for source in self._sources:
            consume_ok = await raw.basic_consume(
                source.queue, self._callback_for(source.queue), no_ack=False
            )
            self._consumer_tags[source.queue] = consume_ok.consumer_tag or ""
        self._health.set_broker("amqp", True)
        self._metrics.broker_up.labels(broker="amqp").set(1)
        self._health.set_consumers(len(self._consumer_tags))
        log.info(
            "amqp: consuming %s from %s",
            ", ".join(s.queue for s in self._sources),
            display_url(self._settings.url),
        )

    @staticmethod
    async def _declare(channel: aio_pika.abc.AbstractChannel, source: Source) -> None:
        queue = await channel.declare_queue(
            source.queue, durable=True, arguments=source.queue_arguments() or None
        )
        for binding in source.bindings:
            exchange = await channel.declare_exchange(
                binding.exchange, type=binding.exchange_type, durable=True
            )
            await queue.bind(exchange, routing_key=binding.routing_key)

    def _callback_for(self, queue: str) -> Callable[[DeliveredMessage], Any]:
        deliver, clock = self._deliver, self._clock

        async def on_message(delivered: DeliveredMessage) -> None:
            tag: int = delivered.delivery.delivery_tag  # type: ignore[union-attr,assignment]
            deliver(Delivery(to_message(delivered, queue), tag, delivered.channel, clock()))

        return on_message

    async def _watch(self) -> None:
        """Return when the connection, the channel or any consumer is gone, or on stop."""
        while not self._stopping.is_set():
            problem = self._problem()
            if problem:
                self._down(problem)
                return
            try:
                async with asyncio.timeout(WATCH_INTERVAL_S):
                    await self._stopping.wait()
            except TimeoutError:
                pass

    def _problem(self) -> str:
        connection, channel = self._connection, self._channel
        if connection is None or connection.is_closed:
            return "connection closed"
        if channel is None or channel.is_closed:
            return "channel closed"
        consumers = getattr(channel, "consumers", {})  # aiormq's Channel, not its ABC, has it
        live = [tag for tag in self._consumer_tags.values() if tag in consumers]
        if len(live) < len(self._sources):
            self._health.set_consumers(len(live))
            return "consumer cancelled by the broker"
        return ""

    def _down(self, detail: str) -> None:
        if self._health.set_broker("amqp", False, detail):
            log.warning("amqp: down: %s", detail)
        self._metrics.broker_up.labels(broker="amqp").set(0)
        self._health.set_consumers(0)

    async def stop_consuming(self, *, within: float = 5.0) -> None:
        """Cancel the consumers; deliveries already received stay for the pipeline to finish."""
        self._stopping.set()
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        for tag in list(self._consumer_tags.values()):
            try:
                cancelled, _ = await bounded(channel.basic_cancel(tag), within)
            except Exception as exc:  # the channel went away: nothing more will be delivered
                log.warning("amqp: cancelling consumer %s failed: %s", tag, exc)
                continue
            if not cancelled:
                log.warning("amqp: cancelling consumer %s timed out", tag)
        self._health.set_consumers(0)

    async def _close_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._consumer_tags.clear()
        if connection is not None and not connection.is_closed:
            try:
                await bounded(connection.close(), CLOSE_TIMEOUT_S)
            except Exception as exc:  # closing a broken connection may fail in any way
                log.debug("amqp: close failed: %s", exc)

    async def aclose(self) -> None:
        self._stopping.set()
        await self._close_connection()
        self._health.set_broker("amqp", False, "closed")
        self._metrics.broker_up.labels(broker="amqp").set(0)
