"""AMQP exchanges: mandatory, publisher-confirmed publishes, one round trip per batch.

What lands on the exchange is CONTRACT.md section 3: body and every property unchanged, headers
unchanged plus ``x-message-proxy-hops``. A batch is written to the channel as one buffer and its
confirms are awaited together; nothing is reported accepted before RabbitMQ confirmed it.

Why publish frames are written here rather than with aiormq's ``basic_publish``:

- ``basic_publish`` gives every message without a ``message_id`` a random one: a property the
  relay must not change.
- aiormq matches a ``basic.return`` to its publish by ``message_id``; a return of a message
  without one is dropped (its ack then reads as success: a silent loss), and two publishes in
  flight with the same ``message_id`` are confused (one lost, the other dead-lettered).
- pamqp writes every float header as a 32-bit float and cannot write a non-UTF-8 long string.

So the sink marshals the frames itself, takes delivery tags, puts a confirmation record per publish
in the aiormq channel's own table (its reader settles them on ack and nack; ``channel.closing``
tells when the channel or connection went away), and replaces the channel's ``basic.return``
handler. Returns are matched by order: RabbitMQ sends a ``basic.return`` before the ``basic.ack``
of the same publish, and returns in publish order, so a return belongs to the earliest publish in
flight, after the last matched one, with the same exchange, routing key, ``message_id`` and body,
preferring one whose properties also match. Publishes equal in all of these are indistinguishable
downstream, so picking the earlier is exact; a return that matches nothing (never seen) sends the
round's accepted publishes again one at a time, where a return is unambiguous. Tested against the
aiormq version in ``uv.lock``; ``_ConfirmChannel`` and ``_Confirm`` are the only code that knows.

Outcomes: a return is ``unroutable``; a nack is retried ``NACK_ATTEMPTS`` times, then
``rejected``; a channel closed by the broker over one publish (no such exchange, access refused,
``user_id`` not ours) is found by publishing the unconfirmed rest one at a time, and that one is
``rejected``. A lost connection or a confirm slower than ``publish_timeout`` is transient.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import aio_pika
import aiormq
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelLockedResource,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
)
from pamqp import commands as spec
from pamqp import encode as pamqp_encode
from pamqp.header import ContentHeader

from proxy.config import AmqpSettings, display_url
from proxy.encoding import DeadLetterInfo, dead_letter_headers
from proxy.errors import PermanentError, TransientError
from proxy.message import HOPS_HEADER, Message, RawProperties
from proxy.routing import ExchangeTarget
from proxy.sinks import Outcome, Publish

log = logging.getLogger(__name__)

NACK_ATTEMPTS = 3
NACK_RETRY_DELAY_S = 0.05
CLOSE_TIMEOUT_S = 2.0

# The broker closed the channel because of one publish; the connection is fine.
_REFUSALS = (
    ChannelAccessRefused,
    ChannelNotFoundEntity,
    ChannelLockedResource,
    ChannelPreconditionFailed,
)


class UnsupportedClient(RuntimeError):
    """The installed aiormq does not have what ``_ConfirmChannel`` relies on: fatal, not retried."""


# --- Message -> properties -------------------------------------------------------------------


def message_properties(
    message: Message, dead_letter: DeadLetterInfo | None = None
) -> spec.Basic.Properties:
    """The properties to publish: the message's own, headers plus the hop count (and the facts of
    a dead letter)."""
    headers = dict(message.headers)
    headers[HOPS_HEADER] = message.hops + 1
    if dead_letter is not None:
        headers.update(dead_letter_headers(dead_letter))
    return spec.Basic.Properties(
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=headers,
        delivery_mode=message.delivery_mode,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message.message_id,
        timestamp=message.timestamp,
        message_type=message.type,
        user_id=message.user_id,
        app_id=message.app_id,
    )


# --- wire encoding ---------------------------------------------------------------------------

_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_DOUBLE = struct.Struct(">d")
_FRAME_HEAD = struct.Struct(">BHI")
_HEADER_HEAD = struct.Struct(">HHQH")
_PUBLISH_HEAD = struct.Struct(">HHH")
_FRAME_END = b"\xce"
_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY = 1, 2, 3
_BASIC_CLASS, _BASIC_PUBLISH = 60, 40
_MANDATORY = b"\x01"


def _shortstr(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"{value[:40]!r}... is longer than 255 bytes")
    return _U8.pack(len(raw)) + raw


def _longstr(raw: bytes) -> bytes:
    return _U32.pack(len(raw)) + raw


def _seconds(value: datetime) -> int:
    if value.tzinfo is None:
        return calendar.timegm(value.timetuple())  # naive datetimes are UTC, as pamqp reads them
    return int(value.timestamp())


def _field_value(value: Any) -> bytes:
    """One field-table value, as RabbitMQ and pamqp read it back to the same Python value."""
    if isinstance(value, str):
        return b"S" + _longstr(value.encode())
    if isinstance(value, bool):
        return b"t" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return pamqp_encode.table_integer(value)
    if isinstance(value, float):
        return b"d" + _DOUBLE.pack(value)  # a double: pamqp would narrow it to 32 bits
    if isinstance(value, bytes):
        return b"S" + _longstr(value)  # pamqp's reading of a long string that is not UTF-8
    if isinstance(value, bytearray):
        return b"x" + _longstr(bytes(value))
    if isinstance(value, Decimal):
        return b"D" + pamqp_encode.decimal(value)
    if isinstance(value, datetime):
        return b"T" + _U64.pack(_seconds(value))
    if isinstance(value, Mapping):
        return b"F" + field_table(value)
    if isinstance(value, list | tuple):
        return b"A" + _longstr(b"".join(_field_value(item) for item in value))
    if value is None:
        return b"V"
    raise TypeError(f"a header value of type {type(value).__name__} cannot be sent")


def field_table(table: Mapping[str, Any]) -> bytes:
    """An AMQP field table, keys in their given order."""
    parts: list[bytes] = []
    append = parts.append
    for key, value in table.items():
        append(_shortstr(key))
        if type(value) is str:  # by far the most common: inline
            raw = value.encode()
            append(b"S" + _U32.pack(len(raw)) + raw)
            continue
        try:
            append(_field_value(value))
        except TypeError as exc:
            raise TypeError(f"header {key!r}: {exc}") from None
    return _longstr(b"".join(parts))


def _identity_properties(p: spec.Basic.Properties, append: Callable[[bytes], None]) -> int:
    """The properties after priority, in wire order; returns their flags."""
    flags = 0
    if p.correlation_id is not None:
        flags |= 0x0400
        append(_shortstr(p.correlation_id))
    if p.reply_to is not None:
        flags |= 0x0200
        append(_shortstr(p.reply_to))
    if p.expiration is not None:
        flags |= 0x0100
        append(_shortstr(p.expiration))
    if p.message_id is not None:
        flags |= 0x0080
        append(_shortstr(p.message_id))
    if p.timestamp is not None:
        flags |= 0x0040
        append(_U64.pack(_seconds(p.timestamp)))
    if p.message_type is not None:
        flags |= 0x0020
        append(_shortstr(p.message_type))
    if p.user_id is not None:
        flags |= 0x0010
        append(_shortstr(p.user_id))
    if p.app_id is not None:
        flags |= 0x0008
        append(_shortstr(p.app_id))
    return flags


def content_header(properties: spec.Basic.Properties, body_size: int) -> bytes:
    """The payload of a content header frame (class, weight, body size, flags, properties)."""
    p = properties
    flags = 0
    parts: list[bytes] = []
    append = parts.append
    # Straight-line on purpose: this runs once per message. Flag order is the wire order.
    if p.content_type is not None:
        flags |= 0x8000
        append(_shortstr(p.content_type))
    if p.content_encoding is not None:
        flags |= 0x4000
        append(_shortstr(p.content_encoding))
    if p.headers is not None:
        flags |= 0x2000
        append(field_table(p.headers))
    if p.delivery_mode is not None:
        flags |= 0x1000
        append(_U8.pack(p.delivery_mode))
    if p.priority is not None:
        flags |= 0x0800
        append(_U8.pack(p.priority))
    flags |= _identity_properties(p, append)
    return _HEADER_HEAD.pack(_BASIC_CLASS, 0, body_size, flags) + b"".join(parts)


_FIRST_HOP = _shortstr(HOPS_HEADER) + pamqp_encode.table_integer(1)
_HEADERS_FLAG = 0x2000


def passed_on_header(raw: RawProperties, body_size: int) -> bytes:
    """The content header of a message on its first hop: its properties as delivered, byte for
    byte, with the hop count appended to its header table (where a dict update puts it)."""
    entries = raw.headers[4:] + _FIRST_HOP
    table = _U32.pack(len(entries)) + entries
    head = _HEADER_HEAD.pack(_BASIC_CLASS, 0, body_size, raw.flags | _HEADERS_FLAG)
    return b"".join((head, raw.before_headers, table, raw.after_headers))


def publish_header(message: Message, dead_letter: DeadLetterInfo | None = None) -> bytes:
    """The content header to publish: passed on as delivered where it can be, else encoded from
    the message's fields (a dead letter, a message that already counts hops, one built here)."""
    raw = message.raw_properties
    if raw is not None and dead_letter is None and HOPS_HEADER not in message.headers:
        return passed_on_header(raw, len(message.body))
    return content_header(message_properties(message, dead_letter), len(message.body))


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(kind, channel, len(payload)) + payload + _FRAME_END


