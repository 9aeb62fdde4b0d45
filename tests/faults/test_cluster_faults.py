"""Redis Cluster and Sentinel failing mid-flow: a master killed, a slot migrated, a Sentinel
failover, every cluster node unreachable. Every message id is counted, as in the other scenarios;
the rows join the fault-injection table printed at the end of the run."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot

from tests.faults.rig import Rig, message_ids
from tests.helpers import async_wait_for
from tests.servers.redis_servers import RedisCluster, RedisSentinelGroup

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MESSAGES = 3000


async def _ids(client: aioredis.Redis | ClusterClient, stream: str) -> Counter[str]:
    found: Counter[str] = Counter()
    start = "-"
    while page := await client.xrange(stream, min=start, count=10_000):
        for _entry_id, fields in page:
            found[fields.get(b"message_id", b"").decode()] += 1
        millis, seq = page[-1][0].decode().split("-")
        start = f"{millis}-{int(seq) + 1}"
    return found


class RedisRig(Rig):
    """The rig with the worker writing to a Redis Cluster or through Sentinel; read back there."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        dedupe: bool,
        redis_section: str,
        reader: Callable[[], aioredis.Redis | ClusterClient],
    ) -> None:
        super().__init__(tmp_path, dedupe=dedupe)
        self.redis_section = redis_section
        self.reader = reader

    def config(self) -> str:
        text = super().config()
        return re.sub(r"\[redis\].*?(?=\[dedupe\])", self.redis_section, text, flags=re.S)

    async def delivered(self) -> int:
        return (await self.counts()).total()

    async def counts(self, stream: str | None = None) -> Counter[str]:
        client = self.reader()
        try:
            return await _ids(client, stream or self.stream)
        finally:
            await client.aclose()


def cluster_section(cluster: RedisCluster) -> str:
    urls = ", ".join(f'"{u}"' for u in cluster.urls())
    return (
        f'[redis]\nmode = "cluster"\nurl = [{urls}]\ntimeout = 1\n'
        "min_replicas = 1\nreplica_timeout = 0.5\n\n"
    )


def cluster_reader(cluster: RedisCluster, *, direct: bool) -> Callable[[], ClusterClient]:
    """Reads through the addresses the cluster announces (the fault proxies), or ``direct`` from
    the nodes, for a fault that cuts the proxies. (redis-py does not follow ASK with an
    ``address_remap``: only for a test that migrates no slot.)"""
    nodes = [ClusterNode("127.0.0.1", cluster.client_port(node)) for node in cluster.nodes]
    if not direct:
        return lambda: ClusterClient(startup_nodes=nodes)
    ports = {cluster.client_port(node): node.port for node in cluster.nodes}
    nodes = [ClusterNode("127.0.0.1", node.port) for node in cluster.nodes]
    return lambda: ClusterClient(
        startup_nodes=nodes, address_remap=lambda a: (a[0], ports.get(a[1], a[1]))
    )


@pytest.fixture
async def cluster_rig(
    request: pytest.FixtureRequest, tmp_path: Path, healthy_redis_cluster: RedisCluster
) -> AsyncIterator[RedisRig]:
    dedupe, direct = request.param
    rig = RedisRig(
        tmp_path,
        dedupe=dedupe,
        redis_section=cluster_section(healthy_redis_cluster),
        reader=cluster_reader(healthy_redis_cluster, direct=direct),
    )
    try:
        yield rig
    finally:
        await rig.close()
        healthy_redis_cluster.heal()


@pytest.mark.parametrize(
    "cluster_rig", [(True, False), (False, False)], ids=["dedupe", "no-dedupe"], indirect=True
)
async def test_a_cluster_master_killed_mid_flow(
    cluster_rig: RedisRig, healthy_redis_cluster: RedisCluster
) -> None:
    """kill -9 of the master that owns the stream's slot; its replica takes over. With
    min_replicas = 1 what was acked is on the replica; the new master has no replica until the
    killed node comes back as one, so meanwhile batches are held."""
    cluster, rig = healthy_redis_cluster, cluster_rig
    master = cluster.master_for_slot(key_slot(rig.stream.encode()))
    await rig.declare()
    await rig.start_worker()
    ids = message_ids(MESSAGES)
    counts, recover_s, unready = await rig.fault_mid_flow(
        ids, master.kill, lambda: cluster.restart(master), fault_s=3.0
    )
    result = rig.record("redis cluster master kill -9", ids, counts, recover_s, unready)
    await rig.check(result)


