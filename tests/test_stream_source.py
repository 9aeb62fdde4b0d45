"""Stream queues as a source, against the real RabbitMQ and Redis: where a source starts, that it
resumes exactly after what it wrote (restarts, reconnects, kill -9, no message ids), that a bad
message is dead-lettered without a reject, and the configs that cannot work are refused."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import pytest

from tests.faults.rig import _amqp_host_port, _redis_host_port
from tests.helpers import (
    AMQP_URL,
    WorkerProcess,
    amqp_url_via,
    async_wait_for,
    declare_topology,
    delete_keys,
    delete_queues,
    publish,
    redis_client,
    redis_url_via,
    run_cli,
    stream_entries,
    unique,
)
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.broker

STREAM_QUEUE = {"x-queue-type": "stream"}
SKIPPED = "message_proxy_stream_deliveries_skipped_total"


@dataclass
class Names:
    queue: str = field(default_factory=lambda: unique("sq"))
    stream: str = field(default_factory=lambda: unique("ss"))
    dead: str = field(default_factory=lambda: unique("sdl"))

    @property
    def offset_key(self) -> str:
        return f"message-proxy:stream-offset:%2F:{self.queue}"


@pytest.fixture
async def names() -> AsyncIterator[Names]:
    names = Names()
    yield names
    await delete_queues(names.queue)
    await delete_keys(names.stream, names.dead, names.offset_key)


def config(
    names: Names,
    *,
    amqp_url: str = AMQP_URL,
    redis_url: str = "redis://127.0.0.1:6379/0",
    stream_offset: str = "first",
    batch: int = 100,
    extra_route: str = "",
) -> str:
    return f"""
[amqp]
url = "{amqp_url}"
prefetch = 300
connect_timeout = 2

[redis]
url = "{redis_url}"
timeout = 1

[batch]
max_messages = {batch}
max_delay_ms = 5

[[sources]]
queue = "{names.queue}"
arguments = {{ "x-queue-type" = "stream" }}
stream_offset = "{stream_offset}"

[[routes]]
name = "good"
match.headers = {{ kind = "good" }}
to = [ {{ stream = "{names.stream}" }} ]
{extra_route}