def publish_method(exchange: str, routing_key: str) -> bytes:
    """The payload of a mandatory ``basic.publish`` method frame."""
    return (
        _PUBLISH_HEAD.pack(_BASIC_CLASS, _BASIC_PUBLISH, 0)
        + _shortstr(exchange)
        + _shortstr(routing_key)
        + _MANDATORY
    )


@dataclass(slots=True, eq=False)
class _Encoded:
    """One publish, encoded independently of the channel it goes out on."""

    index: int  # position in the batch
    exchange: str
    routing_key: str
    message_id: str | None
    body: bytes
    header: bytes  # content header payload


def encode(index: int, item: Publish) -> _Encoded:
    """Raises ``ValueError`` or ``TypeError`` when the message cannot be put on the wire."""
    target = item.target
    if not isinstance(target, ExchangeTarget):
        raise TypeError(f"AmqpExchangeSink cannot publish to {target!r}")
    message = item.message
    _shortstr(target.exchange)
    _shortstr(target.routing_key)
    header = publish_header(message, item.dead_letter)
    return _Encoded(
        index, target.exchange, target.routing_key, message.message_id, message.body, header
    )


# --- one confirm-mode channel ----------------------------------------------------------------


class _Round:
    """The confirms of one write: ``done`` resolves when every publish was acked or nacked."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.confirms: list[_Confirm] = []
        self.pending = 0
        self.done: asyncio.Future[None] = loop.create_future()
        self.unmatched_return = False

    def settled(self) -> None:
        self.pending -= 1
        if self.pending == 0 and not self.done.done():
            self.done.set_result(None)


class _Confirm:
    """One publish's entry in the aiormq channel's confirmation table.

    It stands in for the asyncio future aiormq expects there (``done``, ``set_result`` on ack,
    ``set_exception`` on nack): a future per message, in aiormq's future store, cost a tenth of
    the relay's CPU. A closed channel is seen through ``channel.closing`` instead.
    """

    __slots__ = ("acked", "error", "item", "returned", "round")

    def __init__(self, item: _Encoded, round_: _Round) -> None:
        self.item = item
        self.round = round_
        self.acked: bool | None = None  # None until the broker answers
        self.error: BaseException | None = None
        self.returned: str | None = None  # "reply-code reply-text" of a basic.return

    def done(self) -> bool:
        return self.acked is not None

    def cancelled(self) -> bool:
        return False

    def set_result(self, _frame: object) -> None:
        if self.acked is None:
            self.acked = True
            self.round.settled()

    def set_exception(self, error: BaseException) -> None:
        if self.acked is None:
            self.acked, self.error = False, error
            self.round.settled()


class _ConfirmChannel:
    """Publishes frames on an aiormq channel in confirm mode; matches returns by order."""

    def __init__(self, wrapper: aio_pika.abc.AbstractChannel, raw: aiormq.Channel) -> None:
        self._wrapper = wrapper  # strong reference: aio-pika closes a channel it collects
        self.raw = raw
        self._methods: dict[tuple[str, str], bytes] = {}
        self._in_flight: list[_Confirm] = []
        self._cursor = 0
        # The channel's reader looks the handler up on the instance for every basic.return.
        setattr(raw, "_on_return_frame", self._on_return_frame)  # noqa: B010

    @classmethod
    async def open(cls, connection: aio_pika.abc.AbstractConnection) -> _ConfirmChannel:
        wrapper = await connection.channel(publisher_confirms=True, on_return_raises=False)
        raw = await wrapper.get_underlay_channel()
        if not isinstance(raw, aiormq.Channel) or not isinstance(
            getattr(raw, "confirmations", None), dict
        ):
            raise UnsupportedClient(f"aiormq channel {type(raw).__name__}; see uv.lock")
        return cls(wrapper, raw)

    @property
    def is_closed(self) -> bool:
        return self.raw.is_closed

    def _method(self, exchange: str, routing_key: str) -> bytes:
        key = (exchange, routing_key)
        frame = self._methods.get(key)
        if frame is None:
            if len(self._methods) >= 4096:
                self._methods.clear()
            frame = _frame(_FRAME_METHOD, self.raw.number, publish_method(exchange, routing_key))
            self._methods[key] = frame
        return frame

    def _frames(self, item: _Encoded) -> Iterable[bytes]:
        number = self.raw.number
        yield self._method(item.exchange, item.routing_key)
        yield _frame(_FRAME_HEADER, number, item.header)
        body, size = item.body, self.raw.max_content_size
        for start in range(0, len(body), size):
            yield _frame(_FRAME_BODY, number, body[start : start + size])

    async def send(self, items: Sequence[_Encoded]) -> _Round:
        """Write every publish as one buffer; the round completes on the last ack or nack."""
        raw = self.raw
        round_ = _Round(raw.loop)
        confirms = round_.confirms
        table: dict[int, Any] = raw.confirmations
        chunks: list[bytes] = []
        async with raw.lock:  # delivery tags are taken in the order frames reach the broker
            for item in items:
                raw.delivery_tag += 1
                confirm = _Confirm(item, round_)
                table[raw.delivery_tag] = confirm
                confirms.append(confirm)
                chunks.extend(self._frames(item))
            round_.pending = len(confirms)
            self._in_flight, self._cursor = confirms, 0
            await raw.write_queue.put(ChannelFrame(payload=b"".join(chunks), should_close=False))
        return round_

    async def _on_return_frame(self, frame: spec.Basic.Return) -> None:
        header = await self.raw._get_frame()
        if not isinstance(header, ContentHeader):
            raise ValueError(f"unexpected frame {header!r} after basic.return")
        returned = await self.raw._read_content(frame, header)
        try:
            self._match_return(frame, returned)
        except Exception:  # the channel's reader must survive whatever happens here
            log.exception("amqp_out: could not match a returned message")

    def _match_return(self, frame: spec.Basic.Return, returned: DeliveredMessage) -> None:
        properties, body = returned.header.properties, returned.body
        try:
            header: bytes | None = content_header(properties, len(body))
        except (ValueError, TypeError):
            header = None
        in_flight = self._in_flight
        chosen: int | None = None
        for position in range(self._cursor, len(in_flight)):
            sent = in_flight[position]
            item = sent.item
            if (
                sent.returned is None
                and not sent.done()
                and item.exchange == frame.exchange
                and item.routing_key == frame.routing_key
                and item.message_id == properties.message_id
                and item.body == body
            ):
                if item.header == header:
                    chosen = position
                    break
                if chosen is None:  # same body, other properties: only if nothing fits better
                    chosen = position
        if chosen is None:
            unsettled = [i for i, c in enumerate(in_flight) if not c.done() and c.returned is None]
            if len(unsettled) != 1:
                # Cannot tell which: the round publishes its accepted items again, one at a time.
                if in_flight:
                    in_flight[0].round.unmatched_return = True
                log.warning(
                    "amqp_out: a returned message (exchange %r, routing key %r) matched no publish",
                    frame.exchange,
                    frame.routing_key,
                )
                return
            chosen = unsettled[0]
        in_flight[chosen].returned = f"{frame.reply_code} {frame.reply_text}"
        self._cursor = chosen + 1


# --- connection state ------------------------------------------------------------------------


@dataclass(slots=True)
class _Down:
    reason: str
    since: float


class _Link:
    """One publishing connection and its current confirm-mode channel."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, channel: _ConfirmChannel):
        self.connection = connection
        self.channel = channel

    @property
    def connected(self) -> bool:
        return not self.connection.is_closed

    async def usable_channel(self) -> _ConfirmChannel:
        """The channel, reopened when the broker closed it over one publish."""
        if self.channel.is_closed:
            self.channel = await _ConfirmChannel.open(self.connection)
        return self.channel

    async def close(self) -> None:
        if not self.connection.is_closed:
            await self.connection.close()


