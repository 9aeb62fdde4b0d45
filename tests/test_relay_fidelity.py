"""What arrives is what was sent, against the real brokers: a relayed content header is the
delivered one byte for byte except the hop count, at any hop, whatever types its table holds; a
dead letter to an exchange keeps the message's own header bytes too; and a message RabbitMQ
accepted is never dead-lettered because of how its headers are spelled."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import orjson
import pytest

from proxy.amqp.tables import entries
from tests.helpers import (
    AMQP_URL,
    WorkerProcess,
    async_wait_for,
    delete_keys,
    stream_entries,
    unique,
)
from tests.raw_client import RawClient
from tests.test_amqp_tables import entry, long, table

pytestmark = pytest.mark.broker

HOPS = b"x-message-proxy-hops"
CONTENT_TYPE = b"application/octet-stream"
MILLIS = 1_764_000_000_123  # a header timestamp in milliseconds, as some publishers send

# One entry of every type RabbitMQ accepts, with tables and arrays nested in each other.
EVERY_TYPE = [
    entry(b"t", b"t", b"\x01"),
    entry(b"b", b"b", b"\xff"),
    entry(b"B", b"B", b"\xfe"),
    entry(b"s", b"s", b"\xff\xfe"),
    entry(b"u", b"u", b"\xff\xff"),
    entry(b"I", b"I", struct.pack(">i", -5)),
    entry(b"i", b"i", b"\xff\xff\xff\xff"),
    entry(b"l", b"l", struct.pack(">q", -(2**63))),
    entry(b"L", b"L", struct.pack(">Q", 2**63 + 5)),
    entry(b"f", b"f", struct.pack(">f", 0.1)),
    entry(b"d", b"d", struct.pack(">d", 0.1)),
    entry(b"D", b"D", b"\x02" + struct.pack(">i", 1250)),
    entry(b"S", b"S", long("é".encode())),
    entry(b"x", b"x", long(b"\x00\xff")),
    entry(b"T", b"T", struct.pack(">Q", MILLIS)),
    entry(b"V", b"V"),
    entry(
        b"F",
        b"F",
        table(
            entry(b"I", b"I", struct.pack(">i", 1)),
            entry(b"k\xff", b"S", long(b"a name that is not UTF-8")),
            entry(b"A", b"A", long(b"I\x00\x00\x00\x02F" + table(entry(b"B", b"B", b"\x01")))),
        ),
    ),
    entry(b"A", b"A", long(b"b\x01u\x00\x02T" + struct.pack(">Q", MILLIS) + b"A" + long(b"V"))),
]  # fmt: skip


def hops(kind: bytes, count: int) -> bytes:
    payload = {b"b": b">b", b"B": b">B", b"s": b">h"}[kind].decode()
    return entry(HOPS, kind, struct.pack(payload, count))


def content_header(message_id: str, headers: bytes, body_size: int) -> bytes:
    """Content type, headers, delivery mode, priority, message id, a timestamp in ms, app id."""
    flags = 0x8000 | 0x2000 | 0x1000 | 0x0800 | 0x0080 | 0x0040 | 0x0008
    return (
        struct.pack(">HHQH", 60, 0, body_size, flags)
        + bytes([len(CONTENT_TYPE)]) + CONTENT_TYPE
        + headers
        + b"\x02\x05"
        + bytes([len(message_id)]) + message_id.encode()
        + struct.pack(">Q", MILLIS)
        + b"\x04shop"
    )  # fmt: skip


def header_table(header: bytes) -> tuple[bytes, bytes, bytes]:
    """(before, the header table, after) of a header ``content_header`` built."""
    start = 14 + 1 + len(CONTENT_TYPE)
    end = start + 4 + struct.unpack_from(">I", header, start)[0]
    return header[:start], header[start:end], header[end:]


@pytest.fixture
async def names() -> AsyncIterator[dict[str, str]]:
    names = {
        "queue": unique("q"),
        "source": unique("x-src"),
        "target": unique("x-dst"),
        "dlx": unique("x-dead"),
        "out": unique("q-out"),
        "dead": unique("q-dead"),
        "control": unique("q-ctl"),
        "stream": unique("s"),
        "dead_stream": unique("s-dead"),
    }
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for exchange in ("source", "target", "dlx"):
            await channel.declare_exchange(names[exchange], "topic", durable=True)
        for queue, exchange in (("out", "target"), ("dead", "dlx"), ("control", "source")):
            q = await channel.declare_queue(names[queue], durable=True)
            await q.bind(names[exchange], "#")
        yield names
        for queue in ("queue", "out", "dead", "control"):
            await channel.queue_delete(names[queue])
        for exchange in ("source", "target", "dlx"):
            await channel.exchange_delete(names[exchange])
    await delete_keys(names["stream"], names["dead_stream"])


async def take(client: RawClient, queue: str, count: int) -> dict[str, tuple[bytes, bytes]]:
    """``count`` messages by routing key: (content header payload, body)."""
    taken: dict[str, tuple[bytes, bytes]] = {}

    async def more() -> bool:
        while (got := await client.get(queue)) is not None:
            taken[got[0]] = (got[1], got[2])
        return len(taken) >= count

    await async_wait_for(more, within=15, what=f"{count} messages on {queue}")
    return taken


async def test_headers_are_byte_identical_at_every_hop_but_the_hop_count(
    tmp_path: Path, names: dict[str, str]
) -> None:
    n = len(EVERY_TYPE)
    # routing key: (the delivered table, the relayed table RabbitMQ must deliver downstream)
    plan = {
        "relay.1": (table(*EVERY_TYPE), table(*EVERY_TYPE, hops(b"b", 1))),
        "relay.2": (
            table(*EVERY_TYPE[:9], hops(b"b", 1), *EVERY_TYPE[9:]),
            table(*EVERY_TYPE[:9], hops(b"b", 2), *EVERY_TYPE[9:]),
        ),
        "relay.7": (  # counted in another integer type: only the count's own entry changes
            table(*EVERY_TYPE[:3], hops(b"B", 6), *EVERY_TYPE[3:]),
            table(*EVERY_TYPE[:3], hops(b"b", 7), *EVERY_TYPE[3:]),
        ),
    }
    dead_table = table(*EVERY_TYPE[:5], hops(b"s", 3), *EVERY_TYPE[5:])
    config = f"""
