"""Stream-queue offsets recorded by the Redis sink against the real Redis: in the same script as
the entries, so a batch sent again (its reply was lost) or by a second worker lands once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pydantic import SecretStr
from redis.asyncio.cluster import RedisCluster as ClusterClient

from proxy.config import RedisSettings
from proxy.errors import PermanentError, TransientError
from proxy.message import Message
from proxy.routing import StreamTarget
from proxy.sinks import Accepted, Publish
from proxy.sinks.redis_cluster import RedisClusterSink
from proxy.sinks.redis_stream import RedisStreamSink, dedupe_key
from proxy.stream_offsets import StreamPosition
from tests.helpers import REDIS_URL, delete_keys, redis_client, stream_entries, unique
from tests.servers.redis_servers import RedisCluster

pytestmark = pytest.mark.broker


@pytest.fixture
async def sink() -> AsyncIterator[RedisStreamSink]:
    sink = RedisStreamSink(RedisSettings(url=SecretStr(REDIS_URL), timeout=2.0), dedupe_window=60)
    yield sink
    await sink.aclose()


@pytest.fixture
async def keys() -> AsyncIterator[dict[str, str]]:
    names = {"stream": unique("os"), "other": unique("os"), "offset": unique("offset")}
    yield names
    await delete_keys(*names.values())


def items(stream: str, offsets: range, key: str, *, dedupe: bool = False) -> list[Publish]:
    target = StreamTarget("r", stream, stream, dedupe=dedupe)
    return [
        Publish(Message(b"m-%d" % n, queue="q"), target, position=StreamPosition(key, n))
        for n in offsets
    ]


async def bodies(stream: str) -> list[bytes]:
    return [entry[b"body"] for entry in await stream_entries(stream)]


async def test_a_batch_sent_twice_is_written_once_and_its_offset_recorded_with_it(
    sink: RedisStreamSink, keys: dict[str, str]
) -> None:
    batch = items(keys["stream"], range(5), keys["offset"])
    outcomes, recorded = await sink.publish_recording(batch, {keys["offset"]: 4})
    assert (outcomes, recorded) == ([None] * 5, True)
    assert await sink.read_offsets([keys["offset"], keys["other"]]) == {keys["offset"]: 4}
    # The same batch again, as after a reply lost on the way back, then one overlapping it.
    outcomes, recorded = await sink.publish_recording(batch, {keys["offset"]: 4})
    assert outcomes == [Accepted.ALREADY_WRITTEN] * 5
    overlapping = items(keys["stream"], range(3, 8), keys["offset"])
    outcomes, _ = await sink.publish_recording(overlapping, {keys["offset"]: 7})
    assert outcomes == [Accepted.ALREADY_WRITTEN] * 2 + [None] * 3
    assert await bodies(keys["stream"]) == [b"m-%d" % n for n in range(8)]
    assert await sink.read_offsets([keys["offset"]]) == {keys["offset"]: 7}


async def test_fan_out_and_dedupe_in_the_same_script(
    sink: RedisStreamSink, keys: dict[str, str]
) -> None:
    key = keys["offset"]
    message = Message(b"x", queue="q", message_id="id-1")
    position = StreamPosition(key, 0)
    deduped = StreamTarget("r", keys["other"], keys["other"], dedupe=True)
    again = Message(b"y", queue="q", message_id="id-1")
    batch = [
        Publish(message, StreamTarget("r", keys["stream"], keys["stream"]), position=position),
        Publish(message, deduped, position=position),
        Publish(again, deduped, position=StreamPosition(key, 1)),
    ]
    try:
        outcomes, recorded = await sink.publish_recording(batch, {key: 1})
    finally:
        await delete_keys(dedupe_key(keys["other"], "id-1"))
    assert outcomes == [None, None, Accepted.DUPLICATE] and recorded
    assert await bodies(keys["stream"]) == [b"x"]
    assert await bodies(keys["other"]) == [b"x"]


async def test_a_refused_entry_records_no_offset(
    sink: RedisStreamSink, keys: dict[str, str]
) -> None:
    client = redis_client()
    await client.set(keys["other"], "not a stream")
    await client.aclose()
    batch = [
        *items(keys["stream"], range(2), keys["offset"]),
        *items(keys["other"], range(2, 3), keys["offset"]),
    ]
    outcomes, recorded = await sink.publish_recording(batch, {keys["offset"]: 2})
    assert outcomes[:2] == [None, None] and isinstance(outcomes[2], PermanentError)
    assert not recorded
    assert await sink.read_offsets([keys["offset"]]) == {}
    await sink.record_offsets({keys["offset"]: 2})  # once its dead letter was written
    await sink.record_offsets({keys["offset"]: 1})  # never back: another worker may be ahead
    assert await sink.read_offsets([keys["offset"]]) == {keys["offset"]: 2}


async def test_an_offset_key_holding_something_else_holds_the_batch_naming_it(
    sink: RedisStreamSink, keys: dict[str, str]
) -> None:
    client = redis_client()
    await client.set(keys["offset"], "junk")
    await client.aclose()
    with pytest.raises(TransientError, match=keys["offset"]):
        await sink.read_offsets([keys["offset"]])
    with pytest.raises(TransientError, match=keys["offset"]):
        await sink.publish_recording(items(keys["stream"], range(1), keys["offset"]), {})
    assert await bodies(keys["stream"]) == []


async def test_a_cluster_records_after_the_batch_and_leaves_out_what_it_recorded(
    healthy_redis_cluster: RedisCluster, keys: dict[str, str]
) -> None:
    urls = tuple(SecretStr(url) for url in healthy_redis_cluster.urls())
    sink = RedisClusterSink(RedisSettings(mode="cluster", url=urls, timeout=2.0))
    try:
        batch = items(keys["stream"], range(3), keys["offset"])
        outcomes, recorded = await sink.publish_recording(batch, {keys["offset"]: 2})
        assert (outcomes, recorded) == ([None] * 3, False)  # the keys span slots: not with it
        await sink.record_offsets({keys["offset"]: 2})
        await sink.record_offsets({keys["offset"]: 1})  # never back
        assert await sink.read_offsets([keys["offset"]]) == {keys["offset"]: 2}
        overlapping = items(keys["stream"], range(2, 5), keys["offset"])
        outcomes, _ = await sink.publish_recording(overlapping, {keys["offset"]: 4})
        assert outcomes == [Accepted.ALREADY_WRITTEN, None, None]
    finally:
        await sink.aclose()
    reader = ClusterClient.from_url(healthy_redis_cluster.urls()[0])
    try:
        entries = await reader.xrange(keys["stream"])
        await reader.delete(keys["stream"], keys["offset"])
    finally:
        await reader.aclose()
    assert [fields[b"body"] for _, fields in entries] == [b"m-%d" % n for n in range(5)]
