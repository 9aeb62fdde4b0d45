"""Publishing with confirms on the project's own AMQP connection: one channel in confirm mode.

A round is a batch of publishes written as one buffer; it ends when the broker has answered each:

- ``basic.ack`` / ``basic.nack`` settle one delivery tag, or with ``multiple`` every tag up to it.
- ``basic.return`` gives back a mandatory publish no queue took. RabbitMQ sends it before that
  publish's ack, and returns in publish order, so it belongs to the earliest publish after the
  last one matched that is neither settled nor returned and carries the same exchange, routing
  key and body, preferring one whose content header is byte for byte the returned one.
  Publishes equal in all of these are indistinguishable downstream, so picking the earlier is
  exact. A return that matches nothing marks the round: the caller publishes its accepted items
  again one at a time, where a return is unambiguous.
- ``channel.close`` over one publish (a missing exchange, access refused, a ``user_id`` not
  ours) ends the connection with the publishes after it unconfirmed: they are ``Refused``
  together, and the caller tells which one it was by publishing them alone.
- ``connection.blocked`` (a memory or disk alarm): RabbitMQ stops reading the socket and holds
  what was written. The round waits without a deadline, since giving up and publishing again
  elsewhere would route both copies once the alarm clears; ``connection.unblocked`` lets it finish,
  and the confirm deadline starts again from there. ``blocked`` says why meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from proxy.amqp import frames as wire
from proxy.amqp.connection import CHANNEL, AmqpConnection
from proxy.amqp.endpoint import Endpoint
from proxy.errors import AmqpError, ChannelClosed

log = logging.getLogger(__name__)

# Reply codes of a channel closed over the publish itself: the connection was fine.
REFUSAL_CODES = frozenset({403, 404, 405, 406})
_METHOD_CACHE_SIZE = 4096


class Outgoing(NamedTuple):
    """One publish, encoded independently of the connection it goes out on (a tuple: one is
    made per message)."""

    exchange: str
    routing_key: str
    header: bytes  # the content header frame's payload
    body: bytes


@dataclass(frozen=True, slots=True)
class Accepted:
    pass


@dataclass(frozen=True, slots=True)
class Returned:
    detail: str  # "reply-code reply-text"


@dataclass(frozen=True, slots=True)
class Nacked:
    pass


@dataclass(frozen=True, slots=True)
class Refused:
    detail: str  # the broker closed the channel over this publish or one before it


Result = Accepted | Returned | Nacked | Refused
ACCEPTED, NACKED = Accepted(), Nacked()


class _Round:
    """The answers to one write, by position; ``done`` resolves when every publish is settled."""

    __slots__ = ("acked", "cursor", "done", "first_tag", "items", "low", "pending", "returned")

    def __init__(
        self, items: Sequence[Outgoing], first_tag: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.items = items
        self.first_tag = first_tag
        self.acked: list[bool | None] = [None] * len(items)  # None until the broker answers
        self.returned: list[str | None] = [None] * len(items)
        self.pending = len(items)
        self.low = 0  # every position below is settled
        self.cursor = 0  # the next return belongs here or later
        self.done: asyncio.Future[None] = loop.create_future()
        if not items:
            self.done.set_result(None)

    def settle(self, upto: int, acked: bool, *, multiple: bool) -> None:
        """Settle position ``upto`` (and with ``multiple`` every one below it)."""
        answers = self.acked
        if multiple:
            first, upto = self.low, min(upto, len(answers) - 1)
        elif 0 <= upto < len(answers):
            first = upto
        else:
            return
        for position in range(first, upto + 1):
            if answers[position] is None:
                answers[position] = acked
                self.pending -= 1
        low = self.low
        while low < len(answers) and answers[low] is not None:
            low += 1
        self.low = low
        if self.pending == 0 and not self.done.done():
            self.done.set_result(None)

    def results(self, unmatched_return: bool) -> list[Result]:
        results: list[Result] = []
        for acked, returned in zip(self.acked, self.returned, strict=True):
            if not acked:
                results.append(NACKED)
            elif returned is not None:
                results.append(Returned(returned))
            elif unmatched_return and len(self.items) > 1:
                results.append(Refused("a basic.return could not be matched"))
            else:
                results.append(ACCEPTED)
        return results


class Publisher:
    """One connection and its channel in confirm mode; one round in flight at a time."""

    def __init__(self, connection: AmqpConnection) -> None:
        self._connection = connection
        self._loop = asyncio.get_running_loop()
        self._next_tag = 1
        self._round: _Round | None = None
        self._unmatched_return = False
        self._change: asyncio.Future[None] | None = None  # resolved when blocked or unblocked
        self._methods: dict[tuple[str, str], bytes] = {}
        connection.on_confirm = self._on_confirm
        connection.on_return = self._on_return
        connection.on_blocked = self._on_blocked

    @classmethod
    async def open(cls, endpoint: Endpoint, *, connection_name: str) -> Publisher:
        """Connect and put the channel in confirm mode; the caller bounds it with a timeout."""
        connection = await AmqpConnection.open(endpoint, connection_name=connection_name)
        try:
            publisher = cls(connection)
            await connection.confirm_select()
        except BaseException:
            connection.abort(AmqpError("not opened"))
            raise
        return publisher

    def __repr__(self) -> str:
        return f"<Publisher {self._connection!r}{' blocked' if self.blocked else ''}>"

    @property
    def connection(self) -> AmqpConnection:
        return self._connection

    @property
    def is_closed(self) -> bool:
        return self._connection.is_closed

    @property
    def blocked(self) -> str | None:
        """The broker's reason while it blocks this connection (a resource alarm), else None."""
        return self._connection.blocked

    async def declare_exchange(self, exchange: str, exchange_type: str = "topic") -> None:
        await self._connection.declare_exchange(exchange, exchange_type)

    async def publish(self, items: Sequence[Outgoing], *, confirm_within: float) -> list[Result]:
        """Publish ``items`` as one write and wait until the broker answered each.

        ``confirm_within`` bounds the wait for confirms while the connection is not blocked (not
        an ``asyncio.timeout``: a blocked connection stops the clock). Raises ``TimeoutError``
        past it, and ``AmqpError`` when the connection was lost or closed for a
        reason other than one of these publishes; either way, this publisher is done.
        """
        round_ = self._send(items)
        try:
            await self._wait(round_, confirm_within)
        finally:
            self._round = None
        if round_.pending == 0:
            return round_.results(self._unmatched_return)
        error = self._connection.closed.result()
        if isinstance(error, ChannelClosed) and error.reply_code in REFUSAL_CODES:
            refused = Refused(f"{error.reply_code} {error.reply_text}")
            settled = round_.results(self._unmatched_return)
            answered = zip(settled, round_.acked, strict=True)
            return [result if acked is not None else refused for result, acked in answered]
        raise error

    async def close(self, within: float) -> None:
        await self._connection.close(within)

    def abort(self, reason: str) -> None:
        self._connection.abort(AmqpError(reason))

    # --- writing ---

    def _send(self, items: Sequence[Outgoing]) -> _Round:
        if self._round is not None:
            raise RuntimeError("a round is already in flight on this publisher")
        round_ = _Round(items, self._next_tag, self._loop)
        chunks: list[bytes] = []
        append, extend = chunks.append, chunks.extend
        method, frame_max = self._method, self._connection.frame_max
        content = wire.content_frames
        for item in items:
            append(method(item.exchange, item.routing_key))
            extend(content(CHANNEL, item.header, item.body, frame_max))
        # Tags are taken only once the write cannot fail: the broker numbers what it receives.
        self._connection.write(b"".join(chunks))
        self._next_tag += len(items)
        self._round, self._unmatched_return = round_, False
        return round_

    def _method(self, exchange: str, routing_key: str) -> bytes:
        key = (exchange, routing_key)
        frame = self._methods.get(key)
        if frame is None:
            if len(self._methods) >= _METHOD_CACHE_SIZE:
                self._methods.clear()  # routing keys with ids in them: keep memory bounded
            payload = wire.publish_method(exchange, routing_key)
            frame = self._methods[key] = wire.frame(wire.FRAME_METHOD, CHANNEL, payload)
        return frame

    async def _wait(self, round_: _Round, within: float) -> None:
        closed, loop = self._connection.closed, self._loop
        deadline = loop.time() + within
        while not round_.done.done() and not closed.done():
            change = self._change = loop.create_future()
            waiting = (round_.done, closed, change)
            if self.blocked is not None:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                deadline = loop.time() + within  # counted again from the unblock
                continue
            remaining = deadline - loop.time()
            if remaining > 0:
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    continue
            raise TimeoutError(f"no publisher confirm within {within:g}s")
        self._change = None

    # --- the broker's answers (called by the connection's reader) ---

    def _on_confirm(self, acked: bool, delivery_tag: int, multiple: bool) -> None:
        round_ = self._round
        if round_ is None:
            log.warning("amqp_out: a confirm (tag %d) with no publish in flight", delivery_tag)
            return
        round_.settle(delivery_tag - round_.first_tag, acked, multiple=multiple)

    def _on_return(self, values: dict[str, Any], _tag: int, _defect: str | None) -> None:
        round_ = self._round
        if round_ is None:
            log.warning("amqp_out: a returned message with no publish in flight")
            return
        chosen = _returned_position(round_, values)
        if chosen is None:
            self._unmatched_return = True
            log.warning(
                "amqp_out: a returned message (exchange %r, routing key %r) matched no publish",
                values["exchange"],
                values["routing_key"],
            )
            return
        round_.returned[chosen] = f"{values['reply_code']} {values['reply_text']}"
        round_.cursor = chosen + 1

    def _on_blocked(self, _reason: str | None) -> None:
        change = self._change
        if change is not None and not change.done():
            change.set_result(None)


def _returned_position(round_: _Round, values: dict[str, Any]) -> int | None:
    """Which publish of ``round_`` a ``basic.return`` gave back (see the module docstring)."""
    body, raw = values["body"], values["raw_properties"]
    header = wire.returned_header(raw, len(body)) if raw is not None else None
    exchange, routing_key = values["exchange"], values["routing_key"]
    items, acked, returned = round_.items, round_.acked, round_.returned
    chosen: int | None = None
    open_positions: list[int] = []
    for position in range(round_.cursor, len(items)):
        if acked[position] is not None or returned[position] is not None:
            continue
        open_positions.append(position)
        item = items[position]
        if item.exchange == exchange and item.routing_key == routing_key and item.body == body:
            if item.header == header:
                return position
            if chosen is None:  # the same body, other properties: only if nothing fits better
                chosen = position
    if chosen is None and len(open_positions) == 1:
        chosen = open_positions[0]  # the only publish a return can still be for
    return chosen
