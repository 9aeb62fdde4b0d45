"""Broker-side helpers: names, topology, and timing a drain from the broker's side."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import aiormq
import redis.asyncio as aioredis

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ROUTING_KEY = "order.created"
SENT_HEADER = "x-bench-sent-ns"  # the publish time, in ns, of the latency workload


def unique(prefix: str) -> str:
    return f"bench-{prefix}-{uuid.uuid4().hex[:8]}"


async def connect() -> aiormq.abc.AbstractConnection:
    return await aiormq.connect(AMQP_URL)


async def declare_queue(queue: str, *, exchange: str | None = None) -> None:
    connection = await connect()
    try:
        channel = await connection.channel()
        await channel.queue_declare(queue, durable=True)
        if exchange:
            await channel.exchange_declare(exchange, exchange_type="topic", durable=True)
            await channel.queue_bind(queue, exchange, routing_key="#")
    finally:
        await connection.close()


async def delete_queue(*queues: str) -> None:
    connection = await connect()
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
    finally:
        await connection.close()


async def delete_exchange(*exchanges: str) -> None:
    connection = await connect()
    try:
        channel = await connection.channel()
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


async def queue_counts(channel: aiormq.abc.AbstractChannel, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) through a passive declare."""
    ok = await channel.queue_declare(queue, passive=True)
    return int(ok.message_count or 0), int(ok.consumer_count or 0)


async def queue_depth(queue: str) -> int:
    connection = await connect()
    try:
        channel = await connection.channel()
        return (await queue_counts(channel, queue))[0]
    finally:
        await connection.close()


def redis_client() -> aioredis.Redis:
    return aioredis.Redis.from_url(REDIS_URL)


async def delete_keys(*keys: str) -> None:
    client = redis_client()
    try:
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@dataclass
class DrainTiming:
    first_delivery: float  # perf_counter when the queue's ready count first dropped
    done: float  # perf_counter when the queue was empty and the output complete
    delivered_by: float  # perf_counter when the ready count reached 0

    @property
    def seconds(self) -> float:
        return self.done - self.first_delivery


async def observe_drain(
    queue: str,
    total: int,
    output_complete: Callable[[], object] | None,
    *,
    interval: float = 0.005,
    limit_s: float = 600.0,
    alive: Callable[[], bool] = lambda: True,
    on_first: Callable[[], None] = lambda: None,
    require_empty: bool = True,
) -> DrainTiming:
    """Time a drain from the broker's side, the same way for every peer.

    Start: the first poll that sees fewer than ``total`` ready messages (the consumer took its
    first prefetch window). End: the first poll at which no message is ready and
    ``output_complete()`` (a coroutine function: stream length or destination queue depth) holds.
    With ``require_empty=False`` the end is when the output is complete, whatever is left.
    """
    connection = await connect()
    try:
        channel = await connection.channel()
        deadline = time.perf_counter() + limit_s
        first = delivered = 0.0
        while True:
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"drain of {queue} did not finish in {limit_s}s")
            if not alive():
                raise RuntimeError("the process under test exited during the drain")
            ready, _consumers = await queue_counts(channel, queue)
            now = time.perf_counter()
            if not first and ready < total:
                first = now
                on_first()
            if first and (ready == 0 or not require_empty):
                delivered = delivered or now
                complete = True if output_complete is None else await output_complete()  # type: ignore[misc]
                if complete:
                    return DrainTiming(first, time.perf_counter(), delivered)
            await asyncio.sleep(interval)
    finally:
        await connection.close()