[dead_letter]
stream = "{names.dead}"
"""


def bodies(start: int, count: int) -> list[bytes]:
    return [b"n-%d" % i for i in range(start, start + count)]


def good(body: bytes) -> aio_pika.Message:
    # No message id: the offsets alone must keep each message to one entry.
    return aio_pika.Message(body, headers={"kind": "good"})


async def written(stream: str) -> Counter[bytes]:
    return Counter(entry[b"body"] for entry in await stream_entries(stream))


async def wait_written(stream: str, count: int, within: float = 30.0) -> Counter[bytes]:
    async def enough() -> bool:
        return sum((await written(stream)).values()) >= count

    await async_wait_for(enough, within=within, what=f"{count} entries in {stream}")
    await asyncio.sleep(0.3)  # a late duplicate would land now
    return await written(stream)


def lost_and_duplicated(expected: list[bytes], counts: Counter[bytes]) -> tuple[int, int]:
    lost = sum(1 for body in expected if counts[body] == 0)
    duplicates = sum(count - 1 for count in counts.values() if count > 1)
    return lost, duplicates


async def recorded_offset(key: str) -> int | None:
    client = redis_client()
    try:
        value = await client.get(key)
    finally:
        await client.aclose()
    return None if value is None else int(value)


async def test_first_reads_what_was_there_and_a_restart_resumes_after_the_last_written(
    tmp_path: Path, names: Names
) -> None:
    await declare_topology(names.queue, arguments=STREAM_QUEUE)
    before = bodies(0, 300)
    await publish(map(good, before), routing_key=names.queue)
    worker = WorkerProcess(config(names), tmp_path).start()
    await wait_written(names.stream, len(before))
    assert await asyncio.to_thread(worker.stop) == 0
    assert await recorded_offset(names.offset_key) == len(before) - 1

    while_stopped = bodies(300, 200)
    await publish(map(good, while_stopped), routing_key=names.queue)
    worker = WorkerProcess(config(names), tmp_path).start()
    counts = await wait_written(names.stream, len(before) + len(while_stopped))
    assert "resuming at offset 300" in worker.logs()
    assert await asyncio.to_thread(worker.stop) == 0
    assert lost_and_duplicated(before + while_stopped, counts) == (0, 0)
    entries = await stream_entries(names.stream)
    assert [e[b"body"] for e in entries] == before + while_stopped  # and in order
    assert await recorded_offset(names.offset_key) == 499


async def publish_paced(messages: list[aio_pika.Message], queue: str, seconds: float) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        started, chunk = time.monotonic(), 50
        for start in range(0, len(messages), chunk):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(message, routing_key=queue)
                    for message in messages[start : start + chunk]
                )
            )
            due = started + (start + chunk) / len(messages) * seconds
            await asyncio.sleep(max(0.0, due - time.monotonic()))


@pytest.fixture
def proxies() -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    amqp, redis = TcpProxy(*_amqp_host_port()).start(), TcpProxy(*_redis_host_port()).start()
    try:
        yield amqp, redis
    finally:
        amqp.stop()
        redis.stop()


async def test_forced_reconnects_mid_flow_lose_nothing_and_write_nothing_twice(
    tmp_path: Path, names: Names, proxies: tuple[TcpProxy, TcpProxy]
) -> None:
    amqp, redis = proxies
    await declare_topology(names.queue, arguments=STREAM_QUEUE)
    expected = bodies(0, 3000)
    text = config(
        names, amqp_url=amqp_url_via(amqp.port), redis_url=redis_url_via(redis.port), batch=50
    )
    with WorkerProcess(text, tmp_path) as worker:
        publisher = asyncio.create_task(publish_paced(list(map(good, expected)), names.queue, 3))
        for cut in ("amqp", "redis", "amqp", "redis", "amqp", "redis", "amqp"):
            await asyncio.sleep(0.3)
            if cut == "amqp":
                amqp.reset_connections()
                continue
            # Slow replies first, so that the cut likely lands after Redis ran a batch's script
            # and before its reply arrived: the batch is sent again and must not land twice.
            redis.latency(0.15)
            await asyncio.sleep(0.25)
            redis.reset_connections()
            redis.latency(0)
        await publisher
        counts = await wait_written(names.stream, len(expected))
        reconnects = worker.metrics()
        skipped = _sample(reconnects, SKIPPED, prefix=True)
        assert await asyncio.to_thread(worker.stop) == 0
    lost, duplicates = lost_and_duplicated(expected, counts)
    print(
        f"\nstream source, 7 forced reconnects, 3000 messages: {lost} lost, {duplicates} "
        f"duplicates, {skipped:.0f} replayed deliveries not written again"
    )
    assert (lost, duplicates) == (0, 0), worker.logs()[-3000:]
    assert _sample(reconnects, 'message_proxy_reconnects_total{broker="amqp"}') >= 4
    assert await recorded_offset(names.offset_key) == len(expected) - 1


def _sample(metrics: str, name: str, *, prefix: bool = False) -> float:
    """A sample's value (with ``prefix``: the sum of every sample whose name starts so)."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == name or (prefix and sample.startswith(name)):
            total += float(value)
    return total


async def test_kill_9_mid_flow_loses_nothing_and_writes_nothing_twice(
    tmp_path: Path, names: Names, proxies: tuple[TcpProxy, TcpProxy]
) -> None:
    _, redis = proxies
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    await declare_topology(names.queue, arguments=STREAM_QUEUE)
    expected = bodies(0, 3000)
    await publish(map(good, expected), routing_key=names.queue, confirm_every=500)
    text = config(names, redis_url=redis_url_via(redis.port), batch=20)
    redis.latency(0.01)  # slow writes: a kill lands while a batch is on its way or half-read
    written_at_kills = []
    for round_ in range(3):
        worker = await asyncio.to_thread(WorkerProcess(text, tmp_path, name=f"r{round_}").start)
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        await asyncio.to_thread(worker.kill)
        written_at_kills.append(sum((await written(names.stream)).values()))
    redis.latency(0)
    final = await asyncio.to_thread(WorkerProcess(text, tmp_path, name="final").start)
    counts = await wait_written(names.stream, len(expected))
    assert await asyncio.to_thread(final.stop) == 0
    lost, duplicates = lost_and_duplicated(expected, counts)
    print(f"\nstream source, kill -9 x3 (seed {seed}): {lost} lost, {duplicates} duplicates")
    assert 0 < written_at_kills[0] and written_at_kills[-1] < len(expected), written_at_kills
    assert (lost, duplicates) == (0, 0), final.logs()
    assert [e[b"body"] for e in await stream_entries(names.stream)] == expected


