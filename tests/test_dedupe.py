"""Exactly-once into streams (``dedupe = true``), replicas and single active consumer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from prometheus_client import CollectorRegistry

from proxy.message import Message
from proxy.sinks import Accepted, Outcome, Publish
from tests.faults.fakes import flush, pipeline_for, submit
from tests.faults.raw_amqp import publish_raw
from tests.helpers import (
    AMQP_URL,
    WorkerProcess,
    async_wait_for,
    delete_keys,
    delete_queues,
    publish,
    stream_message_ids,
    unique,
)

# --- the pipeline counts what the sink notes ---------------------------------------------------


class NotingSink:
    """Accepts everything; notes what a de-duplicating sink would."""

    broker = "redis"
    node = ""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def connect(self) -> None: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...

    async def publish_batch(self, items: Sequence[Publish]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for item in items:
            message_id = item.message.message_id
            if message_id is None:
                outcomes.append(Accepted.NO_MESSAGE_ID)
            elif message_id in self.seen:
                outcomes.append(Accepted.DUPLICATE)
            else:
                self.seen.add(message_id)
                outcomes.append(None)
        return outcomes


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(f"message_proxy_{name}", labels or None) or 0.0


async def test_pipeline_acks_duplicates_and_counts_them(registry: CollectorRegistry) -> None:
    routes = [{"name": "r", "to": [{"stream": "s", "dedupe": True}]}]
    pipeline = pipeline_for({"routes": routes}, NotingSink(), registry=registry)
    ids = ["a", "b", "a", None, "b", None]
    channel = submit(pipeline, (Message(b"x", queue="q", message_id=i) for i in ids))
    await flush(pipeline)
    assert channel.acked == [6]
    assert channel.rejected == []
    assert sample(registry, "duplicates_suppressed_total") == 2
    assert sample(registry, "dedupe_skipped_total", reason="no-message-id") == 2
    assert sample(registry, "messages_published_total", route="r", destination="s") == 4
    assert sample(registry, "messages_acked_total", queue="q") == 6


# --- end to end ---------------------------------------------------------------------------------


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in Prometheus text (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"message_proxy_{name}") and not line.startswith("#"):
            head = line.split(" ")[0]
            if head == f"message_proxy_{name}" or head.startswith(f"message_proxy_{name}{{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def dedupe_config(queue: str, stream: str, *, extra_source: str = "") -> str:
    return f"""
[dedupe]
window = "1h"

[batch]
max_messages = 50
max_delay_ms = 5

[[sources]]
queue = "{queue}"
{extra_source}

[[routes]]
name = "all"
to = [ {{ stream = "{stream}", dedupe = true }} ]
"""


def messages(ids: Sequence[str]) -> list[aio_pika.Message]:
    return [aio_pika.Message(f"body-{i}".encode(), message_id=i) for i in ids]


async def _count_is(stream: str, count: int) -> bool:
    return len(await stream_message_ids(stream)) >= count


@pytest.fixture
async def names() -> Any:
    queue, stream = unique("q"), unique("s")
    yield queue, stream
    await delete_queues(queue)
    await delete_keys(stream)


@pytest.mark.broker
@pytest.mark.slow
async def test_a_message_sent_twice_lands_once(tmp_path: Path, names: tuple[str, str]) -> None:
    queue, stream = names
    ids = [f"m-{i}" for i in range(200)]
    with WorkerProcess(dedupe_config(queue, stream), tmp_path) as worker:
        await publish(messages(ids), routing_key=queue)
        await publish(messages(ids), routing_key=queue)  # again: suppressed
        await publish_raw(queue, [b"no-id"] * 2)  # at-least-once, both written
        await async_wait_for(lambda: _count_is(stream, 202), what="202 entries")
        await async_wait_for(
            lambda: metric(worker.metrics(), "duplicates_suppressed_total") == 200,
            what="200 duplicates counted",
        )
        text = worker.metrics()
        assert worker.get("/ready")[0] == 200
    written = await stream_message_ids(stream)
    assert written[:200] == ids
    assert written[200:] == ["", ""]
    assert 'message_proxy_dedupe_skipped_total{reason="no-message-id"} 2.0' in text
    assert metric(text, "messages_acked_total") == 402


@pytest.mark.broker
@pytest.mark.slow
async def test_two_replicas_write_each_id_once(tmp_path: Path, names: tuple[str, str]) -> None:
    queue, stream = names
    ids = [f"m-{i}" for i in range(1000)]
    config = dedupe_config(queue, stream)
    with WorkerProcess(config, tmp_path, name="a") as a, WorkerProcess(config, tmp_path, name="b"):
        # Every id three times, interleaved: both replicas see copies of the same ids.
        await publish(messages([i for i in ids for _ in range(3)]), routing_key=queue)
        await async_wait_for(lambda: _count_is(stream, 1000), what="1000 entries")
        await asyncio.sleep(0.5)
        assert a.get("/ready")[0] == 200
    written = await stream_message_ids(stream)
    assert sorted(written) == sorted(ids)


# --- single active consumer -----------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.slow
async def test_single_active_consumer_declares_the_argument_and_one_worker_consumes(
    tmp_path: Path, names: tuple[str, str]
) -> None:
    queue, stream = names
    config = dedupe_config(queue, stream, extra_source="single_active_consumer = true")
    with (
        WorkerProcess(config, tmp_path, name="a") as a,
        WorkerProcess(config, tmp_path, name="b") as b,
    ):
        # RabbitMQ refuses to redeclare a queue with a different x-single-active-consumer.
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await _declare(queue, {"x-single-active-consumer": False})
        await _declare(queue, {"x-single-active-consumer": True})
        await publish(messages([f"m-{i}" for i in range(500)]), routing_key=queue)
        await async_wait_for(lambda: _count_is(stream, 500), what="500 entries")
        consumed = [metric(w.metrics(), "messages_consumed_total") for w in (a, b)]
        assert sorted(consumed) == [0, 500]
        assert a.get("/ready")[0] == 200
        assert b.get("/ready")[0] == 200  # the standby is consuming too, just not given anything
        # The standby takes over when the active one goes.
        active, standby = (a, b) if consumed[0] else (b, a)
        active.kill()
        await publish(messages([f"n-{i}" for i in range(100)]), routing_key=queue)
        await async_wait_for(lambda: _count_is(stream, 600), what="600 entries")
        assert metric(standby.metrics(), "messages_consumed_total") >= 100


async def _declare(queue: str, arguments: dict[str, Any]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments=arguments)
