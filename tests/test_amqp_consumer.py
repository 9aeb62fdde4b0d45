"""The AMQP source in a live worker against the real RabbitMQ: what it says when the broker
refuses it, and what it does when the broker cancels a consumer or closes a channel under it."""

from __future__ import annotations

import asyncio
import json
import re
import time
import tomllib
from asyncio.subprocess import PIPE
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import psutil
import pytest

from proxy.config import parse_config
from proxy.metrics import Metrics
from proxy.state import HealthState
from proxy.worker import Worker
from tests.helpers import (
    AMQP_URL,
    REDIS_URL,
    WorkerProcess,
    amqp_url_via,
    async_wait_for,
    declare_topology,
    delete_keys,
    delete_queues,
    publish,
    redis_url_via,
    stream_entries,
    stream_length,
    stream_message_ids,
    unique,
    wait_for,
)
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.broker


def worker_config(amqp_url: str, queue: str, stream: str, *, extra: str = "") -> str:
    return f"""
[amqp]
url = "{amqp_url}"
connect_timeout = 2
{extra}

[redis]
url = "{REDIS_URL}"

[[sources]]
queue = "{queue}"

[[routes]]
name = "all"
to = [ {{ stream = "{stream}" }} ]
"""


@pytest.mark.parametrize(
    ("userinfo", "vhost", "reason"),
    [
        pytest.param(
            f"guest:Pw-{unique('wrong')}", "%2F", "403 ACCESS_REFUSED", id="wrong-password"
        ),
        pytest.param("guest:guest", unique("no-such-vhost"), "530 NOT_ALLOWED", id="no-vhost"),
    ],
)
async def test_every_retry_and_the_readiness_detail_carry_the_brokers_reason(
    tmp_path: Path, userinfo: str, vhost: str, reason: str
) -> None:
    url = f"amqp://{userinfo}@127.0.0.1:5672/{vhost}"
    stream = unique("refused")
    worker = WorkerProcess(worker_config(url, unique("q"), stream), tmp_path)
    worker.start(wait_ready=False)
    try:

        def retries() -> list[str]:
            lines = [json.loads(line)["message"] for line in worker.logs().splitlines()]
            return [line for line in lines if "; retry " in line]

        wait_for(lambda: len(retries()) >= 3, 15, what=f"three retries; logs:\n{worker.logs()}")
        status, body = worker.get("/ready")
        assert status == 503
        detail = json.loads(body)["down"]["amqp"]
        assert reason in detail, detail
        assert all(reason in line for line in retries()), retries()
        password = userinfo.partition(":")[2]
        for where, text in (("logs", worker.logs()), ("/ready", body.decode())):
            assert f":{password}@" not in text, where
            if password != "guest":
                assert password not in text, where
    finally:
        worker.kill()
        await delete_keys(stream)


# --- RabbitMQ's consumer timeout --------------------------------------------------------------


