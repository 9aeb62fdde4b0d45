"""The Redis Cluster sink against a real local cluster: slots spread over masters, redirections
(MOVED, ASK), dedupe in the stream's slot, WAIT for replicas, every node unreachable."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import SecretStr
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot

from proxy.config import RedisSettings
from proxy.errors import TransientError
from proxy.message import Message
from proxy.routing import StreamTarget
from proxy.sinks import Accepted, Publish
from proxy.sinks.redis_cluster import RedisClusterSink
from proxy.sinks.redis_stream import dedupe_key
from tests.helpers import unique
from tests.servers.redis_servers import RedisCluster

pytestmark = pytest.mark.broker


def settings(cluster: RedisCluster, **keys: Any) -> RedisSettings:
    return RedisSettings(
        mode="cluster", url=tuple(SecretStr(u) for u in cluster.urls()), timeout=2.0, **keys
    )


@pytest.fixture
async def sink(healthy_redis_cluster: RedisCluster) -> AsyncIterator[RedisClusterSink]:
    sink = RedisClusterSink(settings(healthy_redis_cluster), dedupe_window=60)
    await sink.connect()
    yield sink
    await sink.aclose()


@pytest.fixture
async def reader(healthy_redis_cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    host_port = healthy_redis_cluster.urls()[0].removeprefix("redis://").split(":")
    client = ClusterClient(host=host_port[0], port=int(host_port[1]))
    yield client
    await client.aclose()


def target(name: str, *, dedupe: bool = False) -> StreamTarget:
    return StreamTarget("r", "tmpl", name, None, dedupe)


def items(name: str, ids: list[str], *, dedupe: bool = False) -> list[Publish]:
    return [Publish(Message(i.encode(), message_id=i), target(name, dedupe=dedupe)) for i in ids]


async def lengths(reader: ClusterClient, names: list[str]) -> list[int]:
    return [int(await reader.xlen(name)) for name in names]


async def test_entries_for_streams_on_every_master_land_in_one_batch(
    sink: RedisClusterSink, reader: ClusterClient, healthy_redis_cluster: RedisCluster
) -> None:
    names = [unique("cs") for _ in range(12)]
    owners = {healthy_redis_cluster.master_for_slot(key_slot(n.encode())).name for n in names}
    assert len(owners) == 3, "12 random names should fall on all 3 masters"
    batch = [p for name in names for p in items(name, ["a", "b"])]
    assert await sink.publish_batch(batch) == [None] * len(batch)
    assert await lengths(reader, names) == [2] * len(names)


@pytest.mark.parametrize("tagged", [False, True], ids=["plain-name", "own-hash-tag"])
async def test_dedupe_keys_share_the_stream_slot(
    sink: RedisClusterSink, reader: ClusterClient, tagged: bool
) -> None:
    name = f"orders{{{unique('eu')}}}" if tagged else unique("cd")
    first = await sink.publish_batch(items(name, ["m1", "m2"], dedupe=True))
    again = await sink.publish_batch(items(name, ["m1", "m2", "m3"], dedupe=True))
    assert first == [None, None]
    assert again == [Accepted.DUPLICATE, Accepted.DUPLICATE, None]
    assert await lengths(reader, [name]) == [3]
    assert key_slot(dedupe_key(name, "m1").encode()) == key_slot(name.encode())


async def test_a_slot_migrated_between_batches_is_followed_by_ask_then_moved(
    sink: RedisClusterSink, reader: ClusterClient, healthy_redis_cluster: RedisCluster
) -> None:
    cluster = healthy_redis_cluster
    name = unique("cm")
    slot = key_slot(name.encode())
    assert await sink.publish_batch(items(name, ["1"], dedupe=True)) == [None]
    source = cluster.master_for_slot(slot)
    destination = next(m for m in cluster.masters() if m is not source)
    cluster.begin_migration(slot, destination)
    assert cluster.move_keys(slot, source, destination) >= 2  # the stream and a dedupe key
    # The source answers ASK (the keys are gone from it): a plain entry is written on the
    # destination. A dedupe call, whose new key is on neither node yet, gets TRYAGAIN: held.
    assert await sink.publish_batch(items(name, ["2"])) == [None]
    with pytest.raises(TransientError, match="rehashing"):
        await sink.publish_batch(items(name, ["3"], dedupe=True))
    cluster.finish_migration(slot, destination)
    # The sink's slot map still names the source, which now answers MOVED.
    assert await sink.publish_batch(items(name, ["1", "3"], dedupe=True)) == [
        Accepted.DUPLICATE,
        None,
    ]
    assert cluster.master_for_slot(slot) is destination
    assert await lengths(reader, [name]) == [3]


async def test_too_few_replicas_holds_the_batch(healthy_redis_cluster: RedisCluster) -> None:
    name = unique("cw")
    wanting = RedisClusterSink(settings(healthy_redis_cluster, min_replicas=2, replica_timeout=0.2))
    try:
        with pytest.raises(TransientError, match="1 of 2 replicas"):
            await wanting.publish_batch(items(name, ["1"]))
    finally:
        await wanting.aclose()
    satisfied = RedisClusterSink(settings(healthy_redis_cluster, min_replicas=1))
    try:
        assert await satisfied.publish_batch(items(name, ["2"])) == [None]
    finally:
        await satisfied.aclose()


async def test_every_node_unreachable_is_transient_then_heals(
    sink: RedisClusterSink, reader: ClusterClient, healthy_redis_cluster: RedisCluster
) -> None:
    name = unique("cu")
    healthy_redis_cluster.cut_all()
    try:
        with pytest.raises(TransientError):
            await sink.publish_batch(items(name, ["1"]))
        with pytest.raises(TransientError):
            await sink.ping()
    finally:
        healthy_redis_cluster.heal_all()
    await sink.ping()
    assert await sink.publish_batch(items(name, ["1"])) == [None]
    assert await lengths(reader, [name]) == [1]
