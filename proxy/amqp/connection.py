"""A small AMQP 0-9-1 client: one connection, one working channel, no tasks.

The source's cost per message is the client library's, not ours: aiormq reads every frame
through a stream reader, a lock and a queue, decodes it with pamqp's general decoder and starts
a Task per delivery (~30 us of the stream bridge's ~85 us per message). This client is an
``asyncio.Protocol``: ``data_received`` cuts the bytes into frames, decodes a delivery's three
frames by hand (``frames``) and hands the message to the consumer's callback synchronously.
Acks and rejects are single writes. Everything else (handshake, qos, declarations, consume,
cancel, close) is a plain request and reply, one at a time.

The publishing side (``publisher``) uses the same connection through three hooks that the
consumer leaves unset: ``on_confirm`` (publisher confirms), ``on_return`` (a mandatory publish
given back, assembled from its frames like a delivery) and ``on_blocked`` (``connection.blocked``
and ``connection.unblocked``, also kept in ``blocked``), and writes its frames with ``write``.

Beside the working channel, declarations may go on a side channel (``side=True``), where a
refusal closes that channel alone. With ``max_inflight_bytes`` the connection stops reading its
socket while the bodies delivered and not settled fill it (``flow``). When it ends the
connection itself (the working channel closed by the broker, a broken frame) it says so with
``connection.close`` and waits briefly for close-ok. Where to connect and the socket's options
are ``endpoint``'s. It does not reconnect: its owner's loop does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pamqp import commands as spec
from pamqp.base import Frame

from proxy.amqp import frames as wire
from proxy.amqp.endpoint import Endpoint, keep_alive
from proxy.amqp.flow import HeldBodies
from proxy.errors import AmqpError, ChannelClosed

log = logging.getLogger(__name__)

CHANNEL = 1
# Declarations and checks go here: a refusal (404, 406) closes this channel only, not the one
# consuming, whose unacked deliveries would all go back to their queues.
SIDE_CHANNEL = 2
FRAME_MAX = 131_072
CLOSE_TIMEOUT_S = 5.0
MISSED_HEARTBEATS = 3  # as aiormq: the peer is gone after three silent intervals
# Ending a connection on our side (after a channel error): how long to wait for close-ok.
CLOSE_OK_WAIT_S = 1.0

# Called for every delivery: the message's fields (``Message``'s names, ``queue`` left to the
# caller), its delivery tag, and why its properties could not be read (None when they could).
Consumer = Callable[[dict[str, Any], int, str | None], None]
# A publisher confirm: acked (else nacked), delivery tag, multiple.
ConfirmHandler = Callable[[bool, int, bool], None]
ReplyT = TypeVar("ReplyT", bound=Frame)


class _Delivery:
    """The delivery being assembled from its method, header and body frames."""

    __slots__ = ("body_size", "chunks", "consumer", "defect", "received", "tag", "values")

    def __init__(self, consumer: Consumer, tag: int, values: dict[str, Any]) -> None:
        self.consumer = consumer
        self.tag = tag
        self.values = values
        self.body_size = -1  # until the content header arrives
        self.received = 0
        self.chunks: list[bytes] = []
        self.defect: str | None = None


class AmqpConnection(asyncio.Protocol):
    """One connection and its working channel. Open it with ``AmqpConnection.open``."""

    def __init__(
        self, endpoint: Endpoint, connection_name: str, *, max_inflight_bytes: int | None = None
    ) -> None:
        self._endpoint = endpoint
        self._connection_name = connection_name
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._reply: asyncio.Future[Frame] | None = None
        self._rpc_lock = asyncio.Lock()
        self._consumers: dict[str, Consumer] = {}
        self._next_consumer: Consumer | None = None
        self._delivery: _Delivery | None = None
        self._heartbeat = 0
        self._last_received = time.monotonic()
        self._last_sent = time.monotonic()
        self._heartbeats: asyncio.Task[None] | None = None
        self._channel_open = False
        self._side_channel_open = False
        self._handle_frames: Callable[[bytes], int] = self._frames
        self._close_ok_timer: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] = self._loop.create_future()  # the socket is gone
        # Bodies delivered and not settled; past the limit, reading stops until some are.
        self._held = HeldBodies(max_inflight_bytes) if max_inflight_bytes else None
        self._reading_paused = False
        self.on_cancel: Callable[[], None] | None = None  # the broker cancelled a consumer
        self.closed: asyncio.Future[AmqpError] = self._loop.create_future()
        self.frame_max = FRAME_MAX
        self.blocked: str | None = None  # the broker's reason while it blocks this connection
        self.on_confirm: ConfirmHandler = _no_confirms
        self.on_return: Consumer | None = None
        self.on_blocked: Callable[[str | None], None] | None = None

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return f"<AmqpConnection {self._endpoint.host}:{self._endpoint.port} {state}>"

    # --- opening ---

    @classmethod
    async def open(
        cls, endpoint: Endpoint, *, connection_name: str, max_inflight_bytes: int | None = None
    ) -> AmqpConnection:
        """Connect, authenticate, open the channel; the caller bounds it with a timeout.

        ``max_inflight_bytes``: stop reading the socket while the bodies delivered and not yet
        settled add up to this many bytes (``flow``); None for no limit.
        """
        loop = asyncio.get_running_loop()
        connection = cls(endpoint, connection_name, max_inflight_bytes=max_inflight_bytes)
        # Expect connection.start before the socket exists: it may come before open() resumes.
        connection._reply = loop.create_future()
        try:
            transport, _ = await loop.create_connection(
                lambda: connection,
                endpoint.host,
                endpoint.port,
                ssl=endpoint.tls,
                server_hostname=(endpoint.server_name or endpoint.host) if endpoint.tls else None,
            )
            keep_alive(transport.get_extra_info("socket"), endpoint.heartbeat)
            await connection._handshake()
        except BaseException:
            connection.abort(AmqpError("not opened"))
            raise
        return connection

    async def _handshake(self) -> None:
        if self._reply is None:
            raise AmqpError("no reply expected")
        start = _expected(await self._reply, spec.Connection.Start)
        mechanisms = start.mechanisms.split() if isinstance(start.mechanisms, str) else []
        if "PLAIN" not in mechanisms:
            raise AmqpError(f"the broker offers no PLAIN login (offers {start.mechanisms})")
        endpoint = self._endpoint
        tune = await self._call(
            0,
            spec.Connection.StartOk(
                client_properties=self._client_properties(),
                mechanism="PLAIN",
                response=f"\0{endpoint.username}\0{endpoint.password}",
                locale="en_US",
            ),
            spec.Connection.Tune,
        )
        self._heartbeat = endpoint.heartbeat  # ours, as aiormq does: 0 turns heartbeats off
        self.frame_max = _negotiate(tune.frame_max, FRAME_MAX)
        self._send(
            wire.method_frame(
                0,
                spec.Connection.TuneOk(
                    channel_max=_negotiate(tune.channel_max, SIDE_CHANNEL),
                    frame_max=self.frame_max,
                    heartbeat=self._heartbeat,
                ),
            )
        )
        if self._heartbeat:
            self._heartbeats = self._loop.create_task(self._beat())
        await self._call(
            0, spec.Connection.Open(virtual_host=endpoint.vhost), spec.Connection.OpenOk
        )
        await self._call(CHANNEL, spec.Channel.Open(), spec.Channel.OpenOk)
        self._channel_open = True

    def _client_properties(self) -> dict[str, Any]:
        return {
            "product": "message-proxy",
            "connection_name": self._connection_name,
            "capabilities": {
                "authentication_failure_close": True,
                "consumer_cancel_notify": True,
                "connection.blocked": True,
                "basic.nack": True,
            },
        }

    # --- requests ---

    async def qos(self, prefetch_count: int) -> None:
        await self._call(CHANNEL, spec.Basic.Qos(prefetch_count=prefetch_count), spec.Basic.QosOk)

    # Declarations take ``side=True`` to go on the side channel: a refusal raises AmqpError with
    # the broker's reason and closes that channel alone (reopened by the next side request).

    async def declare_queue(
        self,
        queue: str,
        arguments: dict[str, Any] | None,
        *,
        passive: bool = False,
        side: bool = False,
    ) -> spec.Queue.DeclareOk:
        """Declare a durable queue; ``passive``: only check that it exists. The reply carries
        the queue's message and consumer counts."""
        method = spec.Queue.Declare(queue=queue, passive=passive, durable=True, arguments=arguments)
        return await self._call(await self._channel(side), method, spec.Queue.DeclareOk)

    async def declare_exchange(
        self, exchange: str, exchange_type: str, *, side: bool = False, passive: bool = False
    ) -> None:
        """Declare a durable exchange; ``passive``: only check that it exists."""
        method = spec.Exchange.Declare(
            exchange=exchange, exchange_type=exchange_type, durable=True, passive=passive
        )
        await self._call(await self._channel(side), method, spec.Exchange.DeclareOk)

    async def bind(
        self, queue: str, exchange: str, routing_key: str, *, side: bool = False
    ) -> None:
        method = spec.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key)
        await self._call(await self._channel(side), method, spec.Queue.BindOk)

    async def _channel(self, side: bool) -> int:
        if not side:
            return CHANNEL
        if not self._side_channel_open:
            await self._call(SIDE_CHANNEL, spec.Channel.Open(), spec.Channel.OpenOk)
            self._side_channel_open = True
        return SIDE_CHANNEL

    async def confirm_select(self) -> None:
        """Put the channel in confirm mode: every publish from now on is acked or nacked."""
        await self._call(CHANNEL, spec.Confirm.Select(), spec.Confirm.SelectOk)

    async def consume(
        self, queue: str, consumer: Consumer, *, arguments: dict[str, Any] | None = None
    ) -> str:
        """Start consuming ``queue`` (acks required); returns the consumer tag."""
        # Registered by the reader as consume-ok arrives: deliveries may follow in the same read.
        self._next_consumer = consumer
        method = spec.Basic.Consume(queue=queue, arguments=arguments)
        try:
            ok = await self._call(CHANNEL, method, spec.Basic.ConsumeOk)
        finally:
            self._next_consumer = None
        return ok.consumer_tag or ""

    async def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer; deliveries already sent still arrive and may be settled."""
        await self._call(CHANNEL, spec.Basic.Cancel(consumer_tag), spec.Basic.CancelOk)
        self._consumers.pop(consumer_tag, None)

    @property
    def consumer_tags(self) -> frozenset[str]:
        """The consumers still live (the broker cancels one whose queue is deleted)."""
        return frozenset(self._consumers)

    async def _call(self, channel: int, method: Frame, reply: type[ReplyT]) -> ReplyT:
        frame = wire.method_frame(channel, method)
        async with self._rpc_lock:
            self._reply = waiter = self._loop.create_future()
            try:
                self._send(frame)
                answer = await waiter
            finally:
                self._reply = None
        return _expected(answer, reply)

    # --- settling: one write each, no reply ---

    @property
    def is_closed(self) -> bool:
        return self.closed.done() or not self._channel_open

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        self._send(wire.ack_frame(CHANNEL, delivery_tag, multiple=multiple))
        if self._held is not None and self._held.release(delivery_tag, multiple=multiple):
            self._resume_reading()

    def reject(self, delivery_tag: int, *, requeue: bool = False) -> None:
        self._send(wire.reject_frame(CHANNEL, delivery_tag, requeue=requeue))
        if self._held is not None and self._held.release(delivery_tag, multiple=False):
            self._resume_reading()

    @property
    def reading_paused(self) -> bool:
        """True while the bodies held unacked fill ``max_inflight_bytes``: nothing is read,
        replies to requests included, until a settle frees room."""
        return self._reading_paused

    def _pause_reading(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
            self._reading_paused = True
            log.debug("amqp: %d bytes of bodies held: reading paused", self._held_bytes())

    def _resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        self._last_received = time.monotonic()  # the silence while paused was ours, not its
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
            log.debug("amqp: %d bytes of bodies held: reading again", self._held_bytes())

    def _held_bytes(self) -> int:
        return self._held.total if self._held is not None else 0

    def write(self, data: bytes) -> None:
        """Write frames as they are (publishes); raises ``AmqpError`` once closed."""
        self._send(data)

    def _send(self, data: bytes) -> None:
        if not self._send_if_open(data):
            raise AmqpError("the connection is closed")

    def _send_if_open(self, data: bytes) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing() or self.closed.done():
            return False
        transport.write(data)
        self._last_sent = time.monotonic()
        return True

    # --- closing ---

    async def close(self, within: float = CLOSE_TIMEOUT_S) -> None:
        """Close politely (the broker requeues what was not acked), within ``within`` seconds."""
        if self.closed.done():  # ended already; its socket may still wait for close-ok
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), within)
            self.abort(self.closed.result())
            return
        try:
            async with asyncio.timeout(within):
                await self._call(
                    0,
                    spec.Connection.Close(200, "closing", 0, 0),
                    spec.Connection.CloseOk,
                )
        except Exception as exc:  # whatever happens, the socket goes
            log.debug("amqp: close handshake failed: %s", exc)
        self.abort(AmqpError("closed"))

    def abort(self, reason: AmqpError) -> None:
        """Drop the connection at once; the broker requeues what was not acked."""
        self._finish(reason)
        if self._transport is not None:
            self._transport.abort()

    def _end(self, reason: AmqpError, reply_code: int, reply_text: str) -> None:
        """End the connection from our side, telling the broker why: ``connection.close``, then
        the socket once close-ok arrives or ``CLOSE_OK_WAIT_S`` has passed. A socket closed
        without it is "client unexpectedly closed TCP connection" in the broker's log."""
        close = spec.Connection.Close(reply_code, _short(reply_text), 0, 0)
        sent = self._send_if_open(wire.method_frame(0, close))
        self._finish(reason)
        transport = self._transport
        if transport is None:
            return
        if sent:
            self._close_ok_timer = self._loop.call_later(CLOSE_OK_WAIT_S, transport.close)
        else:
            transport.close()

    def _finish(self, reason: AmqpError) -> None:
        self._channel_open = False
        self._handle_frames = self._frames_after_close  # nothing more is delivered or answered
        if not self.closed.done():
            self.closed.set_result(reason)
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(reason)
            self._reply.exception()  # its waiter, if any, still gets it; no "never retrieved"
        if self._heartbeats is not None:
            self._heartbeats.cancel()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._transport.write(wire.PROTOCOL_HEADER)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_ok_timer is not None:
            self._close_ok_timer.cancel()
        if not self._lost.done():
            self._lost.set_result(None)
        self._finish(AmqpError(f"connection lost: {exc}" if exc else "connection lost"))

    def data_received(self, data: bytes) -> None:
        self._last_received = time.monotonic()
        buffer = self._buffer
        if buffer:
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        try:
            consumed = self._handle_frames(data)
        except Exception as exc:  # a broken frame, or a bug: this connection cannot go on
            if self.closed.done():  # already ending: whatever is left does not matter
                self.abort(self.closed.result())
                return
            log.exception("amqp: dropping the connection: %s", exc)
            self._end(AmqpError(f"protocol error: {exc}"), 501, f"FRAME_ERROR - {exc}")
            return
        if consumed < len(data):
            buffer += data[consumed:]

    def _frames(self, data: bytes) -> int:
        """Handle every whole frame in ``data``; returns the bytes used."""
        position, size_of_data = 0, len(data)
        head = wire.FRAME_HEAD.unpack_from
        deliver, whole_delivery = wire.DELIVER_METHOD, wire.read_delivery
        while size_of_data - position >= wire.FRAME_OVERHEAD:
            if data.startswith(deliver, position) and self._delivery is None:
                # The common case, in one pass: a delivery's three frames all in this read.
                whole = whole_delivery(data, position)
                if whole is not None:
                    consumer_tag, tag, values, after = whole
                    consumer = self._consumers.get(consumer_tag)
                    if consumer is not None:
                        self._hand_over(consumer, tag, values, None)
                        position = after
                        continue
            kind, channel, size = head(data, position)
            end = position + 7 + size
            if end >= size_of_data:
                break
            if data[end] != wire.FRAME_END:
                raise wire.FrameError(f"frame of type {kind} does not end with 0xCE")
            payload = data[position + 7 : end]
            if kind == wire.FRAME_BODY:
                self._on_body(payload)
            elif kind == wire.FRAME_METHOD:
                self._on_method(channel, payload)
                if self.closed.done():  # closed by the broker, or ending: the rest is ignored
                    rest: int = end + 1
                    return rest + self._frames_after_close(data[rest:])
            elif kind == wire.FRAME_HEADER:
                self._on_header(payload)
            elif kind != wire.FRAME_HEARTBEAT:
                raise wire.FrameError(f"unknown frame type {kind}")
            position = end + 1
        return position

    def _frames_after_close(self, data: bytes) -> int:
        """Once the connection is ending, only the broker's close-ok (or close) still counts."""
        position, size_of_data = 0, len(data)
        head = wire.FRAME_HEAD.unpack_from
        while size_of_data - position >= wire.FRAME_OVERHEAD:
            kind, channel, size = head(data, position)
            end = position + 7 + size
            if end >= size_of_data:
                break
            if kind == wire.FRAME_METHOD and channel == 0:
                method = wire.decode_method(data[position + 7 : end])
                if isinstance(method, spec.Connection.Close):
                    self._send_raw(wire.method_frame(0, spec.Connection.CloseOk()))
                if isinstance(method, spec.Connection.Close | spec.Connection.CloseOk):
                    if self._transport is not None:
                        self._transport.close()
            position = end + 1
        return position

    def _send_raw(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _on_method(self, channel: int, payload: bytes) -> None:
        kind = wire.method_id(payload)
        if kind in _CONFIRMS:
            self.on_confirm(kind == wire.BASIC_ACK, *wire.decode_confirm(payload))
            return
        if kind == wire.BASIC_DELIVER:
            consumer_tag, tag, values = wire.decode_deliver(payload)
            consumer = self._consumers.get(consumer_tag)
            if consumer is None:
                # Sent before our cancel reached the broker. Given back now: left unsettled, a
                # later multiple ack would take it with the rest, and it would be lost.
                self._send(wire.reject_frame(channel, tag, requeue=True))
                consumer = _ignore
            self._delivery = _Delivery(consumer, tag, values)
            return
        method = wire.decode_method(payload)
        if isinstance(method, _PUBLISHER_NOTICES):
            self._on_publisher_notice(method)
        elif isinstance(method, spec.Connection.Close):
            self._send_if_open(wire.method_frame(0, spec.Connection.CloseOk()))
            self._finish(
                AmqpError(f"closed by the broker: {method.reply_code} {method.reply_text}")
            )
            if self._transport is not None:
                self._transport.close()  # after the reply is written
        elif isinstance(method, spec.Channel.Close):
            self._on_channel_close(channel, method)
        elif isinstance(method, spec.Basic.Cancel):
            self._on_cancel(channel, method)
        elif self._reply is not None and not self._reply.done():
            if isinstance(method, spec.Basic.ConsumeOk) and self._next_consumer is not None:
                self._consumers[method.consumer_tag or ""] = self._next_consumer
            self._reply.set_result(method)
        else:
            log.warning("amqp: unexpected %s from the broker", method.name)

    def _on_publisher_notice(self, method: Frame) -> None:
        if isinstance(method, spec.Basic.Return):  # its content frames follow, as a delivery's
            values = {
                "reply_code": method.reply_code,
                "reply_text": method.reply_text,
                "exchange": method.exchange,
                "routing_key": method.routing_key,
            }
            self._delivery = _Delivery(self.on_return or _ignore, 0, values)
            return
        # connection.blocked and unblocked: sent to publishing connections only.
        blocked = None
        if isinstance(method, spec.Connection.Blocked):
            blocked = method.reason or "blocked"
        self.blocked = blocked
        if self.on_blocked is not None:
            self.on_blocked(blocked)

    def _on_cancel(self, channel: int, method: spec.Basic.Cancel) -> None:
        """The broker cancelled a consumer: its queue was deleted, or similar."""
        self._consumers.pop(method.consumer_tag or "", None)
        if not method.nowait:
            self._send_if_open(wire.method_frame(channel, spec.Basic.CancelOk(method.consumer_tag)))
        if self.on_cancel is not None:
            self.on_cancel()

    def _on_channel_close(self, channel: int, method: spec.Channel.Close) -> None:
        error = ChannelClosed(method.reply_code or 0, method.reply_text or "")
        self._send_if_open(wire.method_frame(channel, spec.Channel.CloseOk()))
        if channel == SIDE_CHANNEL:  # a refused declaration: the consuming channel goes on
            self._side_channel_open = False
            if self._reply is not None and not self._reply.done():
                self._reply.set_exception(error)
            return
        # The channel is the connection's reason to be: it ends too, politely.
        self._end(error, 200, f"{error.reply_code} {error.reply_text}")

    def _on_header(self, payload: bytes) -> None:
        delivery = self._delivery
        if delivery is None or delivery.body_size >= 0:
            raise wire.FrameError("content header without a delivery")
        try:
            delivery.body_size, properties = wire.decode_content_header(payload)
        except wire.FrameError as exc:  # one bad message: dead-lettered, not a dropped connection
            delivery.body_size, properties = wire.body_size(payload), wire.NO_PROPERTIES
            delivery.defect = f"its properties cannot be read: {exc}"
        delivery.values.update(properties)
        if delivery.body_size == 0:
            self._deliver(delivery, b"")

    def _on_body(self, payload: bytes) -> None:
        delivery = self._delivery
        if delivery is None or delivery.body_size < 0:
            raise wire.FrameError("content body without a delivery")
        if delivery.received == 0 and len(payload) == delivery.body_size:
            self._deliver(delivery, payload)
            return
        delivery.chunks.append(payload)
        delivery.received += len(payload)
        if delivery.received >= delivery.body_size:
            self._deliver(delivery, b"".join(delivery.chunks))

    def _deliver(self, delivery: _Delivery, body: bytes) -> None:
        self._delivery = None
        delivery.values["body"] = body
        self._hand_over(delivery.consumer, delivery.tag, delivery.values, delivery.defect)

    def _hand_over(
        self, consumer: Consumer, tag: int, values: dict[str, Any], defect: str | None
    ) -> None:
        held = self._held
        if held is not None and consumer is not _ignore:
            if held.hold(tag, len(values["body"])) and not self._reading_paused:
                self._pause_reading()  # takes effect after this read: the rest of it is handled
        consumer(values, tag, defect)

    # --- heartbeats ---

    async def _beat(self) -> None:
        interval = self._heartbeat / 2
        while not self.closed.done():
            await asyncio.sleep(interval)
            now = time.monotonic()
            silent = now - self._last_received
            # While reading is paused, by our choice, what the broker sent waits unread.
            if not self._reading_paused and silent > self._heartbeat * MISSED_HEARTBEATS:
                self.abort(AmqpError(f"no frame from the broker in {silent:.0f}s"))
                return
            if now - self._last_sent >= interval:
                self._send_if_open(wire.HEARTBEAT)


def _short(text: str) -> str:
    """A reply text that fits AMQP's short string (255 bytes)."""
    return text.encode()[:255].decode(errors="ignore")


_CONFIRMS = (wire.BASIC_ACK, wire.BASIC_NACK)
_PUBLISHER_NOTICES = (spec.Basic.Return, spec.Connection.Blocked, spec.Connection.Unblocked)


def _negotiate(server: int, client: int) -> int:
    """RabbitMQ's rule: the smaller of the two, unless one side has no limit (0)."""
    if server == 0 or client == 0:
        return max(server, client)
    return min(server, client)


def _expected(answer: Frame, reply: type[ReplyT]) -> ReplyT:
    if not isinstance(answer, reply):
        raise AmqpError(f"expected {reply.__name__}, the broker sent {answer.name}")
    return answer


def _ignore(_values: dict[str, Any], _tag: int, _defect: str | None) -> None:
    return None


def _no_confirms(_acked: bool, _delivery_tag: int, _multiple: bool) -> None:
    log.warning("amqp: a publisher confirm on a connection that does not publish")