async def test_two_workers_on_one_stream_write_each_message_once(
    tmp_path: Path, names: Names
) -> None:
    await declare_topology(names.queue, arguments=STREAM_QUEUE)
    expected = bodies(0, 2000)
    text = config(names, batch=50)
    workers = [WorkerProcess(text, tmp_path, name=f"replica{n}") for n in range(2)]
    await asyncio.gather(*(asyncio.to_thread(w.start) for w in workers))
    try:
        await publish(map(good, expected), routing_key=names.queue, confirm_every=500)
        counts = await wait_written(names.stream, len(expected))
        metrics = [w.metrics() for w in workers]
    finally:
        stopped = await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers))
    skipped = [_sample(m, SKIPPED, prefix=True) for m in metrics]
    print(f"\ntwo workers on one stream: skipped {skipped} of {len(expected)} each")
    assert stopped == [0, 0]
    assert lost_and_duplicated(expected, counts) == (0, 0)


async def test_bad_messages_are_dead_lettered_and_the_connection_stays_up(
    tmp_path: Path, names: Names
) -> None:
    relay_exchange, relay_queue = unique("sx"), unique("sxq")
    await declare_topology(names.queue, arguments=STREAM_QUEUE)
    await declare_topology(relay_queue, relay_exchange, "relayed")
    messages = [
        good(b"first"),
        aio_pika.Message(b"matches no route", headers={"kind": "other"}),
        # Routed to a key that is not a stream: Redis refuses it (WRONGTYPE), it is dead-lettered.
        aio_pika.Message(b"refused", headers={"kind": "wrong"}),
        aio_pika.Message(b"to an exchange", headers={"kind": "relay"}),
        good(b"last"),
    ]
    await publish(messages, routing_key=names.queue)
    wrong = f"{names.stream}:not-a-stream"
    client = redis_client()
    await client.set(wrong, "a string")
    await client.aclose()
    relay_route = f"""
[[routes]]
name = "wrong"
match.headers = {{ kind = "wrong" }}
to = [ {{ stream = "{wrong}" }} ]

[[routes]]
name = "relay"
match.headers = {{ kind = "relay" }}
to = [ {{ exchange = "{relay_exchange}", routing_key = "relayed" }} ]
"""
    try:
        with WorkerProcess(config(names, extra_route=relay_route), tmp_path) as worker:
            await wait_written(names.stream, 2)
            try:
                dead = await wait_written(names.dead, 2, within=5)
            except TimeoutError:
                raise AssertionError(worker.logs()) from None
            await async_wait_for(
                lambda: _recorded_is(names.offset_key, len(messages) - 1), what="offset recorded"
            )
            metrics = worker.metrics()
            assert await asyncio.to_thread(worker.stop) == 0
        assert set(await written(names.stream)) == {b"first", b"last"}
        assert set(dead) == {b"matches no route", b"refused"}
        reasons = {e[b"body"]: e[b"error"] for e in await stream_entries(names.dead)}
        assert reasons == {b"matches no route": b"unrouted", b"refused": b"rejected"}
        assert [m.body for m in await _drain(relay_queue)] == [b"to an exchange"]
        # Nothing was rejected: RabbitMQ would have closed the connection (540 NOT_IMPLEMENTED).
        assert _sample(metrics, 'message_proxy_reconnects_total{broker="amqp"}') == 0
        assert "NOT_IMPLEMENTED" not in worker.logs()
    finally:
        await delete_queues(relay_queue)
        await delete_keys(wrong)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            await (await connection.channel()).exchange_delete(relay_exchange)


async def _recorded_is(key: str, offset: int) -> bool:
    return await recorded_offset(key) == offset


async def _drain(queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(AMQP_URL)
    got = []
    async with connection:
        source = await (await connection.channel()).get_queue(queue)
        while (message := await source.get(no_ack=True, fail=False)) is not None:
            got.append(message)
    return got


def test_check_and_the_relay_refuse_what_a_stream_source_cannot_do(tmp_path: Path) -> None:
    source = '[[sources]]\nqueue = "events"\narguments = { "x-queue-type" = "stream" }\n'
    no_dead_letter = tmp_path / "no-dead-letter.toml"
    no_dead_letter.write_text(f'{source}[[routes]]\nname = "r"\nto = [ {{ stream = "s" }} ]\n')
    checked = run_cli(["check", "--config", str(no_dead_letter)])
    assert checked.returncode == 2
    assert "sources[0]" in checked.stderr and "cannot reject" in checked.stderr

    relayed = tmp_path / "relay.toml"
    relayed.write_text(
        f'unrouted = "drop"\n{source}[[routes]]\nname = "r"\nto = [ {{ exchange = "x" }} ]\n'
    )
    relay = run_cli(["--config", str(relayed)], module="workers.exchange_relay")
    assert relay.returncode == 2
    assert "sources[0]" in relay.stderr and "exchange-relay role" in relay.stderr
