"""The exchange sink: the property mapping and wire encoding as tables, then against RabbitMQ."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aio_pika
import pytest
from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.header import ContentHeader
from pydantic import SecretStr

from proxy.amqp.frames import content_header, publish_method
from proxy.amqp.tables import field_table
from proxy.config import AmqpSettings
from proxy.encoding import DeadLetterInfo
from proxy.errors import PermanentError, TransientError
from proxy.message import HOPS_HEADER, Message
from proxy.routing import ExchangeTarget, StreamTarget
from proxy.sinks import Publish
from proxy.sinks.amqp_exchange import NACK_ATTEMPTS, AmqpExchangeSink, message_properties
from tests.helpers import AMQP_URL, amqp_url_via, unique
from tests.tcp_proxy import TcpProxy

STAMP = datetime(2026, 11, 28, 12, 30, 5, tzinfo=UTC)
DEAD = DeadLetterInfo("unroutable", "exchange 'x' returned it\nsecond line", "orders", 1_700_000)


# --- the property mapping (no broker) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "amqp_name"),
    [
        pytest.param("content_type", "application/json", "content_type", id="content-type"),
        pytest.param("content_encoding", "gzip", "content_encoding", id="content-encoding"),
        pytest.param("delivery_mode", 2, "delivery_mode", id="persistent"),
        pytest.param("delivery_mode", 1, "delivery_mode", id="transient"),
        pytest.param("priority", 0, "priority", id="priority-0"),
        pytest.param("priority", 9, "priority", id="priority-9"),
        pytest.param("correlation_id", "c-1", "correlation_id", id="correlation-id"),
        pytest.param("reply_to", "amq.rabbitmq.reply-to", "reply_to", id="reply-to"),
        pytest.param("expiration", "60000", "expiration", id="expiration"),
        pytest.param("message_id", "m-1", "message_id", id="message-id"),
        pytest.param("message_id", "", "message_id", id="empty-message-id"),
        pytest.param("timestamp", STAMP, "timestamp", id="timestamp"),
        pytest.param("type", "order.created", "message_type", id="type"),
        pytest.param("user_id", "guest", "user_id", id="user-id"),
        pytest.param("app_id", "shop", "app_id", id="app-id"),
        pytest.param(None, None, None, id="bare"),
    ],
)
def test_every_property_is_carried_unchanged(field: str | None, value: Any, amqp_name: str) -> None:
    message = Message(b"", **({field: value} if field else {}))
    properties = message_properties(message)
    names = [n for n in spec.Basic.Properties.__slots__ if n not in ("headers", "cluster_id")]
    present = {n: getattr(properties, n) for n in names if getattr(properties, n) is not None}
    assert present == ({amqp_name: value} if field else {})
    assert properties.headers == {HOPS_HEADER: 1}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({}, {HOPS_HEADER: 1}, id="first-hop"),
        pytest.param({"tenant": "acme"}, {"tenant": "acme", HOPS_HEADER: 1}, id="kept"),
        pytest.param({HOPS_HEADER: 3}, {HOPS_HEADER: 4}, id="counted"),
        pytest.param({HOPS_HEADER: "7"}, {HOPS_HEADER: 8}, id="text-count"),
        pytest.param({HOPS_HEADER: "junk"}, {HOPS_HEADER: 1}, id="junk-count"),
    ],
)
def test_headers_are_kept_and_hops_counted(
    headers: dict[str, Any], expected: dict[str, Any]
) -> None:
    message = Message(b"", headers=headers)
    assert message_properties(message).headers == expected
    assert dict(message.headers) == headers  # the message itself is not touched


def test_a_dead_letter_carries_its_facts_as_headers() -> None:
    message = Message(
        b"{}",
        routing_key="order.created",
        exchange="app",
        queue="events",
        headers={"tenant": "acme"},
        message_id="m-1",
        delivery_mode=2,
    )
    properties = message_properties(message, DEAD)
    assert properties.headers == {
        "tenant": "acme",
        HOPS_HEADER: 1,
        "x-message-proxy-error": "unroutable",
        "x-message-proxy-detail": "exchange 'x' returned it second line",
        "x-message-proxy-failed-at": 1_700_000,
        "x-message-proxy-route": "orders",
        # where it came from: its delivery from the dead-letter queue no longer says
        "x-message-proxy-exchange": "app",
        "x-message-proxy-routing-key": "order.created",
        "x-message-proxy-queue": "events",
    }
    assert properties.message_id == "m-1" and properties.delivery_mode == 2


# --- the wire encoding, read back by pamqp ----------------------------------------------------


def _read_back(properties: spec.Basic.Properties, body_size: int) -> ContentHeader:
    payload = content_header(properties, body_size)
    raw = b"\x02\x00\x01" + len(payload).to_bytes(4, "big") + payload + b"\xce"
    _consumed, channel, decoded = pamqp_frame.unmarshal(raw)
    assert channel == 1 and isinstance(decoded, ContentHeader)
    return decoded


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(Message(b""), id="bare"),
        pytest.param(
            Message(
                b"x" * 300,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                priority=5,
                correlation_id="c",
                reply_to="r",
                expiration="1000",
                message_id="m",
                timestamp=STAMP,
                type="t",
                user_id="guest",
                app_id="a",
                headers={"tenant": "acme"},
            ),
            id="everything",
        ),
        pytest.param(Message(b"", timestamp=datetime(2020, 1, 1)), id="naive-timestamp-is-utc"),
    ],
)
def test_the_content_header_reads_back_as_the_same_properties(message: Message) -> None:
    properties = message_properties(message)
    decoded = _read_back(properties, len(message.body))
    assert decoded.body_size == len(message.body)
    expected = {n: getattr(properties, n) for n in spec.Basic.Properties.__slots__}
    if message.timestamp is not None and message.timestamp.tzinfo is None:
        expected["timestamp"] = message.timestamp.replace(tzinfo=UTC)
    assert {n: getattr(decoded.properties, n) for n in expected} == expected


@pytest.mark.parametrize(
    ("value", "read_back"),
    [
        pytest.param("text", "text", id="str"),
        pytest.param("", "", id="empty-str"),
        pytest.param("é✓", "é✓", id="unicode"),
        pytest.param(b"\xff\x00", b"\xff\x00", id="long-string-not-utf8"),
        pytest.param(bytearray(b"\x00\x01"), bytearray(b"\x00\x01"), id="byte-array"),
        pytest.param(True, True, id="true"),
        pytest.param(False, False, id="false"),
        pytest.param(0, 0, id="zero"),
        pytest.param(-129, -129, id="short"),
        pytest.param(40_000, 40_000, id="unsigned-short"),
        pytest.param(-(2**31), -(2**31), id="long"),
        pytest.param(2**40, 2**40, id="long-long"),
        pytest.param(0.1, 0.1, id="double-keeps-precision"),
        pytest.param(Decimal("12.345"), Decimal("12.345"), id="decimal"),
        pytest.param(STAMP, STAMP, id="timestamp"),
        pytest.param(None, None, id="void"),
        pytest.param([1, "a", [2.5]], [1, "a", [2.5]], id="array"),
        pytest.param({"n": {"m": "deep"}}, {"n": {"m": "deep"}}, id="table"),
    ],
)
def test_header_values_read_back_unchanged(value: Any, read_back: Any) -> None:
    properties = spec.Basic.Properties(headers={"v": value})
    assert _read_back(properties, 0).properties.headers == {"v": read_back}


def test_header_order_is_kept() -> None:
    table = field_table({"b": 1, "a": 2, "c": 3})
    assert table.index(b"\x01b") < table.index(b"\x01a") < table.index(b"\x01c")


def test_a_header_that_cannot_be_sent_names_itself() -> None:
    with pytest.raises(TypeError, match="header 'bad'"):
        field_table({"bad": object()})


def test_publish_method_reads_back_as_mandatory_basic_publish() -> None:
    payload = publish_method("audit", "order.created")
    raw = b"\x01\x00\x02" + len(payload).to_bytes(4, "big") + payload + b"\xce"
    _consumed, _channel, decoded = pamqp_frame.unmarshal(raw)
    assert isinstance(decoded, spec.Basic.Publish)
    assert (decoded.exchange, decoded.routing_key) == ("audit", "order.created")
    assert decoded.mandatory and not decoded.immediate


# --- against RabbitMQ -------------------------------------------------------------------------


def target(exchange: str, routing_key: str) -> ExchangeTarget:
    return ExchangeTarget("r", exchange, exchange, routing_key)


def item(exchange: str, routing_key: str, body: bytes = b"{}", **props: Any) -> Publish:
    return Publish(Message(body, **props), target(exchange, routing_key))


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        yield await connection.channel()


@pytest.fixture
async def topology(amqp: aio_pika.abc.AbstractChannel) -> AsyncIterator[dict[str, str]]:
    """An exchange with ``ok.#`` bound to a queue and ``full`` to a queue that refuses more."""
    names = {"exchange": unique("x"), "queue": unique("q"), "full": unique("q-full")}
    exchange = await amqp.declare_exchange(names["exchange"], "topic", auto_delete=True)
    queue = await amqp.declare_queue(names["queue"], exclusive=True)
    await queue.bind(exchange, "ok.#")
    full = await amqp.declare_queue(
        names["full"],
        exclusive=True,
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    await full.bind(exchange, "full")
    yield names
    await amqp.exchange_delete(names["exchange"])


@pytest.fixture
async def sink() -> AsyncIterator[AmqpExchangeSink]:
    sink = AmqpExchangeSink(AmqpSettings(url=SecretStr(AMQP_URL), publish_timeout=2.0))
    yield sink
    await sink.aclose()


async def take(
    channel: aio_pika.abc.AbstractChannel, queue: str, count: int, within: float = 5.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """``count`` messages from ``queue`` (fewer on timeout), acked."""
    q = await channel.declare_queue(queue, passive=True)
    taken: list[aio_pika.abc.AbstractIncomingMessage] = []
    deadline = time.monotonic() + within
    while len(taken) < count and time.monotonic() < deadline:
        message = await q.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.02)
        else:
            taken.append(message)
    return taken


@pytest.mark.broker
async def test_a_batch_arrives_in_order_with_its_properties(
    sink: AmqpExchangeSink, amqp: aio_pika.abc.AbstractChannel, topology: dict[str, str]
) -> None:
    x = topology["exchange"]
    assert sink.broker == "amqp_out"
    items = [item(x, f"ok.{i}", f"body-{i}".encode(), message_id=f"m-{i}") for i in range(300)]
    items.append(item(x, "ok.bare", b"no id"))
    assert await sink.publish_batch(items) == [None] * 301
    got = await take(amqp, topology["queue"], 301)
    assert [m.body for m in got] == [p.message.body for p in items]
    assert [m.routing_key for m in got] == [f"ok.{i}" for i in range(300)] + ["ok.bare"]
    assert got[-1].message_id is None  # none invented
    assert all(m.headers == {HOPS_HEADER: 1} for m in got)


@pytest.mark.broker
async def test_returns_are_matched_to_their_own_publish(
    sink: AmqpExchangeSink, amqp: aio_pika.abc.AbstractChannel, topology: dict[str, str]
) -> None:
    """Returned and routed publishes interleaved, without message ids and with repeated ones."""
    x = topology["exchange"]
    plan = [
        ("ok.1", None),
        ("lost", None),
        ("ok.2", "dup"),
        ("lost", "dup"),
        ("ok.3", "dup"),
        ("lost", None),
        ("ok.4", None),
    ]
    items = [item(x, key, f"{i}".encode(), message_id=mid) for i, (key, mid) in enumerate(plan)]
    outcomes = await sink.publish_batch(items)
    reasons = [o.reason if isinstance(o, PermanentError) else None for o in outcomes]
    assert reasons == [None, "unroutable", None, "unroutable", None, "unroutable", None]
    assert "NO_ROUTE" in str(outcomes[1])
    got = await take(amqp, topology["queue"], 4)
    assert [m.body for m in got] == [b"0", b"2", b"4", b"6"]
    assert await take(amqp, topology["queue"], 1, within=0.2) == []


@pytest.mark.broker
async def test_a_return_is_told_apart_by_headers_when_all_else_is_equal(
    sink: AmqpExchangeSink, amqp: aio_pika.abc.AbstractChannel
) -> None:
    """On a headers exchange, same body, id and key: only the headers say which was returned."""
    exchange = await amqp.declare_exchange(unique("x-headers"), "headers", auto_delete=True)
    queue = await amqp.declare_queue(unique("q"), exclusive=True)
    await queue.bind(exchange, arguments={"x-match": "all", "route": "yes"})
    same: dict[str, Any] = {"body": b"same", "message_id": "same", "delivery_mode": 2}
    items = [
        item(exchange.name, "k", headers={"route": "yes"}, **same),
        item(exchange.name, "k", headers={"route": "no"}, **same),
        item(exchange.name, "k", headers={"route": "yes", "n": 2}, **same),
    ]
    outcomes = await sink.publish_batch(items)
    assert [o.reason if isinstance(o, PermanentError) else None for o in outcomes] == [
        None,
        "unroutable",
        None,
    ]
    got = await take(amqp, queue.name, 3, within=1.0)
    assert [dict(m.headers).get("n") for m in got] == [None, 2]


@pytest.mark.broker
async def test_a_nack_is_retried_then_rejected(
    sink: AmqpExchangeSink, amqp: aio_pika.abc.AbstractChannel, topology: dict[str, str]
) -> None:
    x = topology["exchange"]
    outcomes = await sink.publish_batch(
        [item(x, "full", b"fits"), item(x, "ok.1"), item(x, "full", b"too many")]
    )
    assert outcomes[:2] == [None, None]
    refused = outcomes[2]
    assert isinstance(refused, PermanentError) and refused.reason == "rejected"
    assert f"nacked it {NACK_ATTEMPTS} times" in refused.detail


@pytest.mark.broker
async def test_a_missing_exchange_rejects_that_message_only(
    sink: AmqpExchangeSink, amqp: aio_pika.abc.AbstractChannel, topology: dict[str, str]
) -> None:
    x = topology["exchange"]
    missing = unique("no-such-exchange")
    items = [item(x, "ok.1", b"1"), item(missing, "ok.2", b"2"), item(x, "ok.3", b"3")]
    outcomes = await sink.publish_batch(items)
    assert outcomes[0] is None and outcomes[2] is None
    refused = outcomes[1]
    assert isinstance(refused, PermanentError) and refused.reason == "rejected"
    assert "NOT_FOUND" in refused.detail and missing in refused.detail
    # Publishes before the refused one are published again alone: at least once.
    bodies = [m.body for m in await take(amqp, topology["queue"], 3, within=1.0)]
    assert set(bodies) == {b"1", b"3"} and bodies.count(b"3") == 1
    assert await sink.publish_batch([item(x, "ok.4", b"4")]) == [None]


@pytest.mark.broker
async def test_a_user_id_that_is_not_ours_is_rejected_not_retried(
    sink: AmqpExchangeSink, topology: dict[str, str]
) -> None:
    x = topology["exchange"]
    outcomes = await sink.publish_batch(
        [item(x, "ok.1", user_id="guest"), item(x, "ok.2", user_id="mallory")]
    )
    assert outcomes[0] is None
    refused = outcomes[1]
    assert isinstance(refused, PermanentError) and refused.reason == "rejected"
    assert "PRECONDITION_FAILED" in refused.detail


@pytest.mark.broker
async def test_a_message_that_cannot_be_encoded_is_rejected_alone(
    sink: AmqpExchangeSink, topology: dict[str, str]
) -> None:
    x = topology["exchange"]
    outcomes = await sink.publish_batch(
        [item(x, "ok.1"), item(x, "k" * 256), item(x, "ok.2", headers={"bad": object()})]
    )
    assert outcomes[0] is None
    assert [o.reason for o in outcomes[1:] if isinstance(o, PermanentError)] == ["rejected"] * 2


async def test_a_stream_target_is_a_programming_error() -> None:
    sink = AmqpExchangeSink(AmqpSettings())
    with pytest.raises(TypeError):
        await sink.publish_batch([Publish(Message(b""), StreamTarget("r", "s", "s"))])


@pytest.mark.broker
async def test_an_unreachable_broker_is_transient(topology: dict[str, str]) -> None:
    x = topology["exchange"]
    with TcpProxy("127.0.0.1", 5672) as proxy:
        proxy.cut()
        settings = AmqpSettings(url=SecretStr(amqp_url_via(proxy.port)), connect_timeout=1.0)
        sink = AmqpExchangeSink(settings)
        with pytest.raises(TransientError, match="cannot connect"):
            await sink.ping()
        with pytest.raises(TransientError):
            await sink.publish_batch([item(x, "ok.1")])
        proxy.heal()
        await sink.ping()
        assert await sink.publish_batch([item(x, "ok.1")]) == [None]
        await sink.aclose()


@pytest.mark.broker
async def test_a_lost_connection_is_transient_and_the_next_publish_reconnects(
    amqp: aio_pika.abc.AbstractChannel, topology: dict[str, str]
) -> None:
    x = topology["exchange"]
    with TcpProxy("127.0.0.1", 5672) as proxy:
        sink = AmqpExchangeSink(AmqpSettings(url=SecretStr(amqp_url_via(proxy.port))))
        await sink.connect()
        assert await sink.publish_batch([item(x, "ok.1", b"1")]) == [None]
        proxy.reset_connections()
        await asyncio.sleep(0.2)
        with pytest.raises(TransientError):
            await sink.publish_batch([item(x, "ok.2", b"2")])
        assert await sink.publish_batch([item(x, "ok.2", b"2")]) == [None]
        assert proxy.connections_total == 2
        await sink.aclose()
    assert [m.body for m in await take(amqp, topology["queue"], 2)] == [b"1", b"2"]


@pytest.mark.broker
async def test_a_stalled_broker_times_out_instead_of_hanging(topology: dict[str, str]) -> None:
    x = topology["exchange"]
    with TcpProxy("127.0.0.1", 5672) as proxy:
        settings = AmqpSettings(url=SecretStr(amqp_url_via(proxy.port)), publish_timeout=0.5)
        sink = AmqpExchangeSink(settings)
        await sink.connect()
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(TransientError, match=r"no publisher confirm within 0\.5s"):
            await sink.publish_batch([item(x, "ok.1")])
        assert time.monotonic() - started < 0.5 + 2.5  # the confirm wait plus a bounded close
        proxy.heal()
        assert await sink.publish_batch([item(x, "ok.1")]) == [None]
        await sink.aclose()
