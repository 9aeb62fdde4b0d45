"""Several AMQP nodes in one URL list: a worker moves to the next node at once when its node goes,
waits its backoff only once every node failed, and says in ``/ready`` and ``/metrics`` which node
each connection is on.

Three TCP proxies in front of the machine's one RabbitMQ stand for three nodes: a proxy cut is a
node gone, as seen from the worker. (The real 3-node cluster, with quorum queues, is in
``tests/faults/test_rabbit_cluster_faults.py``.)
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from proxy import __version__
from proxy.amqp.nodes import STABLE_AFTER_S
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
    ready_and_unacked,
    stream_message_ids,
    unique,
)
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.broker


@pytest.fixture
def nodes() -> Iterator[dict[str, list[TcpProxy]]]:
    """Three "nodes" for the source and three for the exchange destinations."""
    parts = urlsplit(AMQP_URL)
    target = (parts.hostname or "127.0.0.1", parts.port or 5672)
    started = {side: [TcpProxy(*target).start() for _ in range(3)] for side in ("in", "out")}
    yield started
    for proxies in started.values():
        for proxy in proxies:
            proxy.stop()


def url_list(proxies: list[TcpProxy]) -> str:
    return "[" + ", ".join(f'"{amqp_url_via(proxy.port)}"' for proxy in proxies) + "]"


def on_node(proxies: list[TcpProxy], node: str | None) -> TcpProxy | None:
    return next((p for p in proxies if f"127.0.0.1:{p.port}" == node), None)


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    task = asyncio.create_task(worker.run())
    try:
        await async_wait_for(lambda: worker.health.snapshot().is_ready(), what="ready")
        yield worker
    finally:
        worker.stop_requested.set()
        await asyncio.wait_for(task, 15)


async def settled(queue: str) -> bool:
    return await ready_and_unacked(queue) == (0, 0)


async def drain(queue: str) -> list[str]:
    connection = await aio_pika.connect(AMQP_URL)
    ids = []
    async with connection:
        source = await (await connection.channel()).get_queue(queue)
        while (message := await source.get(no_ack=True, fail=False)) is not None:
            ids.append(message.message_id or "")
    return ids


async def test_a_worker_moves_to_the_next_node_at_once_and_backs_off_only_after_all(
    nodes: dict[str, list[TcpProxy]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy")
    queue, stream, exchange, out_queue = unique("q"), unique("s"), unique("x"), unique("o")
    text = f"""
[amqp]
url = {url_list(nodes["in"])}
connect_timeout = 2

[amqp_out]
url = {url_list(nodes["out"])}
connect_timeout = 2
publish_timeout = 2

[redis]
url = "{REDIS_URL}"

[[sources]]
queue = "{queue}"

[[routes]]
name = "both"
to = [ {{ stream = "{stream}" }}, {{ exchange = "{exchange}", routing_key = "k" }} ]
"""
    metrics = Metrics(CollectorRegistry(), role="all", version=__version__)
    health = HealthState()
    metrics.broker_node.follow(lambda: health.snapshot().nodes())
    worker = Worker(parse_config(tomllib.loads(text), environ={}), role="all", metrics=metrics,
                    health=health)  # fmt: skip
    await declare_topology(out_queue, exchange)
    sent: list[str] = []

    async def moves(name: str) -> None:
        sent.append(name)
        await publish([aio_pika.Message(b"m", message_id=name)], routing_key=queue)
        # Acked: written and published (were it still in flight when a node goes, it would be
        # sent again, at least once, and counted twice below).
        await async_wait_for(
            lambda: metrics.registry.get_sample_value(
                "message_proxy_messages_acked_total", {"queue": queue}
            )
            == len(sent),
            within=10,
            what=f"{name} acked",
        )
        await async_wait_for(
            lambda: health.snapshot().is_ready() and "amqp_out" in health.snapshot().nodes(),
            within=10,
            what="ready",
        )
        # Counted once written to the socket: a cut before RabbitMQ has read the ack would have
        # it deliver the message again (AMQP's at-least-once, not the worker's doing).
        await async_wait_for(lambda: settled(queue), within=10, what=f"{name} settled")

    def node_series() -> dict[str, str]:
        return {
            sample.labels["broker"]: sample.labels["node"]
            for family in metrics.registry.collect()
            if family.name == "message_proxy_broker_node_info"
            for sample in family.samples
        }

    try:
        async with running(worker):
            await moves("first")
            first = health.snapshot().nodes()
            assert set(first) == {"amqp", "amqp_out"}, first
            assert node_series() == first
            gone_in, gone_out = on_node(nodes["in"], first["amqp"]), on_node(
                nodes["out"], first["amqp_out"]
            )
            assert gone_in is not None and gone_out is not None, first

            # The nodes both connections are on go: each moves to another node, with no backoff.
            caplog.clear()
            gone_in.cut()
            gone_out.cut()
            await async_wait_for(
                lambda: health.snapshot().nodes().get("amqp") not in (None, first["amqp"]),
                within=5,
                what="consuming from another node",
            )
            await moves("second")  # published on another amqp_out node after the lost one
            moved = health.snapshot().nodes()
            assert moved["amqp"] != first["amqp"] and moved["amqp_out"] != first["amqp_out"]
            assert node_series() == moved  # the old nodes' series are gone, not left at 1
            lines = [record.getMessage() for record in caplog.records]
            assert any(f"trying {moved['amqp']}" in line for line in lines), lines
            # The source went on at once; the exchange sink too (the pipeline held the batch
            # for its first 0.1 s step, so that readiness shows the loss).
            assert not [line for line in lines if line.startswith("amqp: ") and "; retry " in line]

            # Every source node gone: each is tried once, then the backoff waits. (Once the
            # connection has stayed up a while: one dropped at once would count in the round.)
            await asyncio.sleep(STABLE_AFTER_S)
            caplog.clear()
            for proxy in nodes["in"]:
                proxy.cut()
            await async_wait_for(
                lambda: any("; retry 1 in" in r.getMessage() for r in caplog.records),
                within=10,
                what="the first backoff",
            )
            lines = [record.getMessage() for record in caplog.records]
            before = lines[: next(i for i, line in enumerate(lines) if "; retry 1 in" in line) + 1]
            tried = [line for line in before if "lost or refused" in line]
            assert len(tried) == 3, before  # the lost node, then the other two
            assert "amqp" not in health.snapshot().nodes()
            down = health.snapshot().problems()["amqp"]
            assert down.startswith("127.0.0.1:") and "guest" not in down, down

            back = nodes["in"][0]
            back.heal()
            await async_wait_for(
                lambda: health.snapshot().nodes().get("amqp") == f"127.0.0.1:{back.port}",
                within=10,
                what="consuming from the node that came back",
            )
            await moves("third")
        assert sorted(await drain(out_queue)) == sorted(sent)
        assert sorted(await stream_message_ids(stream)) == sorted(sent)
    finally:
        await delete_queues(queue, out_queue)
        await delete_keys(stream)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            await (await connection.channel()).exchange_delete(exchange)