# --- results of one round --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Accepted:
    pass


@dataclass(frozen=True, slots=True)
class _Returned:
    detail: str


@dataclass(frozen=True, slots=True)
class _Nacked:
    pass


@dataclass(frozen=True, slots=True)
class _Refused:
    detail: str  # the broker closed the channel: this publish or one before it


_Result = _Accepted | _Returned | _Nacked | _Refused
_ACCEPTED, _NACKED = _Accepted(), _Nacked()


class AmqpExchangeSink:
    """Publishes to exchanges over its own connection (never the consuming one)."""

    def __init__(
        self, settings: AmqpSettings, *, connection_name: str = "message-proxy publisher"
    ) -> None:
        self._settings = settings
        self._connection_name = connection_name
        self._state: _Link | _Down = _Down("not connected yet", time.monotonic())
        self._closed = False
        self._connect_lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()

    @property
    def broker(self) -> str:
        return "amqp_out"

    async def connect(self) -> None:
        await self._link()

    async def ping(self) -> None:
        """Reconnects when the connection is gone; heartbeats and publish timeouts see stalls."""
        await self._link()

    async def aclose(self) -> None:
        self._closed = True
        await self._lose("closed")

    # --- connection ---

    async def _link(self) -> _Link:
        state = self._state
        if isinstance(state, _Link) and state.connected:
            return state
        async with self._connect_lock:
            state = self._state
            if isinstance(state, _Link) and state.connected:
                return state
            if self._closed:
                raise TransientError("amqp_out: the sink is closed")
            if isinstance(state, _Link):
                await self._lose("connection lost")
            self._state = link = await self._open()
            log.info("amqp_out: connected to %s", display_url(self._settings.url))
            return link

    async def _open(self) -> _Link:
        settings = self._settings
        connection: aio_pika.abc.AbstractConnection | None = None
        try:
            async with asyncio.timeout(settings.connect_timeout):
                connection = await aio_pika.connect(
                    settings.connection_url(),  # with the heartbeat, like the source
                    timeout=settings.connect_timeout,
                    client_properties={"connection_name": self._connection_name},
                )
                channel = await _ConfirmChannel.open(connection)
        except BaseException as exc:
            if connection is not None:
                await _close_quietly(connection.close())
            # aiormq surfaces a connection dropped mid-handshake as many types (even
            # StopAsyncIteration): every one means "retry later".
            if isinstance(exc, Exception) and not isinstance(exc, UnsupportedClient):
                log.debug("amqp_out: connect failed", exc_info=True)
                raise TransientError(
                    f"amqp_out: cannot connect to {display_url(settings.url)}: {_text(exc)}"
                ) from exc
            raise
        return _Link(connection, channel)

    async def _lose(self, reason: str) -> None:
        state = self._state
        self._state = _Down(reason, time.monotonic())
        if isinstance(state, _Link):
            await _close_quietly(state.close())

    # --- publishing ---

    async def publish_batch(self, items: Sequence[Publish]) -> list[Outcome]:
        outcomes: list[Outcome] = [None] * len(items)
        todo: list[_Encoded] = []
        for index, item in enumerate(items):
            try:
                todo.append(encode(index, item))
            except (ValueError, TypeError, OverflowError, struct.error) as exc:
                if not isinstance(item.target, ExchangeTarget):
                    raise
                outcomes[index] = PermanentError("rejected", f"cannot be encoded: {exc}")
        async with self._publish_lock:
            attempt = 0
            while todo:
                attempt += 1
                nacked = await self._publish_once(todo, outcomes)
                if nacked and attempt >= NACK_ATTEMPTS:
                    for encoded in nacked:
                        outcomes[encoded.index] = PermanentError(
                            "rejected", f"the broker nacked it {attempt} times"
                        )
                    break
                todo = nacked
                if todo:
                    await asyncio.sleep(NACK_RETRY_DELAY_S * attempt)
        return outcomes

    async def _publish_once(
        self, todo: Sequence[_Encoded], outcomes: list[Outcome]
    ) -> list[_Encoded]:
        """One round for ``todo`` (and one more for each refused item); returns the nacked."""
        nacked: list[_Encoded] = []
        refused: list[_Encoded] = []
        for encoded, result in zip(todo, await self._round(todo), strict=True):
            self._settle(encoded, result, outcomes, nacked, refused)
        # The broker closed the channel over one of these; alone, each shows whether it was it.
        for encoded in refused:
            (result,) = await self._round([encoded])
            if isinstance(result, _Refused):
                outcomes[encoded.index] = PermanentError("rejected", result.detail)
            else:
                self._settle(encoded, result, outcomes, nacked, [])
        return nacked

    @staticmethod
    def _settle(
        item: _Encoded,
        result: _Result,
        outcomes: list[Outcome],
        nacked: list[_Encoded],
        refused: list[_Encoded],
    ) -> None:
        if isinstance(result, _Returned):
            outcomes[item.index] = PermanentError("unroutable", f"returned: {result.detail}")
        elif isinstance(result, _Nacked):
            nacked.append(item)
        elif isinstance(result, _Refused):
            refused.append(item)

    async def _round(self, items: Sequence[_Encoded]) -> list[_Result]:
        """Publish ``items`` pipelined and wait for every confirm; raises ``TransientError``."""
        link = await self._link()
        timeout = self._settings.publish_timeout
        closing: asyncio.Future[Any] | None = None
        try:
            async with asyncio.timeout(timeout):
                channel = await link.usable_channel()
                round_ = await channel.send(items)
                closing = channel.raw.closing
                await asyncio.wait((round_.done, closing), return_when=asyncio.FIRST_COMPLETED)
        except UnsupportedClient:
            raise
        except TimeoutError as exc:
            await self._lose("publish timed out")
            raise TransientError(f"amqp_out: no publisher confirm within {timeout:g}s") from exc
        except Exception as exc:  # any failure to write means the link is unusable
            log.debug("amqp_out: publish failed", exc_info=True)
            await self._lose(_text(exc))
            raise TransientError(f"amqp_out: {_text(exc)}") from exc
        finally:
            if closing is not None:
                closing.cancel()  # only this observer; a no-op once the channel has closed
        if round_.pending:
            return await self._after_close(round_, channel, link)
        results = [_outcome(confirm) for confirm in round_.confirms]
        if round_.unmatched_return and len(results) > 1:
            unsure = _Refused("a basic.return could not be matched")
            return [unsure if r is _ACCEPTED else r for r in results]
        return results

    async def _after_close(
        self, round_: _Round, channel: _ConfirmChannel, link: _Link
    ) -> list[_Result]:
        """The channel closed with publishes unconfirmed: refused, or the connection is lost."""
        reason = channel.raw.closing
        error = None if reason.cancelled() else reason.exception()
        if isinstance(error, _REFUSALS) and link.connected:
            refused = _Refused(_text(error))
            return [_outcome(c) if c.done() else refused for c in round_.confirms]
        detail = _text(error) if error is not None else "channel closed"
        await self._lose(detail)
        raise TransientError(f"amqp_out: lost before the confirm: {detail}") from error


def _outcome(confirm: _Confirm) -> _Result:
    if confirm.acked:
        return _Returned(confirm.returned) if confirm.returned is not None else _ACCEPTED
    error = confirm.error
    if isinstance(error, DeliveryError) and isinstance(error.frame, spec.Basic.Nack):
        return _NACKED
    raise TransientError(f"amqp_out: unexpected confirm failure: {error}") from error


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def _close_quietly(closing: Any) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await closing
    except Exception as exc:  # closing must go on whatever the connection does
        log.debug("amqp_out: close failed: %s", exc)