@pytest.mark.parametrize(
    "cluster_rig", [(True, False), (False, False)], ids=["dedupe", "no-dedupe"], indirect=True
)
async def test_the_stream_slot_migrated_mid_flow(
    cluster_rig: RedisRig, healthy_redis_cluster: RedisCluster
) -> None:
    """The slot moves to another master while the worker writes to it: ASK while its keys are
    moving, MOVED once the slot is the other master's. Redirected entries are sent again alone,
    so nothing is written twice, with dedupe or without. A dedupe script call during the move gets
    TRYAGAIN after its ASK (its new key is on neither node): the batch is held, and the slot map
    reloaded before the retry finds the new owner without a MOVED."""
    cluster, rig = healthy_redis_cluster, cluster_rig
    slot = key_slot(rig.stream.encode())
    source = cluster.master_for_slot(slot)
    destination = next(m for m in cluster.masters() if m is not source)

    def begin() -> None:
        cluster.begin_migration(slot, destination)
        cluster.move_keys(slot, source, destination)

    await rig.declare()
    await rig.start_worker()
    ids = message_ids(MESSAGES)
    before, during, after = ids[:1500], ids[1500:2250], ids[2250:]
    # Messages in flight before, during and after the move, however slow the machine: each
    # phase is published (and reaches the worker) while the slot is in that state.
    await rig.publish_paced(before, 1.5)
    await asyncio.to_thread(begin)
    unready: list[bool] = []

    async def sample_readiness() -> None:
        while True:
            unready.append(not await asyncio.to_thread(rig.all_ready))
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(sample_readiness())
    await rig.publish_paced(during, 0.75)
    await async_wait_for(lambda: " by ASK" in rig.logs(), within=15, what="an ASK followed")
    length_at_heal = await rig.delivered()
    await asyncio.to_thread(cluster.finish_migration, slot, destination)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await rig.publish_paced(after, 0.75)
    recover_s = await rig.wait_recovered(length_at_heal)
    counts = await rig.wait_for_all(ids)
    result = rig.record("redis cluster slot migrated", ids, counts, recover_s, any(unready))
    logs = rig.logs()
    if cluster_rig.dedupe:
        assert "during rehashing of slot" in logs, logs  # TRYAGAIN
    else:
        assert " by MOVED" in logs, logs
    assert result.duplicates == 0, result
    await rig.check(result)


@pytest.mark.parametrize("cluster_rig", [(True, True)], ids=["dedupe"], indirect=True)
async def test_every_cluster_node_unreachable(
    cluster_rig: RedisRig, healthy_redis_cluster: RedisCluster
) -> None:
    cluster, rig = healthy_redis_cluster, cluster_rig
    await rig.declare()
    await rig.start_worker()
    ids = message_ids(MESSAGES)
    counts, recover_s, unready = await rig.fault_mid_flow(ids, cluster.cut_all, cluster.heal_all)
    result = rig.record("redis cluster all nodes cut 3s", ids, counts, recover_s, unready)
    assert unready, rig.logs()
    await rig.check(result)


@pytest.mark.parametrize("dedupe", [True, False], ids=["dedupe", "no-dedupe"])
async def test_a_sentinel_failover_mid_flow(
    tmp_path: Path, healthy_redis_sentinel: RedisSentinelGroup, dedupe: bool
) -> None:
    group = healthy_redis_sentinel
    sentinels = ", ".join(f'"{u}"' for u in group.sentinel_urls())
    section = (
        f'[redis]\nmode = "sentinel"\nsentinels = [{sentinels}]\n'
        f'service_name = "{group.SERVICE}"\ntimeout = 1\nreplica_timeout = 0.5\n\n'
    )
    rig = RedisRig(
        tmp_path,
        dedupe=dedupe,
        redis_section=section,
        reader=lambda: aioredis.Redis(port=group.current_master().port),
    )
    try:
        await rig.declare()
        await rig.start_worker()
        ids = message_ids(MESSAGES)
        counts, recover_s, unready = await rig.fault_mid_flow(
            ids, group.failover, lambda: None, fault_s=2.0
        )
        result = rig.record("redis sentinel failover", ids, counts, recover_s, unready)
        await rig.check(result)
    finally:
        await rig.close()
        await asyncio.to_thread(group.wait_healthy)
