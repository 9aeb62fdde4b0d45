"""Nothing is lost: kill -9, a Redis outage, a cut AMQP connection, a graceful stop mid-flow."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from tests.helpers import (
    REDIS_URL,
    WorkerProcess,
    amqp_url_via,
    async_wait_for,
    declare_topology,
    delete_keys,
    delete_queues,
    publish,
    queue_depth,
    ready_and_unacked,
    redis_url_via,
    stream_length,
    stream_message_ids,
    unique,
)
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
async def names() -> AsyncIterator[dict[str, str]]:
    names = {"queue": unique("q"), "stream": unique("s")}
    yield names
    await delete_queues(names["queue"])
    await delete_keys(names["stream"])


def config_for(names: dict[str, str], *, amqp_url: str = "", redis_url: str = "", extra: str = ""):
    amqp = f'[amqp]\nurl = "{amqp_url}"\nprefetch = 1000\n' if amqp_url else ""
    redis = f'[redis]\nurl = "{redis_url}"\ntimeout = 1.0\n' if redis_url else ""
    return f"""
{extra}
{amqp}
{redis}
[[sources]]
queue = "{names["queue"]}"

[[routes]]
name = "all"
to = [ {{ stream = "{names["stream"]}" }} ]
"""


def numbered(count: int, start: int = 0) -> list[aio_pika.Message]:
    return [
        aio_pika.Message(
            b'{"n": %d, "pad": "................................................"}' % i,
            message_id=str(i),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        for i in range(start, start + count)
    ]


async def all_ids_arrive(stream: str, count: int, within: float) -> Counter[str]:
    async def complete() -> bool:
        return (
            await stream_length(stream) >= count
            and len(set(await stream_message_ids(stream))) >= count
        )

    await async_wait_for(complete, within=within, interval=0.25, what=f"{count} ids in {stream}")
    return Counter(await stream_message_ids(stream))


def report(what: str, ids: Counter[str], count: int, seconds: float | None = None) -> None:
    duplicates = sum(n - 1 for n in ids.values() if n > 1)
    missing = count - len([i for i in map(str, range(count)) if i in ids])
    took = f", recovered in {seconds:.1f}s" if seconds is not None else ""
    print(f"\n{what}: {count} messages, {missing} lost, {duplicates} duplicates{took}")


async def test_kill_9_mid_flow_loses_nothing(tmp_path: Path, names: dict[str, str]) -> None:
    count = 20_000
    # A backlog first: the worker drains faster than a confirmed publisher fills, so a kill
    # timed against a publish in progress could land after the last message.
    await declare_topology(names["queue"])
    await publish(numbered(count), routing_key=names["queue"], confirm_every=2000)
    worker = WorkerProcess(config_for(names), tmp_path).start()
    try:
        await async_wait_for(
            lambda: _length_at_least(names["stream"], count // 4), within=60, interval=0.01
        )
        worker.kill()  # SIGKILL: no drain, no ack of the batch in flight
        in_stream_at_kill = await stream_length(names["stream"])
        assert 0 < in_stream_at_kill < count, "the kill must land mid-flow"
        restarted_at = time.monotonic()
        worker = WorkerProcess(config_for(names), tmp_path, name="restarted").start()
        ids = await all_ids_arrive(names["stream"], count, within=90)
        report("kill -9", ids, count, time.monotonic() - restarted_at)
        assert set(ids) == {str(i) for i in range(count)}
        await async_wait_for(lambda: _depth_is(names["queue"], 0), within=10)
    finally:
        worker.kill()


async def _length_at_least(stream: str, count: int) -> bool:
    return await stream_length(stream) >= count


async def _depth_is(queue: str, depth: int) -> bool:
    return await queue_depth(queue) == depth


async def test_redis_outage_holds_without_acking(tmp_path: Path, names: dict[str, str]) -> None:
    count = 3000
    host, port = REDIS_URL.split("//")[1].split("/")[0].split(":")
    with TcpProxy(host, int(port)) as redis_proxy:
        config = config_for(names, redis_url=redis_url_via(redis_proxy.port))
        with WorkerProcess(config, tmp_path) as worker:
            await publish(numbered(1000), routing_key=names["queue"])
            await async_wait_for(lambda: _length_at_least(names["stream"], 1000), within=20)
            redis_proxy.cut()
            await publish(numbered(count - 1000, start=1000), routing_key=names["queue"])
            await asyncio.sleep(4)  # several seconds of outage, with deliveries waiting
            assert worker.process is not None and worker.process.poll() is None
            assert await stream_length(names["stream"]) == 1000
            # Held, not acked: every message published during the outage is still in the queue
            # (ready or unacked), none was dropped.
            assert worker.get("/ready")[0] == 503
            ready, unacked = await ready_and_unacked(names["queue"])
            assert ready + unacked == count - 1000
            assert unacked <= 1000  # prefetch: the worker stopped taking deliveries
            assert ready >= count - 2000
            healed_at = time.monotonic()
            redis_proxy.heal()
            ids = await all_ids_arrive(names["stream"], count, within=60)
            report("redis outage (4 s cut)", ids, count, time.monotonic() - healed_at)
            assert set(ids) == {str(i) for i in range(count)}
            await async_wait_for(lambda: worker.get("/ready")[0] == 200, within=10)
            logs = worker.logs()
    assert "retry" in logs and "held, not acked" in logs


async def test_consumption_resumes_after_the_amqp_connection_is_cut(
    tmp_path: Path, names: dict[str, str]
) -> None:
    count = 4000
    with TcpProxy("127.0.0.1", 5672) as amqp_proxy:
        config = config_for(names, amqp_url=amqp_url_via(amqp_proxy.port))
        with WorkerProcess(config, tmp_path) as worker:
            await publish(numbered(2000), routing_key=names["queue"])
            await async_wait_for(lambda: _length_at_least(names["stream"], 500), within=20)
            amqp_proxy.cut()
            await async_wait_for(lambda: worker.get("/ready")[0] == 503, within=3)
            await publish(numbered(count - 2000, start=2000), routing_key=names["queue"])
            await asyncio.sleep(1)
            healed_at = time.monotonic()
            amqp_proxy.heal()
            ids = await all_ids_arrive(names["stream"], count, within=60)
            report("amqp connection cut", ids, count, time.monotonic() - healed_at)
            assert set(ids) == {str(i) for i in range(count)}
            await async_wait_for(lambda: worker.get("/ready")[0] == 200, within=10)
            assert 'message_proxy_reconnects_total{broker="amqp"}' in worker.metrics()


async def test_sigterm_mid_flow_exits_0_and_everything_acked_is_in_redis(
    tmp_path: Path, names: dict[str, str]
) -> None:
    count = 20_000
    config = config_for(names, extra="shutdown_timeout = 5")
    await declare_topology(names["queue"])
    await publish(numbered(count), routing_key=names["queue"], confirm_every=2000)
    worker = WorkerProcess(config, tmp_path).start()  # a backlog: SIGTERM lands mid-drain
    try:
        await async_wait_for(
            lambda: _length_at_least(names["stream"], 1000), within=60, interval=0.01
        )
        stopped_at = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0
        took = time.monotonic() - stopped_at
        assert took < 5 + 3
        remaining = await queue_depth(names["queue"])  # unacked ones are back to ready
        ids = Counter(await stream_message_ids(names["stream"]))
        acked = count - remaining
        print(f"\nSIGTERM: stopped in {took:.2f}s; {acked} acked, {len(ids)} in the stream")
        # Everything acked is in Redis: the ids not in the queue any more are all in the stream.
        assert len(ids) >= acked
        assert remaining > 0, "the stop must land mid-drain"
        assert "stopped" in worker.logs()
    finally:
        worker.kill()
