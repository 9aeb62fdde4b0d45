"""AMQP exchanges: mandatory, publisher-confirmed publishes, one round trip per batch.

What lands on the exchange is the message as delivered: its body, and its content header byte for
byte except the entries of its header table that the relay owns: ``x-message-proxy-hops`` (set
where it already is, else appended) and, for a dead letter, the ``x-message-proxy-*`` facts of
the failure, spliced in the same way. Only a message built here, with no delivered properties,
is encoded from its fields. A batch is written as one buffer on the project's own client
(``proxy.amqp.publisher``) and its confirms are awaited together; nothing is reported accepted
before RabbitMQ confirmed it.

Outcomes: a return is ``unroutable``; a nack is retried ``NACK_ATTEMPTS`` times, then ``rejected``;
a channel closed by the broker over one publish (no such exchange, access refused, ``user_id`` not
ours) is found by publishing the unconfirmed rest one at a time, and that one is ``rejected``
(when the exchange is missing, so are the batch's other publishes to it, without trying each).
A lost connection, or a confirm slower than ``publish_timeout``, is transient. A connection that
RabbitMQ blocks (a memory or disk alarm) holds the batch as written, with no deadline and no
reconnect, and ``ping`` reports it down with the broker's reason until it is unblocked.

With several nodes (a cluster), a connection lost or refused goes on with the next node in this
process's shuffled order (``proxy.amqp.nodes``); a connect fails only once every node was tried,
and the caller's backoff applies from there.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pamqp import commands as spec

from proxy.amqp.frames import content_header, passed_on_header
from proxy.amqp.nodes import Node, NodeRotation, nodes_of
from proxy.amqp.publisher import Nacked, Outgoing, Publisher, Refused, Result, Returned
from proxy.amqp.tables import field_value, integer, short_string
from proxy.config import AmqpSettings
from proxy.encoding import DeadLetterInfo, dead_letter_headers
from proxy.errors import AmqpError, ChannelClosed, PermanentError, TransientError
from proxy.message import HOPS_HEADER, Message
from proxy.routing import ExchangeTarget
from proxy.sinks import Outcome, Publish

log = logging.getLogger(__name__)

NACK_ATTEMPTS = 3
NACK_RETRY_DELAY_S = 0.05
CLOSE_TIMEOUT_S = 2.0


# --- message -> what is published ------------------------------------------------------------


def message_properties(
    message: Message, dead_letter: DeadLetterInfo | None = None
) -> spec.Basic.Properties:
    """The properties of a message built here: its own, headers plus the hop count (and the
    facts of a dead letter)."""
    headers: dict[Any, Any] = dict(message.headers)  # pamqp's type says str keys; ours are not
    headers[HOPS_HEADER] = message.hops + 1
    if dead_letter is not None:
        headers.update(dead_letter_headers(dead_letter, message))
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


_FIRST_HOP = integer(1)
_FIRST_HOP_ONLY = {HOPS_HEADER: _FIRST_HOP}


def publish_header(message: Message, dead_letter: DeadLetterInfo | None = None) -> bytes:
    """The content header to publish: the delivered one with the relay's own entries set, or,
    for a message built here, encoded from its fields."""
    raw = message.raw_properties
    if raw is None:
        return content_header(message_properties(message, dead_letter), len(message.body))
    headers = message.headers
    if dead_letter is None and HOPS_HEADER not in headers:  # nearly every message: a first hop
        return passed_on_header(raw, len(message.body), _FIRST_HOP_ONLY, present=False)
    hops = message.hops
    owned = {HOPS_HEADER: _FIRST_HOP if hops == 0 else integer(hops + 1)}
    if dead_letter is not None:
        for name, value in dead_letter_headers(dead_letter, message).items():
            owned[name] = field_value(value)
    present = any(name in headers for name in owned)
    return passed_on_header(raw, len(message.body), owned, present=present)


def encode(item: Publish) -> Outgoing:
    """Raises ``ValueError`` or ``TypeError`` when the message cannot be put on the wire."""
    target = item.target
    if not isinstance(target, ExchangeTarget):
        raise TypeError(f"AmqpExchangeSink cannot publish to {target!r}")
    _fits_short_string(target.exchange)
    _fits_short_string(target.routing_key)
    message = item.message
    header = publish_header(message, item.dead_letter)
    # Outgoing(...) without the NamedTuple's Python-level __new__: once per message.
    return _new_tuple(Outgoing, (target.exchange, target.routing_key, header, message.body))


_new_tuple = tuple.__new__


def _fits_short_string(text: str) -> None:
    """Raises ``ValueError`` when ``text`` is longer than a short string's 255 bytes (63
    characters or fewer always fit: UTF-8 takes at most 4 bytes for one)."""
    if len(text) > 63:
        short_string(text)


# --- connection state ------------------------------------------------------------------------


@dataclass(slots=True)
class _Down:
    reason: str
    since: float


@dataclass(slots=True)
class _Up:
    publisher: Publisher
    node: Node


class AmqpExchangeSink:
    """Publishes to exchanges over its own connection (never the consuming one)."""

    def __init__(
        self,
        settings: AmqpSettings,
        *,
        connection_name: str = "message-proxy publisher",
        declare: Iterable[str] = (),
        nodes: NodeRotation | None = None,
    ) -> None:
        self._settings = settings
        self._connection_name = connection_name
        self._declare = tuple(dict.fromkeys(declare))
        self._nodes = nodes or NodeRotation(nodes_of(settings))
        self._state: _Up | _Down = _Down("not connected yet", time.monotonic())
        self._closed = False
        self._connect_lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()

    def __repr__(self) -> str:
        state = self._state
        if isinstance(state, _Up):
            return f"<AmqpExchangeSink {state.node.address}>"
        return f"<AmqpExchangeSink down: {state.reason}>"

    @property
    def broker(self) -> str:
        return "amqp_out"

    @property
    def node(self) -> str:
        state = self._state
        return state.node.address if isinstance(state, _Up) else ""

    async def connect(self) -> None:
        await self._link()

    async def ping(self) -> None:
        """Reconnects when the connection is gone; raises ``TransientError`` while it is down or
        blocked by the broker (heartbeats and the confirm deadline see stalls)."""
        up = await self._link()
        reason = up.publisher.blocked
        if reason is not None:
            raise TransientError(
                f"amqp_out: blocked: {reason} (publishes wait until unblocked; "
                f"on {up.node.address})"
            )

    async def aclose(self) -> None:
        self._closed = True
        state = self._state
        self._state = _Down("closed", time.monotonic())
        if isinstance(state, _Up):
            await self._drop(state, "closed")

    async def declare_too(self, exchanges: Sequence[str]) -> None:
        """Declare each of ``exchanges`` not declared yet now (a reload added them), and all of
        them on every connect from now on. On the connection's side channel, so a refusal costs
        nothing else. Raises ``TransientError`` while the broker cannot be reached, and
        ``PermanentError`` with the broker's reason when it refuses one; the list of exchanges
        declared on connect is then left as it was."""
        wanted = tuple(dict.fromkeys(exchanges))
        new = [name for name in wanted if name not in self._declare]
        if new:
            up = await self._link()
            for name in new:
                try:
                    async with asyncio.timeout(self._settings.connect_timeout):
                        await up.publisher.connection.declare_exchange(name, "topic", side=True)
                except ChannelClosed as exc:
                    raise PermanentError(
                        "rejected", f"exchange {name!r}: {exc.reply_code} {exc.reply_text}"
                    ) from None
                except (AmqpError, TimeoutError) as exc:
                    raise TransientError(f"amqp_out: declaring {name!r}: {_text(exc)}") from exc
        self._declare = wanted

    # --- connection ---

    async def _link(self) -> _Up:
        state = self._state
        if isinstance(state, _Up) and not state.publisher.is_closed:
            return state
        async with self._connect_lock:
            state = self._state
            if isinstance(state, _Up) and not state.publisher.is_closed:
                return state
            if self._closed:
                raise TransientError("amqp_out: the sink is closed")
            if isinstance(state, _Up):
                await self._drop(state, _closed_reason(state.publisher))
            while True:  # every node once, in this process's order, before the caller backs off
                node = self._nodes.current
                try:
                    up = await self._open(node)
                except TransientError as exc:
                    if self._nodes.failed():
                        raise
                    log.warning("amqp_out: %s; trying %s", exc, self._nodes.current.address)
                    continue
                self._nodes.connected()
                self._state = up
                log.info("amqp_out: connected to %s", node.shown)
                return up

    async def _open(self, node: Node) -> _Up:
        settings = self._settings
        publisher: Publisher | None = None
        try:
            async with asyncio.timeout(settings.connect_timeout):
                publisher = await Publisher.open(
                    node.endpoint, connection_name=self._connection_name
                )
                for exchange in self._declare:
                    await publisher.declare_exchange(exchange, "topic")
        except Exception as exc:  # refused, reset, closed by the broker, TLS: all mean "retry"
            if publisher is not None:
                publisher.abort("not opened")
            log.debug("amqp_out: connect failed", exc_info=True)
            detail = _text(exc) if not isinstance(exc, TimeoutError) else "timed out"
            raise TransientError(f"amqp_out: cannot connect to {node.shown}: {detail}") from exc
        return _Up(publisher, node)

    async def _drop(self, up: _Up, reason: str, *, lost: bool = True) -> None:
        """Close ``up``; the sink is down unless a newer link (a ping's) has replaced it. A link
        ``lost`` (not one the broker closed over a refused publish) sends the next connect to
        the next node."""
        if self._state is up:
            self._state = _Down(reason, time.monotonic())
            if lost and not self._closed and up.node is self._nodes.current:
                self._nodes.failed()
        try:
            await up.publisher.close(CLOSE_TIMEOUT_S)
        except Exception as exc:  # closing must go on whatever the connection does
            log.debug("amqp_out: close failed: %s", exc)

    # --- publishing ---

    async def publish_batch(self, items: Sequence[Publish]) -> list[Outcome]:
        outcomes: list[Outcome] = [None] * len(items)
        todo: list[tuple[int, Outgoing]] = []
        for index, item in enumerate(items):
            try:
                todo.append((index, encode(item)))
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
                    for index, _ in nacked:
                        outcomes[index] = PermanentError(
                            "rejected", f"the broker nacked it {attempt} times"
                        )
                    break
                todo = nacked
                if todo:
                    await asyncio.sleep(NACK_RETRY_DELAY_S * attempt)
        return outcomes

    async def _publish_once(
        self, todo: Sequence[tuple[int, Outgoing]], outcomes: list[Outcome]
    ) -> list[tuple[int, Outgoing]]:
        """One round for ``todo`` (and one more for each refused item); returns the nacked."""
        nacked: list[tuple[int, Outgoing]] = []
        refused: list[tuple[int, Outgoing]] = []
        results = await self._round([item for _, item in todo])
        for entry, result in zip(todo, results, strict=True):
            _settle(entry, result, outcomes, nacked, refused)
        # The broker closed the channel over one of these; alone, each shows whether it was it.
        missing: dict[str, str] = {}  # exchange -> why, once one publish found it missing
        for entry in refused:
            index, item = entry
            if item.exchange in missing:
                outcomes[index] = PermanentError("rejected", missing[item.exchange])
                continue
            (result,) = await self._round([item])
            if isinstance(result, Refused):
                outcomes[index] = PermanentError("rejected", result.detail)
                if result.detail.startswith("404 ") and f"'{item.exchange}'" in result.detail:
                    missing[item.exchange] = result.detail
            else:
                _settle(entry, result, outcomes, nacked, [])
        return nacked

    async def _round(self, items: Sequence[Outgoing]) -> list[Result]:
        """Publish ``items`` and wait for every confirm; raises ``TransientError``."""
        state = self._state
        if isinstance(state, _Up) and state.publisher.is_closed:
            # Lost since the last round, not by our doing: reported once, so that the batch is
            # held and readiness shows it; the retry reconnects.
            reason = _closed_reason(state.publisher)
            await self._drop(state, reason)
            raise TransientError(f"amqp_out: connection to {state.node.address} lost: {reason}")
        up = await self._link()
        timeout = self._settings.publish_timeout
        try:
            results = await up.publisher.publish(items, confirm_within=timeout)
        except TimeoutError as exc:
            await self._drop(up, "publish timed out")
            raise TransientError(
                f"amqp_out: no publisher confirm within {timeout:g}s from {up.node.address}"
            ) from exc
        except AmqpError as exc:
            await self._drop(up, _text(exc))
            raise TransientError(
                f"amqp_out: {up.node.address} lost before the confirm: {_text(exc)}"
            ) from exc
        if up.publisher.is_closed:  # refused: the broker closed the channel, and so the link
            await self._drop(up, _closed_reason(up.publisher), lost=False)
        return results


def _settle(
    entry: tuple[int, Outgoing],
    result: Result,
    outcomes: list[Outcome],
    nacked: list[tuple[int, Outgoing]],
    refused: list[tuple[int, Outgoing]],
) -> None:
    if isinstance(result, Returned):
        outcomes[entry[0]] = PermanentError("unroutable", f"returned: {result.detail}")
    elif isinstance(result, Nacked):
        nacked.append(entry)
    elif isinstance(result, Refused):
        refused.append(entry)


def _closed_reason(publisher: Publisher) -> str:
    closed = publisher.connection.closed
    return _text(closed.result()) if closed.done() else "connection closed"


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
