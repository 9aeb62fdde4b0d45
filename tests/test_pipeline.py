"""The pipeline in-process against real RabbitMQ, with the library's in-memory sink as destination:
held batches under transient failure, dead letters for permanent ones, batching limits."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
import pytest

from proxy.config import parse_config
from proxy.errors import PermanentError
from proxy.metrics import Metrics
from proxy.routing import StreamTarget
from proxy.sinks import Publish
from proxy.sinks.memory import MemorySink
from proxy.state import HealthState
from proxy.worker import Worker
from tests.helpers import async_wait_for, delete_queues, publish, queue_depth, unique

pytestmark = pytest.mark.broker


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    try:
        await async_wait_for(lambda: worker.health.snapshot().consumers == 1, what="consuming")
        yield worker
    finally:
        worker.stop_requested.set()
        await asyncio.wait_for(task, 15)


def make_worker(
    queue: str, routes: str, sink: MemorySink, metrics: Metrics, extra: str = ""
) -> Worker:
    text = f"""
{extra}
[batch]
max_messages = 100
max_delay_ms = 5

[[sources]]
queue = "{queue}"

{routes}
"""
    config = parse_config(tomllib.loads(text), environ={})
    return Worker(
        config, role="all", metrics=metrics, health=HealthState(), sinks={StreamTarget: sink}
    )


@pytest.fixture
async def queue() -> AsyncIterator[str]:
    name = unique("q")
    yield name
    await delete_queues(name)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_transient_failures_hold_the_batch_unacked_then_deliver(
    queue: str, metrics: Metrics
) -> None:
    sink = MemorySink("memory")
    routes = '[[routes]]\nname = "all"\nto = [ { stream = "s" } ]'
    worker = make_worker(queue, routes, sink, metrics)
    async with running(worker):
        sink.failures_left = 4  # 0.1 + 0.2 + 0.4 + 0.8 s of backoff
        await publish(
            [aio_pika.Message(b"x", message_id=str(i)) for i in range(50)], routing_key=queue
        )
        await async_wait_for(lambda: not worker.health.snapshot().is_ready(), what="not ready")
        assert "memory" in worker.health.snapshot().problems()
        assert sink.published == []
        assert sample(metrics, "message_proxy_messages_acked_total", queue=queue) == 0
        await async_wait_for(lambda: len(sink.published) == 50, within=10, what="delivered")
        await async_wait_for(lambda: worker.health.snapshot().is_ready(), what="ready again")
        await async_wait_for(
            lambda: sample(metrics, "message_proxy_messages_acked_total", queue=queue) == 50
        )
    assert [p.message.message_id for p in sink.published] == [str(i) for i in range(50)]
    assert (
        sample(metrics, "message_proxy_publish_errors_total", destination="s", error="transient")
        >= 4
    )
    assert await queue_depth(queue) == 0


async def test_a_refused_destination_dead_letters_without_republishing_the_other(
    queue: str, metrics: Metrics
) -> None:
    def refuse(item: Publish) -> PermanentError | None:
        target = item.target
        if isinstance(target, StreamTarget) and target.name == "bad" and item.dead_letter is None:
            return PermanentError("rejected", "WRONGTYPE")
        return None

    sink = MemorySink("memory", refuse=refuse)
    routes = '[[routes]]\nname = "both"\nto = [ { stream = "good" }, { stream = "bad" } ]'
    worker = make_worker(queue, routes, sink, metrics, extra='[dead_letter]\nstream = "dead"')
    async with running(worker):
        await publish([aio_pika.Message(b"m", message_id="one")], routing_key=queue)
        await async_wait_for(lambda: len(sink.published) == 2, what="good and dead")
        await async_wait_for(
            lambda: sample(metrics, "message_proxy_messages_acked_total", queue=queue) == 1
        )
    good, dead = sink.published
    assert isinstance(good.target, StreamTarget) and good.target.name == "good"
    assert isinstance(dead.target, StreamTarget) and dead.target.name == "dead"
    assert dead.dead_letter is not None
    assert dead.dead_letter.reason == "rejected"
    assert dead.dead_letter.route == "both"
    assert "stream 'bad'" in dead.dead_letter.detail
    assert sample(metrics, "message_proxy_messages_dead_lettered_total", reason="rejected") == 1
    assert await queue_depth(queue) == 0  # acked: never redelivered to "good"


async def test_batches_respect_max_messages(queue: str, metrics: Metrics) -> None:
    sink = MemorySink("memory")
    routes = '[[routes]]\nname = "all"\nto = [ { stream = "s" } ]'
    worker = make_worker(queue, routes, sink, metrics)
    async with running(worker):
        await publish([aio_pika.Message(b"x")] * 1000, routing_key=queue)
        await async_wait_for(lambda: len(sink.published) == 1000, what="all")
    count = sample(metrics, "message_proxy_batch_size_count")
    total = sample(metrics, "message_proxy_batch_size_sum")
    assert total == 1000
    assert count >= 10  # never more than max_messages = 100 in one batch
    assert sample(metrics, "message_proxy_batch_size_bucket", le="100.0") == count


async def test_batches_of_large_bodies_are_cut_by_bytes(queue: str, metrics: Metrics) -> None:
    sink = MemorySink("memory")
    routes = '[[routes]]\nname = "all"\nto = [ { stream = "s" } ]'
    # An eighth of max_inflight_bytes per batch: 1 MiB, so at most 4 bodies of 300 KiB.
    worker = make_worker(queue, routes, sink, metrics, "[amqp]\nmax_inflight_bytes = 8388608")
    body = b"x" * 300 * 1024
    async with running(worker):
        await publish(
            [aio_pika.Message(body, message_id=str(i)) for i in range(40)], routing_key=queue
        )
        await async_wait_for(lambda: len(sink.published) == 40, what="all")
    assert [p.message.message_id for p in sink.published] == [str(i) for i in range(40)]
    count = sample(metrics, "message_proxy_batch_size_count")
    assert count >= 10
    assert sample(metrics, "message_proxy_batch_size_bucket", le="5.0") == count


async def test_graceful_stop_drains_in_process(queue: str, metrics: Metrics) -> None:
    sink = MemorySink("memory")
    routes = '[[routes]]\nname = "all"\nto = [ { stream = "s" } ]'
    worker = make_worker(queue, routes, sink, metrics, extra="shutdown_timeout = 3")
    async with running(worker):
        await publish([aio_pika.Message(b"x")] * 300, routing_key=queue)
        await async_wait_for(lambda: len(sink.published) > 0, what="flow")
    acked = sample(metrics, "message_proxy_messages_acked_total", queue=queue)
    assert acked == len(sink.published)  # nothing published is left unacked after the drain
    assert sink.closed
    assert worker.health.snapshot().problems().get("worker") == "shutting down"