async def rabbitmq_eval(expression: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "eval", expression, stdout=PIPE, stderr=PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl eval failed: {err.decode()}")
    return out.decode().strip()


def _restore(key: str, original: str) -> str:
    """The expression that puts ``key`` of the rabbit application back as ``original`` was."""
    found = re.fullmatch(r"\{ok,(\d+)\}", original)
    if found:
        return f"application:set_env(rabbit, {key}, {found[1]})."
    return f"application:unset_env(rabbit, {key})."


@asynccontextmanager
async def rabbitmq_setting(key: str, value: int) -> AsyncIterator[None]:
    """One of the broker's application settings changed, and put back however the block ends.

    The broker is shared: keep the block as short as the test allows."""
    original = await rabbitmq_eval(
        f"V = application:get_env(rabbit, {key}), application:set_env(rabbit, {key}, {value}), V."
    )
    try:
        yield
    finally:
        await rabbitmq_eval(_restore(key, original))


@pytest.fixture
async def queue() -> AsyncIterator[str]:
    name = unique("q")
    yield name
    await delete_queues(name)


@asynccontextmanager
async def running(worker: Worker, consumers: int = 1) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    try:
        await async_wait_for(
            lambda: worker.health.snapshot().consumers == consumers, what="consuming"
        )
        yield worker
    finally:
        worker.stop_requested.set()
        await asyncio.wait_for(task, 15)


def in_process_worker(queue: str, text: str, metrics: Metrics) -> Worker:
    config = parse_config(tomllib.loads(f'{text}\n[[sources]]\nqueue = "{queue}"\n'), environ={})
    return Worker(config, role="all", metrics=metrics, health=HealthState())


def reconnects(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("message_proxy_reconnects_total", {"broker": "amqp"})
    return value or 0.0


async def held_past_the_consumer_timeout(
    stack: AsyncExitStack, worker: Worker, metrics: Metrics
) -> None:
    """Start ``worker`` on a channel with a 2 s consumer timeout; return once RabbitMQ has closed
    that channel and the worker consumes again on a new one, with the broker's usual timeout."""
    # The timeout is evaluated on each channel's tick, every minute by default.
    await stack.enter_async_context(rabbitmq_setting("channel_tick_interval", 250))
    async with rabbitmq_setting("consumer_timeout", 2000):  # read by each channel as it opens
        await stack.enter_async_context(running(worker))
    await async_wait_for(lambda: reconnects(metrics) >= 1, within=15, what="channel timed out")
    await async_wait_for(lambda: worker.health.snapshot().consumers == 1, what="consuming again")


def numbered(count: int, kind: str = "m") -> list[aio_pika.Message]:
    return [
        aio_pika.Message(b"m", message_id=f"{kind}-{i}", headers={"kind": kind})
        for i in range(count)
    ]


@pytest.fixture
def proxies() -> Iterator[dict[str, TcpProxy]]:
    started = {
        "redis": TcpProxy(*_host_port(REDIS_URL, 6379)).start(),
        "amqp_out": TcpProxy(*_host_port(AMQP_URL, 5672)).start(),
    }
    yield started
    for proxy in started.values():
        proxy.stop()


def _host_port(url: str, default: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default


async def test_a_batch_held_past_the_consumer_timeout_is_written_once(
    queue: str, metrics: Metrics, proxies: dict[str, TcpProxy]
) -> None:
    stream = unique("held")
    text = f"""
[redis]
url = "{redis_url_via(proxies["redis"].port)}"
timeout = 1

[[routes]]
name = "all"
to = [ {{ stream = "{stream}" }} ]
"""
    worker = in_process_worker(queue, text, metrics)
    await declare_topology(queue)
    await publish(numbered(20), routing_key=queue)
    proxies["redis"].cut()
    try:
        async with AsyncExitStack() as stack:
            await held_past_the_consumer_timeout(stack, worker, metrics)
            proxies["redis"].heal()
            await async_wait_for(lambda: acked(metrics, queue) == 20, within=15, what="acked")
            await asyncio.sleep(0.3)  # a stale copy would be written by now
        written = Counter(await stream_message_ids(stream))
        assert written == Counter({f"m-{i}": 1 for i in range(20)})
    finally:
        await delete_keys(stream)


async def test_a_dead_letter_held_past_the_consumer_timeout_is_written_once(
    queue: str, metrics: Metrics, proxies: dict[str, TcpProxy]
) -> None:
    stream, dead_exchange, dead_queue = unique("good"), unique("dead"), unique("dead")
    text = f"""
[redis]
url = "{REDIS_URL}"

[amqp_out]
url = "{amqp_url_via(proxies["amqp_out"].port)}"
connect_timeout = 1
publish_timeout = 1

[[routes]]
name = "good"
match.headers = {{ kind = "good" }}
to = [ {{ stream = "{stream}" }} ]

[dead_letter]
exchange = "{dead_exchange}"
routing_key = "dead"
"""
    worker = in_process_worker(queue, text, metrics)
    await declare_topology(queue)
    await declare_topology(dead_queue, dead_exchange)
    await publish([*numbered(10, "good"), *numbered(10, "bad")], routing_key=queue)
    proxies["amqp_out"].cut()
    try:
        async with AsyncExitStack() as stack:
            await held_past_the_consumer_timeout(stack, worker, metrics)
            proxies["amqp_out"].heal()
            await async_wait_for(lambda: acked(metrics, queue) == 20, within=15, what="acked")
            await asyncio.sleep(0.3)
        dead = Counter(await drained_message_ids(dead_queue))
        assert dead == Counter({f"bad-{i}": 1 for i in range(10)})
        # The good ones were written before the hold: their redelivery writes them again (at
        # least once; only a dedupe destination skips them).
        assert set(await stream_message_ids(stream)) == {f"good-{i}" for i in range(10)}
    finally:
        await delete_queues(dead_queue)
        await delete_keys(stream)


async def drained_message_ids(queue: str) -> list[str]:
    connection = await aio_pika.connect(AMQP_URL)
    ids = []
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue)
        while (message := await source.get(no_ack=True, fail=False)) is not None:
            ids.append(message.message_id or "")
    return ids


def acked(metrics: Metrics, queue: str) -> float:
    value = metrics.registry.get_sample_value(
        "message_proxy_messages_acked_total", {"queue": queue}
    )
    return value or 0.0


# --- a consumer the broker cancels ------------------------------------------------------------


async def test_a_deleted_queue_is_consumed_again_and_the_held_batch_of_the_others_stays(
    metrics: Metrics, proxies: dict[str, TcpProxy]
) -> None:
    """Three sources: a quorum queue with a delivery limit whose batch is held (Redis cut), and
    two classic queues deleted meanwhile, one declared by the worker, one not."""
    quorum, declared, external = unique("quorum"), unique("declared"), unique("external")
    exchange, stream = unique("x"), unique("s")
    text = f"""
[redis]
url = "{redis_url_via(proxies["redis"].port)}"
timeout = 1

[[routes]]
name = "all"
to = [ {{ stream = "{stream}" }} ]

[[sources]]
queue = "{quorum}"
arguments = {{ "x-queue-type" = "quorum", "x-delivery-limit" = 1 }}

[[sources]]
queue = "{declared}"
bindings = [ {{ exchange = "{exchange}", routing_key = "#" }} ]

[[sources]]
queue = "{external}"
declare = false
"""
    config = parse_config(tomllib.loads(text), environ={})
    worker = Worker(config, role="all", metrics=metrics, health=HealthState())
    await declare_topology(external)
    try:
        async with running(worker, consumers=3):
            proxies["redis"].cut()
            await publish(numbered(30, "held"), routing_key=quorum)
            await async_wait_for(lambda: worker.pipeline.pending == 30, what="30 held")
            await delete_queues(declared, external)
            await async_wait_for(
                lambda: "consumer" in worker.health.snapshot().problems(), what="not ready"
            )
            # Declared again by the worker, with its binding; the other waits for its queue.
            await async_wait_for(lambda: worker.health.snapshot().consumers == 2, what="2 of 3")
            await declare_topology(external)
            await async_wait_for(lambda: worker.health.snapshot().consumers == 3, what="3 of 3")
            assert "consumer" not in worker.health.snapshot().problems()
            proxies["redis"].heal()
            await publish(numbered(1, "bound"), exchange=exchange, routing_key="k")
            await publish(numbered(1, "external"), routing_key=external)
            await async_wait_for(lambda: acked(metrics, quorum) == 30, within=15, what="acked")
            await async_wait_for(
                lambda: stream_length_is(stream, 32), within=10, what="all in the stream"
            )
        entries = await stream_entries(stream)
        written = Counter(e[b"message_id"].decode() for e in entries)
        assert written == Counter(
            {**{f"held-{i}": 1 for i in range(30)}, "bound-0": 1, "external-0": 1}
        )
        # Never returned to the quorum queue: a redelivery would carry x-delivery-count.
        assert not [e for e in entries if b"x-delivery-count" in e.get(b"headers", b"")]
        assert reconnects(metrics) == 0
    finally:
        await delete_queues(quorum, declared, external)
        await delete_keys(stream)
        async with await aio_pika.connect(AMQP_URL) as connection:
            await (await connection.channel()).exchange_delete(exchange)


async def stream_length_is(stream: str, length: int) -> bool:
    return await stream_length(stream) == length


# --- max_inflight_bytes -----------------------------------------------------------------------

MIB = 1024 * 1024


async def test_held_bodies_are_bounded_by_bytes_and_the_pause_is_not_a_dead_broker(
    tmp_path: Path, proxies: dict[str, TcpProxy]
) -> None:
    """Redis cut, 60 MiB published with the default prefetch (1000): the worker holds about
    ``max_inflight_bytes`` (4 MiB) and stops reading; held for 4 s, past three 1 s heartbeats,
    the connection stays. Measured without the limit: 77 MiB more while held, 106 MiB draining."""
    queue, stream = unique("bytes"), unique("bytes")
    text = f"""
[amqp]
url = "{AMQP_URL}"
heartbeat = 1
max_inflight_bytes = {4 * MIB}

[redis]
url = "{redis_url_via(proxies["redis"].port)}"
timeout = 1

[[sources]]
queue = "{queue}"

[[routes]]
name = "all"
to = [ {{ stream = "{stream}", maxlen = 20 }} ]
"""
    worker = WorkerProcess(text, tmp_path)
    try:
        await asyncio.to_thread(worker.start)
        assert worker.process is not None
        process = psutil.Process(worker.process.pid)
        before = process.memory_info().rss
        proxies["redis"].cut()
        bodies = [b"%d" % i + b"." * (MIB - 8) for i in range(60)]
        bodies.append(b"big" + b"." * (6 * MIB))  # larger than the limit: still goes, alone
        messages = [aio_pika.Message(body, message_id=f"m-{i}") for i, body in enumerate(bodies)]
        await publish(messages, routing_key=queue, confirm_every=10)
        held_peak = await peak_rss(process, seconds=4.0)
        proxies["redis"].heal()
        acked_all = f'message_proxy_messages_acked_total{{queue="{queue}"}} 61.0'
        drained = asyncio.create_task(
            async_wait_for(lambda: acked_all in worker.metrics(), within=30, what="all acked")
        )
        drain_peak = await peak_rss(process, until=drained)
        await drained
        growth = (max(held_peak, drain_peak) - before) / MIB
        print(f"\n[measured] RSS {before / MIB:.0f} MiB, +{growth:.0f} MiB holding/draining 66 MiB")
        assert growth < 30, growth
        # All 61 acked, so written; maxlen keeps the last ones, the big one last of all.
        assert (await stream_message_ids(stream))[-1] == "m-60"
        metrics, logs = worker.metrics(), worker.logs()
        assert 'message_proxy_reconnects_total{broker="amqp"}' not in metrics, logs
        assert "no frame from the broker" not in logs
    finally:
        worker.kill()
        await delete_queues(queue)
        await delete_keys(stream)


async def peak_rss(
    process: psutil.Process, *, seconds: float = 0.0, until: asyncio.Task[object] | None = None
) -> int:
    peak, deadline = 0, asyncio.get_running_loop().time() + seconds
    while (until is not None and not until.done()) or (
        until is None and asyncio.get_running_loop().time() < deadline
    ):
        peak = max(peak, process.memory_info().rss)
        await asyncio.sleep(0.05)
    return peak


async def test_a_missing_queue_waits_for_reading_to_resume_without_spinning(
    metrics: Metrics, proxies: dict[str, TcpProxy]
) -> None:
    """While reading is paused no request can be answered: the watcher does not retry a missing
    queue then, and does not spin either; once a written batch lets reading resume, it does."""
    held, missing, stream = unique("held"), unique("missing"), unique("s")
    text = f"""
[amqp]
max_inflight_bytes = {MIB}

[redis]
url = "{redis_url_via(proxies["redis"].port)}"
timeout = 1

[[routes]]
name = "all"
to = [ {{ stream = "{stream}", maxlen = 10 }} ]

[[sources]]
queue = "{held}"

[[sources]]
queue = "{missing}"
declare = false
"""
    config = parse_config(tomllib.loads(text), environ={})
    worker = Worker(config, role="all", metrics=metrics, health=HealthState())
    await declare_topology(missing)
    try:
        async with running(worker, consumers=2):
            await delete_queues(missing)  # cancelled, and retried in vain from now on
            await async_wait_for(lambda: worker.health.snapshot().consumers == 1, what="1 of 2")
            proxies["redis"].cut()
            await publish(numbered_bodies(8, 512 * 1024), routing_key=held)
            connection = worker.source._connection
            assert connection is not None
            await async_wait_for(lambda: connection.reading_paused, what="reading paused")
            cpu_before, wall_before = time.process_time(), time.monotonic()
            await asyncio.sleep(2.0)  # past the next retries' due times
            busy = (time.process_time() - cpu_before) / (time.monotonic() - wall_before)
            assert busy < 0.3, f"the event loop spun at {busy:.0%} of a core while paused"
            await declare_topology(missing)
            proxies["redis"].heal()
            await async_wait_for(lambda: acked(metrics, held) == 8, within=15, what="acked")
            await async_wait_for(
                lambda: worker.health.snapshot().consumers == 2, within=15, what="2 of 2"
            )
        assert reconnects(metrics) == 0
    finally:
        await delete_queues(held, missing)
        await delete_keys(stream)


def numbered_bodies(count: int, size: int) -> list[aio_pika.Message]:
    return [aio_pika.Message(b"." * size, message_id=f"b-{i}") for i in range(count)]
