"""The exchange relay under a RabbitMQ memory alarm (``connection.blocked``), on the real broker.

A blocked publishing connection holds its batch as written: no confirm deadline, no reconnect, so
no second copy that the first would join once the alarm clears. Readiness is false meanwhile,
naming the block and the broker's reason, and the relay carries on by itself when RabbitMQ sends
``connection.unblocked``.

The alarm is broker-wide (every publisher on the machine waits while it lasts), so it is raised
for as short a time as the point needs and always restored, to the value it had.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aio_pika
import pytest

from tests.helpers import (
    AMQP_URL,
    WorkerProcess,
    async_wait_for,
    json_message,
    publish,
    queue_depth,
    unique,
)

pytestmark = pytest.mark.broker

COUNT = 200
PUBLISH_TIMEOUT_S = 1.0
BLOCKED_FOR_S = 2.5  # past the confirm deadline twice over: it must not count while blocked


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout.strip()


def current_watermark() -> list[str]:
    """The arguments that set the watermark back to what it is now: relative or absolute."""
    value = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    absolute = re.fullmatch(r"\{absolute,\s*(\d+)\}", value)
    if absolute:
        return ["absolute", absolute[1]]
    float(value)  # a fraction of the memory, e.g. 0.4; anything else is not ours to restore
    return [value]


@contextmanager
def memory_alarm() -> Iterator[None]:
    try:
        restore = current_watermark()
    except (OSError, RuntimeError, ValueError) as exc:
        pytest.skip(f"cannot read RabbitMQ's memory watermark: {exc}")
    rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
    try:
        yield
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", *restore)


@pytest.fixture
async def names() -> AsyncIterator[dict[str, str]]:
    names = {"queue": unique("q"), "target": unique("x-dst"), "out": unique("q-out")}
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(names["queue"], durable=True)
        exchange = await channel.declare_exchange(names["target"], "topic", durable=True)
        out = await channel.declare_queue(names["out"], durable=True)
        await out.bind(exchange, "#")
        yield names
        for queue in ("queue", "out"):
            await channel.queue_delete(names[queue])
        await channel.exchange_delete(names["target"])


async def relayed_ids(queue: str) -> list[str]:
    connection = await aio_pika.connect(AMQP_URL)
    ids: list[str] = []
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue)
        while (message := await source.get(no_ack=True, fail=False)) is not None:
            ids.append(message.message_id or "")
    return ids


def ready_detail(worker: WorkerProcess) -> tuple[int, dict[str, str]]:
    status, body = worker.get("/ready")
    return status, json.loads(body or b"{}").get("down", {})


async def test_a_blocked_relay_holds_its_batch_and_resumes_without_duplicates(
    tmp_path: Path, names: dict[str, str]
) -> None:
    config = f"""
[amqp]
url = "{AMQP_URL}"
publish_timeout = {PUBLISH_TIMEOUT_S}
heartbeat = 1

[batch]
max_messages = 50

[[sources]]
queue = "{names["queue"]}"

[[routes]]
name = "relay"
to = [ {{ exchange = "{names["target"]}", routing_key = "{{routing_key}}" }} ]
"""
    await publish(
        [json_message({"n": i}, message_id=str(i)) for i in range(COUNT)],
        routing_key=names["queue"],
    )
    worker = WorkerProcess(config, tmp_path, module="workers.exchange_relay", args=())
    try:
        with memory_alarm():
            worker.start(wait_ready=False)

            async def blocked() -> bool:
                status, down = ready_detail(worker)
                return status == 503 and "blocked" in down.get("amqp_out", "")

            await async_wait_for(blocked, within=8, what="/ready to say the relay is blocked")
            _, down = ready_detail(worker)
            held_since = time.monotonic()
            while time.monotonic() - held_since < BLOCKED_FOR_S:
                assert await blocked(), ready_detail(worker)
                await asyncio.sleep(0.2)
            routed_while_blocked = await queue_depth(names["out"])
        unblocked = time.monotonic()
        await async_wait_for(
            lambda: queue_depth_at_least(names["out"], COUNT), within=20, what="every message"
        )
        recovered = time.monotonic() - unblocked
        await async_wait_for(lambda: worker.get("/ready")[0] == 200, within=5)
        await async_wait_for(lambda: source_empty(names["queue"]), within=5)
        await asyncio.sleep(PUBLISH_TIMEOUT_S)  # a copy in an abandoned connection would land now
        assert worker.stop() == 0
    finally:
        worker.kill()
    ids = await relayed_ids(names["out"])
    logs = worker.logs()
    print(
        f"\nrelay under a memory alarm: {COUNT} sent, {len(ids)} arrived, "
        f"{len(ids) - len(set(ids))} duplicates; {routed_while_blocked} routed while blocked; "
        f"all in {recovered:.1f}s after the alarm cleared; /ready said {down}"
    )
    assert "low on memory" in down["amqp_out"]
    assert routed_while_blocked == 0
    assert sorted(ids, key=int) == [str(i) for i in range(COUNT)]  # each once
    assert logs.count("amqp_out: connected to") == 1  # held on the blocked connection
    assert "no publisher confirm" not in logs


async def queue_depth_at_least(queue: str, count: int) -> bool:
    return await queue_depth(queue) >= count


async def source_empty(queue: str) -> bool:
    return await queue_depth(queue) == 0
