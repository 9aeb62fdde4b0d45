"""A dead-letter destination that refuses holds the batch: nothing acked, nothing lost, readiness
false with the cause, and the flow resumes by itself once the operator fixes the destination."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import orjson
import pytest

from tests.helpers import (
    AMQP_URL,
    WorkerProcess,
    async_wait_for,
    declare_topology,
    delete_keys,
    delete_queues,
    publish,
    queue_depth,
    stream_entries,
    unique,
)

pytestmark = pytest.mark.broker

MESSAGES = 40  # every fourth one matches no route and needs dead-lettering


@pytest.fixture
async def names() -> AsyncIterator[dict[str, str]]:
    names = {
        "queue": unique("q"),
        "exchange": unique("x"),
        "stream": unique("s"),
        "dl_exchange": unique("dlx"),
        "dl_queue": unique("dlq"),
    }
    yield names
    await delete_queues(names["queue"], names["dl_queue"])
    await delete_keys(names["stream"])
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for exchange in (names["exchange"], names["dl_exchange"]):
            await channel.exchange_delete(exchange)


def config(names: dict[str, str]) -> str:
    return f"""
[batch]
max_messages = 10
max_delay_ms = 5

[[sources]]
queue = "{names["queue"]}"

[[routes]]
name = "good"
match.routing_key = "good"
to = [ {{ stream = "{names["stream"]}" }} ]

[dead_letter]
exchange = "{names["dl_exchange"]}"
routing_key = "dead"
"""


async def _drain(queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(AMQP_URL)
    got = []
    async with connection:
        source = await (await connection.channel()).get_queue(queue)
        while (message := await source.get(no_ack=True, fail=False)) is not None:
            got.append(message)
    return got


async def test_a_missing_dead_letter_exchange_holds_the_batch_until_it_exists(
    tmp_path: Path, names: dict[str, str]
) -> None:
    await declare_topology(names["queue"], names["exchange"])
    keys = ["bad" if i % 4 == 0 else "good" for i in range(MESSAGES)]
    with WorkerProcess(config(names), tmp_path) as worker:
        await publish(
            ((aio_pika.Message(b"m", message_id=f"m-{i}"), key) for i, key in enumerate(keys)),
            exchange=names["exchange"],
        )

        def unready_with_cause() -> dict[str, str] | None:
            status, body = worker.get("/ready")
            down = orjson.loads(body).get("down", {}) if status == 503 else {}
            return down if "dead_letter" in down else None

        try:
            down = await async_wait_for(unready_with_cause, within=10, what="/ready names it")
        except TimeoutError:
            raise AssertionError(worker.logs()) from None
        assert names["dl_exchange"] in down["dead_letter"]
        assert "NOT_FOUND" in down["dead_letter"], down
        await asyncio.sleep(2.0)  # several retries: still held, still one line for the cause
        assert (await asyncio.to_thread(worker.get, "/ready"))[0] == 503
        assert worker.logs().count("dead-letter destination refused") == 1, worker.logs()
        # Held means unacked: RabbitMQ still has every message of the held batch and behind it.
        written_while_held = len(await stream_entries(names["stream"]))
        assert written_while_held < MESSAGES - MESSAGES // 4

        await declare_topology(names["dl_queue"], names["dl_exchange"], "dead")
        fixed_at = time.monotonic()
        await async_wait_for(
            lambda: worker.get("/ready")[0] == 200, within=15, what=f"ready; {worker.logs()}"
        )
        await async_wait_for(
            lambda: _length_is(names["stream"], MESSAGES - MESSAGES // 4), within=10
        )
        resumed_s = time.monotonic() - fixed_at
        assert await queue_depth(names["queue"]) == 0
        assert worker.stop() == 0
    dead = await _drain(names["dl_queue"])
    assert sorted(m.message_id or "" for m in dead) == sorted(
        f"m-{i}" for i, key in enumerate(keys) if key == "bad"
    )
    assert {m.headers["x-message-proxy-error"] for m in dead} == {"unrouted"}
    good = [e[b"message_id"].decode() for e in await stream_entries(names["stream"])]
    assert sorted(good) == sorted(f"m-{i}" for i, key in enumerate(keys) if key == "good")
    print(f"\ndead-letter exchange created: flow resumed, ready again within {resumed_s:.1f}s")


async def _length_is(stream: str, count: int) -> bool:
    return len(await stream_entries(stream)) == count