unrouted = "dead-letter"

[batch]
max_delay_ms = 5

[[sources]]
queue = "{names["queue"]}"
bindings = [ {{ exchange = "{names["source"]}", routing_key = "#" }} ]

[[routes]]
name = "relay"
match.routing_key = "relay.*"
to = [ {{ exchange = "{names["target"]}", routing_key = "{{routing_key}}" }} ]

[dead_letter]
exchange = "{names["dlx"]}"
routing_key = "dead.{{routing_key}}"
"""
    body = b"\x00\xff body"
    sent: dict[str, bytes] = {}
    with WorkerProcess(config, tmp_path, module="workers.exchange_relay", args=()) as worker:
        async with RawClient() as client:
            for key, (delivered, _) in [*plan.items(), ("other.dead", (dead_table, b""))]:
                sent[key] = content_header(key, delivered, len(body))
                await client.publish(names["source"], key, sent[key], body)
            relayed = await take(client, names["out"], 3)
            (dead_letter,) = (await take(client, names["dead"], 1)).values()
            control = await take(client, names["control"], 4)
        assert worker.stop() == 0
    # RabbitMQ itself passes a content header on byte for byte: the comparison below is fair
    assert {key: header for key, (header, _) in control.items()} == sent
    for key, (_, expected_table) in plan.items():
        header, relayed_body = relayed[key]
        assert relayed_body == body
        before, _, after = header_table(sent[key])
        assert header == before + expected_table + after, key
    # the dead letter: its own entries byte for byte, the hop count set where it was, the
    # failure's facts appended
    header, dead_body = dead_letter
    assert dead_body == body
    before, dead_letter_table, after = header_table(header)
    assert (before, after) == header_table(sent["other.dead"])[::2]
    kept = table(*EVERY_TYPE[:5], hops(b"b", 4), *EVERY_TYPE[5:])
    found = entries(dead_letter_table)
    assert [dead_letter_table[start:end] for _, start, end in found[: n + 1]] == [
        kept[start:end] for _, start, end in entries(kept)
    ]
    assert [name for name, _, _ in found[n + 1 :]] == [
        b"x-message-proxy-error",
        b"x-message-proxy-detail",
        b"x-message-proxy-failed-at",
        b"x-message-proxy-exchange",
        b"x-message-proxy-routing-key",
        b"x-message-proxy-queue",
    ]


async def test_a_message_with_unusual_headers_reaches_the_stream_whole(
    tmp_path: Path, names: dict[str, str]
) -> None:
    """A nested name that is not UTF-8 and an unsigned 64-bit value above 2**63: written, with
    its message id and headers, not dead-lettered."""
    headers = table(
        entry(b"big", b"L", struct.pack(">Q", 2**63 + 5)),
        entry(b"outer", b"F", table(entry(b"k\xff", b"S", long(b"v")))),
    )
    config = f"""
[batch]
max_delay_ms = 5

[[sources]]
queue = "{names["queue"]}"
bindings = [ {{ exchange = "{names["source"]}", routing_key = "#" }} ]

[[routes]]
name = "all"
to = [ {{ stream = "{names["stream"]}" }} ]

[dead_letter]
stream = "{names["dead_stream"]}"
"""
    with WorkerProcess(config, tmp_path, module="workers.stream_bridge", args=()) as worker:
        async with RawClient() as client:
            await client.publish(names["source"], "k", content_header("m-1", headers, 1), b"x")
        (written,) = await async_wait_for(lambda: stream_entries(names["stream"]), within=10)
        assert worker.stop() == 0
    assert await stream_entries(names["dead_stream"]) == []
    assert written[b"message_id"] == b"m-1"
    assert orjson.loads(written[b"headers"]) == {
        "big": 2**63 + 5,
        "outer": {"base64:a/8=": "v"},
    }
