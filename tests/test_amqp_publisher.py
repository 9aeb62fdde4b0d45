"""The publishing side of the project's AMQP client: the frames it writes and reads, as tables
against pamqp's own encoding, then the publisher against RabbitMQ."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pamqp import commands as spec
from pamqp import frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pydantic import SecretStr

from proxy.amqp import frames as wire
from proxy.amqp.endpoint import Endpoint
from proxy.amqp.publisher import (
    ACCEPTED,
    NACKED,
    Outgoing,
    Publisher,
    Refused,
    Returned,
    _returned_position,
    _Round,
)
from proxy.config import AmqpSettings
from proxy.errors import TransientError
from proxy.message import RawProperties
from proxy.sinks.amqp_exchange import AmqpExchangeSink
from tests.helpers import AMQP_URL, delete_queues, unique
from tests.raw_client import RawClient

# --- frames, both ways ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        spec.Basic.Ack(1, False),
        spec.Basic.Ack(2**62 + 1, True),
        spec.Basic.Nack(7, False, True),
        spec.Basic.Nack(8, True, False),
    ],
    ids=["ack", "ack-multiple-large-tag", "nack", "nack-multiple"],
)
def test_a_confirm_reads_as_pamqp_writes_it(method: Any) -> None:
    payload = frame.marshal(method, 1)[7:-1]
    kind = wire.method_id(payload)
    assert kind == (wire.BASIC_ACK if isinstance(method, spec.Basic.Ack) else wire.BASIC_NACK)
    assert wire.decode_confirm(payload) == (method.delivery_tag, method.multiple)


@pytest.mark.parametrize("size", [0, 1, 131_064, 131_065, 300_000], ids=str)
def test_a_publish_is_the_frames_pamqp_would_write(size: int) -> None:
    """Method, header and body frames, the body cut at the negotiated frame size."""
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    header = wire.content_header(spec.Basic.Properties(message_id="m", delivery_mode=2), size)
    data = wire.frame(wire.FRAME_METHOD, 1, wire.publish_method("x", "k")) + b"".join(
        wire.content_frames(1, header, body, 131_072)
    )
    expected = [spec.Basic.Publish(exchange="x", routing_key="k", mandatory=True)]
    expected.append(ContentHeader(0, size, spec.Basic.Properties(message_id="m", delivery_mode=2)))
    read: list[Any] = []
    while data:
        used, channel, value = frame.unmarshal(data)
        assert channel == 1 and used <= 131_072
        read.append(value)
        data = data[used:]
    assert [type(v) for v in read[:2]] == [type(v) for v in expected]
    assert (read[0].exchange, read[0].routing_key, read[0].mandatory) == ("x", "k", True)
    assert read[1].body_size == size and read[1].properties.message_id == "m"
    chunks = read[2:]
    assert all(isinstance(c, ContentBody) for c in chunks)
    assert b"".join(c.value for c in chunks) == body
    assert len(chunks) == -(-size // 131_064)


# --- settling a round (no broker) -----------------------------------------------------------------


def outgoing(body: bytes = b"b", header: bytes = b"h", key: str = "k") -> Outgoing:
    return Outgoing("x", key, header, body)


@pytest.mark.parametrize(
    ("confirms", "expected", "done"),
    [
        pytest.param([(True, 4, True)], ["a", "a", "a", "a"], True, id="one-multiple-ack"),
        pytest.param(
            [(True, 2, False), (True, 1, False), (False, 4, True)], ["a", "a", "n", "n"], True,
            id="out-of-order-then-multiple-nack",
        ),
        pytest.param([(True, 3, False), (True, 3, False)], [None, None, "a", None], False,
                     id="repeat-counts-once"),
        pytest.param([(True, 9, False)], [None] * 4, False, id="unknown-tag-ignored"),
        pytest.param([(True, 1, True), (True, 2, True), (True, 9, True)], ["a"] * 4, True,
                     id="multiple-past-the-end"),
    ],
)  # fmt: skip
async def test_confirms_settle_their_tags(
    confirms: list[tuple[bool, int, bool]], expected: list[str | None], done: bool
) -> None:
    round_ = _Round([outgoing()] * 4, first_tag=1, loop=asyncio.get_running_loop())
    for acked, tag, multiple in confirms:
        round_.settle(tag - 1, acked, multiple=multiple)
    names = {True: "a", False: "n", None: None}
    assert [names[a] for a in round_.acked] == expected
    assert round_.done.done() is done and round_.pending == expected.count(None)
    if done:
        results = round_.results(unmatched_return=False)
        assert results == [ACCEPTED if e == "a" else NACKED for e in expected]


def returned(body: bytes, raw: RawProperties | None, key: str = "k") -> dict[str, Any]:
    return {"exchange": "x", "routing_key": key, "body": body, "raw_properties": raw}


RAW = RawProperties(0x0080, b"", b"", b"\x01m")
EXACT = wire.returned_header(RAW, 1)


@pytest.mark.parametrize(
    ("items", "settled", "cursor", "back", "position"),
    [
        pytest.param([outgoing(b"b", b"other"), outgoing(b"b", EXACT)], [], 0,
                     returned(b"b", RAW), 1, id="the-same-header-wins"),
        pytest.param([outgoing(b"b", b"other"), outgoing(b"b", b"other2")], [], 0,
                     returned(b"b", RAW), 0, id="else-the-earliest-same-body"),
        pytest.param([outgoing(b"b", EXACT), outgoing(b"b", EXACT)], [], 1,
                     returned(b"b", RAW), 1, id="after-the-last-matched"),
        pytest.param([outgoing(b"b", EXACT), outgoing(b"b", EXACT)], [0], 0,
                     returned(b"b", RAW), 1, id="not-a-settled-one"),
        pytest.param([outgoing(b"a"), outgoing(b"c")], [0], 0,
                     returned(b"zzz", None), 1, id="the-only-one-left"),
        pytest.param([outgoing(b"a"), outgoing(b"c")], [], 0,
                     returned(b"zzz", None), None, id="no-match"),
        pytest.param([outgoing(b"b", EXACT, key="k1")], [], 0,
                     returned(b"b", RAW, key="k2"), 0, id="only-one-open-even-if-unlike"),
    ],
)  # fmt: skip
async def test_a_return_belongs_to_the_earliest_open_publish_like_it(
    items: list[Outgoing], settled: list[int], cursor: int, back: dict[str, Any], position: int
) -> None:
    round_ = _Round(items, first_tag=1, loop=asyncio.get_running_loop())
    for index in settled:
        round_.settle(index, True, multiple=False)
    round_.cursor = cursor
    assert _returned_position(round_, back) == position


async def test_an_unmatched_return_makes_the_accepted_ones_unsure() -> None:
    round_ = _Round([outgoing(), outgoing()], first_tag=1, loop=asyncio.get_running_loop())
    round_.returned[1] = "312 NO_ROUTE"
    round_.settle(1, True, multiple=True)
    assert round_.results(unmatched_return=False) == [ACCEPTED, Returned("312 NO_ROUTE")]
    assert round_.results(unmatched_return=True) == [
        Refused("a basic.return could not be matched"),
        Returned("312 NO_ROUTE"),
    ]


# --- against RabbitMQ -----------------------------------------------------------------------------


@pytest.fixture
async def publisher() -> AsyncIterator[Publisher]:
    endpoint = Endpoint.from_url(AMQP_URL, heartbeat=10)
    async with asyncio.timeout(10):
        publisher = await Publisher.open(endpoint, connection_name="test publisher")
    yield publisher
    await publisher.close(2.0)


@pytest.mark.broker
async def test_the_publishing_socket_has_tcp_keepalive(publisher: Publisher) -> None:
    transport = publisher.connection._transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


@pytest.mark.broker
async def test_a_large_round_and_a_large_body_are_confirmed_and_arrive_whole(
    publisher: Publisher,
) -> None:
    queue = unique("q-pub")
    await publisher.connection.declare_queue(queue, None)
    try:
        big = bytes(range(256)) * 1200  # 307,200 bytes: three body frames
        header = wire.content_header(spec.Basic.Properties(message_id="big"), len(big))
        items = [Outgoing("", queue, header, big)]
        for i in range(2000):
            body = f"m-{i}".encode()
            small = wire.content_header(spec.Basic.Properties(), len(body))
            items.append(Outgoing("", queue, small, body))
        results = await publisher.publish(items, confirm_within=10)
        assert results == [ACCEPTED] * len(items)
        async with RawClient() as client:
            first = await client.get(queue)
            assert first is not None and first[2] == big and first[1] == header
    finally:
        await delete_queues(queue)


@pytest.mark.broker
async def test_a_refusal_ends_the_connection_with_the_rest_refused(publisher: Publisher) -> None:
    missing = unique("no-such-exchange")
    header = wire.content_header(spec.Basic.Properties(), 1)
    results = await publisher.publish(
        [Outgoing(missing, "k", header, b"1"), Outgoing("amq.topic", "k", header, b"2")],
        confirm_within=5,
    )
    assert all(isinstance(r, Refused) and r.detail.startswith("404 NOT_FOUND") for r in results)
    assert missing in results[0].detail  # type: ignore[union-attr]
    assert publisher.is_closed


@pytest.mark.broker
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param(
            "amqp://guest:not-the-password@127.0.0.1:5672/%2F", "403 ACCESS_REFUSED", id="password"
        ),
        pytest.param("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "530 NOT_ALLOWED",
                     id="vhost"),
    ],
)  # fmt: skip
async def test_a_refused_login_says_why_and_never_the_password(url: str, reason: str) -> None:
    sink = AmqpExchangeSink(AmqpSettings(url=SecretStr(url), connect_timeout=5))
    with pytest.raises(TransientError) as caught:
        await sink.ping()
    assert reason in str(caught.value)
    assert "not-the-password" not in str(caught.value)
    await sink.aclose()
