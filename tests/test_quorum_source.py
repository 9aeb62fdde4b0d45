"""A quorum queue as a source, with ``x-delivery-limit``: the worker spends the limit only on
returns that really happened.

RabbitMQ counts a return (``x-delivery-count``) each time a delivery goes back to a quorum queue
unacked, and drops or dead-letters the message once the count passes the limit. The worker never
returns a message itself: a destination outage holds the batch unacked, bad input is
dead-lettered by the worker. So only connection losses (and consumer timeouts, and a killed
worker) spend it: one each, whatever the worker was holding.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest
from prometheus_client import CollectorRegistry

from proxy import __version__
from proxy.config import parse_config
from proxy.metrics import Metrics
from proxy.state import HealthState
from proxy.worker import Worker
from tests.helpers import (
    AMQP_URL,
    REDIS_URL,
    amqp_url_via,
    async_wait_for,
    declare_topology,
    delete_keys,
    delete_queues,
    publish,
    redis_url_via,
    stream_entries,
    unique,
)
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.broker

LIMIT = 2
MESSAGES = 100


def _target(url: str, default: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default


@pytest.fixture
def proxies() -> Iterator[dict[str, TcpProxy]]:
    started = {
        "amqp": TcpProxy(*_target(AMQP_URL, 5672)).start(),
        "redis": TcpProxy(*_target(REDIS_URL, 6379)).start(),
    }
    yield started
    for proxy in started.values():
        proxy.stop()


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    try:
        await async_wait_for(lambda: worker.health.snapshot().consumers == 1, what="consuming")
        yield worker
    finally:
        worker.stop_requested.set()
        await asyncio.wait_for(task, 15)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_batch_held_across_reconnects_spends_one_delivery_each_and_no_more(
    proxies: dict[str, TcpProxy],
) -> None:
    queue, stream, dlx, over = unique("qq"), unique("s"), unique("dlx"), unique("over")
    text = f"""
[amqp]
url = "{amqp_url_via(proxies["amqp"].port)}"
connect_timeout = 2

[redis]
url = "{redis_url_via(proxies["redis"].port)}"
timeout = 1

[[sources]]
queue = "{queue}"
arguments = {{ "x-queue-type" = "quorum", "x-delivery-limit" = {LIMIT}, "x-dead-letter-exchange" = "{dlx}" }}

[[routes]]
name = "all"
to = [ {{ stream = "{stream}" }} ]
"""  # noqa: E501
    metrics = Metrics(CollectorRegistry(), role="all", version=__version__)
    worker = Worker(parse_config(tomllib.loads(text), environ={}), role="all", metrics=metrics,
                    health=HealthState())  # fmt: skip
    await declare_topology(over, dlx)  # what the broker would drop past the limit lands here
    ids = [f"m-{i}" for i in range(MESSAGES)]
    try:
        async with running(worker):  # the worker declares the quorum queue
            proxies["redis"].cut()
            await publish([aio_pika.Message(b"m", message_id=i) for i in ids], routing_key=queue)
            await async_wait_for(lambda: worker.pipeline.pending == MESSAGES, what="all held")

            def held_again(losses: int) -> bool:
                reconnects = sample(metrics, "message_proxy_reconnects_total", broker="amqp")
                consuming = worker.health.snapshot().consumers == 1
                return reconnects == losses and consuming and worker.pipeline.pending == MESSAGES

            for lost in range(1, LIMIT + 1):  # as many losses as the limit allows
                proxies["amqp"].reset_connections()
                await async_wait_for(
                    partial(held_again, lost), within=10, what=f"held again after loss {lost}"
                )
            proxies["redis"].heal()
            await async_wait_for(
                lambda: sample(metrics, "message_proxy_messages_acked_total", queue=queue)
                == MESSAGES,
                within=15,
                what="all acked",
            )
        entries = await stream_entries(stream)
        assert Counter(e[b"message_id"].decode() for e in entries) == Counter(ids)  # once each
        counts = Counter(orjson.loads(e[b"headers"]).get("x-delivery-count") for e in entries)
        assert counts == Counter({LIMIT: MESSAGES})  # one return per loss, not one more
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            assert (await channel.declare_queue(over, passive=True)).declaration_result.message_count == 0  # noqa: E501
            assert (await channel.declare_queue(queue, passive=True)).declaration_result.message_count == 0  # noqa: E501
    finally:
        await delete_queues(queue, over)
        await delete_keys(stream)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            await (await connection.channel()).exchange_delete(dlx)
