"""A RabbitMQ cluster node stopped mid-flow: the one the worker consumes from (a quorum queue
replicated on the 3 nodes), and the one the relay publishes to. The worker is given every node's
URL and finds by itself where to go on; every message id is counted, as in the other scenarios,
and the rows join the fault-injection table printed at the end of the run."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest

from tests.faults.rig import Result, Rig, message_ids
from tests.helpers import declare_topology, wait_for
from tests.servers.rabbit_servers import RabbitCluster, RabbitNode

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MESSAGES = 3000
MOVE_WITHIN_S = 10.0  # from the stop of its node until the worker consumes from another
QUORUM = {"x-queue-type": "quorum"}


def toml_list(urls: list[str]) -> str:
    return "[" + ", ".join(f'"{url}"' for url in urls) + "]"


class ClusterRig(Rig):
    """The rig with one side of the worker on the cluster: its source (a quorum queue on the 3
    nodes) or its exchange destination, given as the list of the nodes' URLs."""

    def __init__(self, tmp_path: Path, cluster: RabbitCluster, *, side: str, dedupe: bool) -> None:
        super().__init__(tmp_path, dedupe=dedupe, exchange=side == "amqp_out")
        self.cluster = cluster
        self.side = side
        if side == "amqp":
            self.source_url = cluster.nodes[0].url
        else:
            self.out_url = cluster.nodes[0].url

    def config(self) -> str:
        text = super().config()
        urls = toml_list(self.cluster.urls())
        section = re.escape(f"[{self.side}]")
        text = re.sub(rf"({section}\nurl = )\"[^\"]*\"", rf"\g<1>{urls}", text)
        if self.side == "amqp":
            text = text.replace(
                f'queue = "{self.queue}"\n',
                f'queue = "{self.queue}"\narguments = {{ "x-queue-type" = "quorum" }}\n',
            )
        return text

    async def declare(self) -> None:
        if self.side == "amqp":
            await declare_topology(self.queue, url=self.source_url, arguments=QUORUM)
            listed = await asyncio.to_thread(
                self.cluster.nodes[1].ctl, "list_queues", "name", "members", "--formatter", "json"
            )
            rows = {row["name"]: row["members"] for row in json.loads(listed)}
            members = rows[self.queue]
            assert len(members) == 3, members  # replicated on every node
        else:
            await declare_topology(self.queue, url=self.source_url)
            await declare_topology(
                self.out_queue, self.out_exchange, url=self.out_url, arguments=QUORUM
            )

    def node_of(self, broker: str) -> RabbitNode:
        """The cluster node the worker's ``broker`` connection is on, as ``/ready`` names it."""
        (worker,) = self.live_workers()
        status, body = worker.get("/ready")
        node = json.loads(body).get("nodes", {}).get(broker)
        found = [n for n in self.cluster.nodes if f"127.0.0.1:{n.port}" == node]
        assert status == 200 and found, (status, body)
        return found[0]

    def read_from_another_node(self, victim: RabbitNode) -> None:
        other = next(n for n in self.cluster.nodes if n is not victim)
        if self.side == "amqp":
            self.source_url = other.url
        else:
            self.out_url = other.url

    def moved_off(self, victim: RabbitNode) -> bool:
        (worker,) = self.live_workers()
        status, body = worker.get("/ready")
        node = json.loads(body).get("nodes", {}).get(self.side)
        return status == 200 and node not in (None, f"127.0.0.1:{victim.port}")


@pytest.fixture
def healthy_rabbit_cluster(rabbit_cluster: RabbitCluster) -> RabbitCluster:
    """The session's cluster with its 3 nodes running (a failed test may have left one off)."""
    for node in rabbit_cluster.nodes:
        if len(rabbit_cluster.running_nodes()) == 3:
            break
        try:
            node.start_app()
        except Exception:  # already running: the next one is the stopped one
            continue
    wait_for(lambda: len(rabbit_cluster.running_nodes()) == 3, 60, what="3 running nodes")
    return rabbit_cluster


async def stop_the_workers_node_mid_flow(rig: ClusterRig) -> tuple[float, Result]:
    """Publish 3,000 over 3 s; at 1 s stop the app of the node the worker's ``side`` is on;
    return the seconds until the worker is ready on another node, and the counts."""
    await rig.declare()
    await rig.start_worker()
    victim = rig.node_of(rig.side)
    rig.read_from_another_node(victim)
    ids = message_ids(MESSAGES)
    publisher = asyncio.create_task(rig.publish_paced(ids, 3.0))
    try:
        await asyncio.sleep(1.0)
        stopped_at = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(victim.stop_app))
        while not await asyncio.to_thread(rig.moved_off, victim):
            assert time.monotonic() - stopped_at < 30, rig.logs()
            await asyncio.sleep(0.05)
        moved_s = time.monotonic() - stopped_at
        await stopping
        await publisher
        counts = await rig.wait_for_all(ids)
    finally:
        await asyncio.to_thread(victim.start_app)
    result = rig.record(f"rabbitmq node of the {rig.side} stopped", ids, counts, moved_s, None)
    return moved_s, result


@pytest.mark.parametrize("dedupe", [True, False], ids=["dedupe", "no-dedupe"])
async def test_the_node_the_worker_consumes_from_is_stopped_mid_flow(
    tmp_path: Path, healthy_rabbit_cluster: RabbitCluster, dedupe: bool
) -> None:
    rig = ClusterRig(tmp_path, healthy_rabbit_cluster, side="amqp", dedupe=dedupe)
    try:
        moved_s, result = await stop_the_workers_node_mid_flow(rig)
        assert moved_s < MOVE_WITHIN_S, f"{moved_s:.1f}s\n{rig.logs()}"
        await rig.check(result)
    finally:
        await rig.close()


async def test_the_node_the_relay_publishes_to_is_stopped_mid_flow(
    tmp_path: Path, healthy_rabbit_cluster: RabbitCluster
) -> None:
    """At least once: publishes the stopped node had not confirmed are sent again on another
    node; some of those it had routed before it stopped arrive twice."""
    rig = ClusterRig(tmp_path, healthy_rabbit_cluster, side="amqp_out", dedupe=False)
    try:
        moved_s, result = await stop_the_workers_node_mid_flow(rig)
        assert moved_s < MOVE_WITHIN_S, f"{moved_s:.1f}s\n{rig.logs()}"
        await rig.check(result)
    finally:
        await rig.close()
