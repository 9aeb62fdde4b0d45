"""The Redis stream sink against the real Redis: plain writes, dedupe, refusals, hung peers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from pydantic import SecretStr

from proxy.config import RedisSettings
from proxy.encoding import DeadLetterInfo
from proxy.errors import PermanentError, TransientError
from proxy.message import Message
from proxy.routing import StreamTarget
from proxy.sinks import Accepted, Publish
from proxy.sinks.memory import MemorySink
from proxy.sinks.redis_stream import (
    TOO_LARGE_BODY_KEPT,
    RedisStreamSink,
    _has_idmp,
    _NativeDedupe,
    dedupe_key,
)
from tests.faults.fakes import flush, pipeline_for, submit
from tests.helpers import (
    REDIS_URL,
    WorkerProcess,
    async_wait_for,
    delete_keys,
    delete_queues,
    free_port,
    publish,
    redis_client,
    redis_url_via,
    stream_entries,
    unique,
)
from tests.tcp_proxy import TcpProxy

WINDOW_S = 60.0


def settings(url: str, **keys: Any) -> RedisSettings:
    return RedisSettings(url=SecretStr(url), **keys)


@pytest.fixture
async def stream() -> AsyncIterator[str]:
    name = unique("sink")
    yield name
    client = redis_client()
    try:
        keys = [name, *[key async for key in client.scan_iter(match=f"{{{name}}}:*")]]
        await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def sink() -> AsyncIterator[RedisStreamSink]:
    sink = RedisStreamSink(settings(REDIS_URL, timeout=2.0), dedupe_window=WINDOW_S)
    yield sink
    await sink.aclose()


def target(name: str, *, dedupe: bool = False, maxlen: int | None = None) -> StreamTarget:
    return StreamTarget("r", "tmpl", name, maxlen, dedupe)


def msg(body: bytes = b"x", message_id: str | None = None, **kwargs: Any) -> Message:
    return Message(body, routing_key="k", message_id=message_id, **kwargs)


async def bodies(stream: str) -> list[bytes]:
    return [fields[b"body"] for fields in await stream_entries(stream)]


# --- plain writes -----------------------------------------------------------------------------


@pytest.mark.broker
async def test_plain_writes_keep_order_and_fields(sink: RedisStreamSink, stream: str) -> None:
    items = [Publish(msg(f"{i}".encode(), f"id-{i}"), target(stream)) for i in range(5)]
    assert await sink.publish_batch(items) == [None] * 5
    entries = await stream_entries(stream)
    assert [e[b"body"] for e in entries] == [b"0", b"1", b"2", b"3", b"4"]
    assert entries[0][b"message_id"] == b"id-0"
    assert entries[0][b"routing_key"] == b"k"


@pytest.mark.broker
async def test_maxlen_trims_approximately(sink: RedisStreamSink, stream: str) -> None:
    items = [Publish(msg(b"%d" % i), target(stream, maxlen=10)) for i in range(1000)]
    await sink.publish_batch(items)
    client = redis_client()
    try:
        assert 10 <= await client.xlen(stream) < 1000
    finally:
        await client.aclose()


# --- dedupe -----------------------------------------------------------------------------------


@pytest.mark.broker
async def test_dedupe_writes_each_id_once_across_batches(
    sink: RedisStreamSink, stream: str
) -> None:
    first = [Publish(msg(b"a", "1"), target(stream, dedupe=True))]
    again = [
        Publish(msg(b"a-again", "1"), target(stream, dedupe=True)),
        Publish(msg(b"b", "2"), target(stream, dedupe=True)),
    ]
    assert await sink.publish_batch(first) == [None]
    assert await sink.publish_batch(again) == [Accepted.DUPLICATE, None]
    assert await bodies(stream) == [b"a", b"b"]


@pytest.mark.broker
async def test_dedupe_within_one_batch_and_order_with_messages_without_id(
    sink: RedisStreamSink, stream: str
) -> None:
    dedupe = target(stream, dedupe=True)
    items = [
        Publish(msg(b"1", "a"), dedupe),
        Publish(msg(b"2"), dedupe),
        Publish(msg(b"3", "a"), dedupe),
        Publish(msg(b"4", ""), dedupe),  # an empty id is no id
        Publish(msg(b"5", "b"), dedupe),
    ]
    outcomes = await sink.publish_batch(items)
    assert outcomes == [
        None,
        Accepted.NO_MESSAGE_ID,
        Accepted.DUPLICATE,
        Accepted.NO_MESSAGE_ID,
        None,
    ]
    assert await bodies(stream) == [b"1", b"2", b"4", b"5"]
    # Messages without an id are at-least-once: written again when sent again.
    assert await sink.publish_batch(items[1:2]) == [Accepted.NO_MESSAGE_ID]
    assert await bodies(stream) == [b"1", b"2", b"4", b"5", b"2"]


@pytest.mark.broker
async def test_dedupe_is_per_stream_and_keys_expire_with_the_window(
    sink: RedisStreamSink, stream: str
) -> None:
    other = f"{stream}-other"
    message = msg(b"m", "same-id")
    items = [
        Publish(message, target(stream, dedupe=True)),
        Publish(message, target(other, dedupe=True)),
    ]
    assert await sink.publish_batch(items) == [None, None]
    client = redis_client()
    try:
        ttl = await client.pttl(dedupe_key(stream, "same-id"))
        assert WINDOW_S * 1000 - 5000 < ttl <= WINDOW_S * 1000
        assert await client.xlen(other) == 1
        await client.delete(other, dedupe_key(other, "same-id"))
    finally:
        await client.aclose()


@pytest.mark.broker
async def test_an_expired_id_is_written_again(stream: str) -> None:
    sink = RedisStreamSink(settings(REDIS_URL), dedupe_window=0.05)
    try:
        item = [Publish(msg(b"m", "id"), target(stream, dedupe=True))]
        assert await sink.publish_batch(item) == [None]
        await asyncio.sleep(0.15)
        assert await sink.publish_batch(item) == [None]
    finally:
        await sink.aclose()
    assert len(await bodies(stream)) == 2


@pytest.mark.broker
async def test_two_sinks_share_the_dedupe_state(sink: RedisStreamSink, stream: str) -> None:
    """Replicas: another process's write of the same id is recognised."""
    other = RedisStreamSink(settings(REDIS_URL), dedupe_window=WINDOW_S)
    try:
        items = [Publish(msg(b"%d" % i, f"id-{i}"), target(stream, dedupe=True)) for i in range(50)]
        first, second = await asyncio.gather(sink.publish_batch(items), other.publish_batch(items))
    finally:
        await other.aclose()
    written = [a is None or b is None for a, b in zip(first, second, strict=True)]
    assert all(written)
    assert sum(o is Accepted.DUPLICATE for o in first + second) == 50
    assert len(await bodies(stream)) == 50


@pytest.mark.broker
async def test_noscript_reloads_and_runs_only_what_did_not_run(
    sink: RedisStreamSink, stream: str
) -> None:
    dedupe = target(stream, dedupe=True)
    await sink.publish_batch([Publish(msg(b"1", "1"), dedupe)])
    client = redis_client()
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    items = [
        Publish(msg(b"plain"), target(stream)),
        Publish(msg(b"1", "1"), dedupe),
        Publish(msg(b"2", "2"), dedupe),
    ]
    assert await sink.publish_batch(items) == [None, Accepted.DUPLICATE, None]
    assert await bodies(stream) == [b"1", b"plain", b"2"]


@pytest.mark.broker
async def test_a_refused_write_leaves_no_dedupe_key(sink: RedisStreamSink, stream: str) -> None:
    client = redis_client()
    try:
        await client.set(stream, "not a stream")
        items = [
            Publish(msg(b"1", "1"), target(stream, dedupe=True)),
            Publish(msg(b"2"), target(stream)),
        ]
        outcomes = await sink.publish_batch(items)
        assert all(isinstance(o, PermanentError) and o.reason == "rejected" for o in outcomes)
        assert "WRONGTYPE" in str(outcomes[0])
        assert not await client.exists(dedupe_key(stream, "1"))
    finally:
        await client.aclose()


# --- what cannot be encoded or is too large -----------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"n": value}
    return value


@pytest.mark.broker
async def test_headers_that_cannot_be_encoded_are_refused_not_raised(
    sink: RedisStreamSink, stream: str
) -> None:
    bad = msg(b"bad", "bad", headers=_nested(300))  # orjson refuses nesting this deep
    good = msg(b"good", "good")
    outcomes = await sink.publish_batch(
        [Publish(bad, target(stream)), Publish(good, target(stream))]
    )
    assert isinstance(outcomes[0], PermanentError)
    assert outcomes[0].reason == "rejected"
    assert outcomes[1] is None
    info = DeadLetterInfo("rejected", "cannot encode", "r", 1)
    assert await sink.publish_batch([Publish(bad, target(stream), info)]) == [None]
    entries = await stream_entries(stream)
    assert [e[b"body"] for e in entries] == [b"good", b"bad"]
    assert b"headers" not in entries[1]
    assert entries[1][b"error"] == b"rejected"


@pytest.mark.broker
async def test_a_too_large_dead_letter_keeps_only_the_head_of_the_body(
    sink: RedisStreamSink, stream: str
) -> None:
    body = b"0123456789" * 10_000
    info = DeadLetterInfo("too-large", "body is 100000 bytes", None, 1)
    assert await sink.publish_batch([Publish(msg(body, "big"), target(stream), info)]) == [None]
    (entry,) = await stream_entries(stream)
    assert entry[b"body"] == body[:TOO_LARGE_BODY_KEPT]
    assert entry[b"body_size"] == b"100000"
    assert entry[b"error"] == b"too-large"
    assert entry[b"message_id"] == b"big"


@pytest.mark.broker
@pytest.mark.slow
async def test_worker_dead_letters_a_too_large_message_without_its_body(tmp_path: Path) -> None:
    queue, stream, dead = unique("q"), unique("s"), unique("dl")
    config = f"""
max_message_bytes = 4096

[[sources]]
queue = "{queue}"

[[routes]]
name = "all"
to = [ {{ stream = "{stream}" }} ]

[dead_letter]
stream = "{dead}"
"""
    try:
        with WorkerProcess(config, tmp_path) as worker:
            huge = b"h" * (2 * 1024 * 1024)
            await publish(
                [
                    aio_pika.Message(huge, message_id="huge"),
                    aio_pika.Message(b"ok", message_id="ok"),
                ],
                routing_key=queue,
            )
            await async_wait_for(lambda: _has_entries(dead, 1), what="the dead letter")
            await async_wait_for(lambda: _has_entries(stream, 1), what="the good message")
            assert 'reason="too-large"' in worker.metrics()
        (entry,) = await stream_entries(dead)
        assert entry[b"error"] == b"too-large"
        assert entry[b"body_size"] == str(len(huge)).encode()
        assert len(entry[b"body"]) == TOO_LARGE_BODY_KEPT
        assert [e[b"body"] for e in await stream_entries(stream)] == [b"ok"]
    finally:
        await delete_queues(queue)
        await delete_keys(stream, dead)


async def _has_entries(stream: str, count: int) -> bool:
    return len(await stream_entries(stream)) >= count


# --- a peer that hangs or is gone ----------------------------------------------------------------


@pytest.mark.broker
async def test_unreachable_redis_is_transient() -> None:
    sink = RedisStreamSink(settings(redis_url_via(free_port()), timeout=1.0))
    try:
        with pytest.raises(TransientError):
            await sink.publish_batch([Publish(msg(b"x", "1"), target("never", dedupe=True))])
        with pytest.raises(TransientError):
            await sink.ping()
    finally:
        await sink.aclose()


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("dedupe", [False, True], ids=["plain", "dedupe"])
async def test_a_blackholed_redis_is_a_timeout_then_writes_resume(
    stream: str, dedupe: bool
) -> None:
    host, port = REDIS_URL.split("//")[1].split("/")[0].split(":")
    with TcpProxy(host, int(port)) as proxy:
        sink = RedisStreamSink(settings(redis_url_via(proxy.port), timeout=0.5))
        try:
            dest = target(stream, dedupe=dedupe)
            assert await sink.publish_batch([Publish(msg(b"1", "1"), dest)]) == [None]
            proxy.blackhole()
            started = time.monotonic()
            with pytest.raises(TransientError):
                await sink.publish_batch([Publish(msg(b"2", "2"), dest)])
            with pytest.raises(TransientError):
                await sink.ping()
            assert time.monotonic() - started < 3.0
            proxy.heal()
            # The write held in the blackhole may land late; with dedupe it lands once.
            await sink.publish_batch([Publish(msg(b"2", "2"), dest)])
        finally:
            await sink.aclose()
    await asyncio.sleep(0.2)
    written = await bodies(stream)
    assert written[0] == b"1"
    assert b"2" in written
    if dedupe:
        assert written == [b"1", b"2"]


# --- the native path (Redis >= 8.6 IDMP), without such a server ---------------------------------


@pytest.mark.parametrize(
    ("version", "native"),
    [
        pytest.param("7.0.15", False, id="7.0"),
        pytest.param("8.4.0", False, id="8.4"),
        pytest.param("8.6.0", True, id="8.6"),
        pytest.param("8.6-rc1", True, id="8.6 rc"),
        pytest.param("9.0.1", True, id="9.0"),
        pytest.param("", False, id="unknown"),
    ],
)
def test_idmp_is_detected_from_the_server_version(version: str, native: bool) -> None:
    assert _has_idmp(version) is native


def test_native_path_commands_and_duplicate_detection() -> None:
    native = _NativeDedupe(window_ms=7_200_000)
    dest = target("s", dedupe=True, maxlen=100)
    entries = [(0, "a", {"body": b"1"}), (1, None, {"body": b"2"}), (2, "b", {"body": b"3"})]
    calls = native.calls({dest: entries})
    commands = [call.args for call in calls]
    config = ["IDMP-DURATION", 7200, "IDMP-MAXSIZE", 10_000]
    assert commands == [
        ["TIME"],
        ["XCFGSET", "s", *config],
        ["XADD", "s", "IDMP", "message-proxy", "a", "MAXLEN", "~", 100, "*", "body", b"1"],
        ["XADD", "s", "MAXLEN", "~", 100, "*", "body", b"2"],
        ["XADD", "s", "IDMP", "message-proxy", "b", "MAXLEN", "~", 100, "*", "body", b"3"],
        ["XCFGSET", "s", *config],
    ]
    # TIME says 1000.5 s; "a" comes back with an older id (a duplicate), the others are new.
    replies: list[Any] = [
        [b"1000", b"500000"],
        Exception("no such key"),
        b"999000-0",
        b"1000500-0",
        b"1000500-1",
        b"OK",
    ]
    outcomes = [o for call, r in zip(calls, replies, strict=True) for o in call.outcomes(r)]
    assert outcomes == [Accepted.DUPLICATE, Accepted.NO_MESSAGE_ID, None]
    # Configured on this connection: no more XCFGSET for that stream.
    assert [c.args[0] for c in native.calls({dest: entries[:1]})] == ["TIME", "XADD"]


def test_native_path_sees_a_duplicate_of_an_entry_from_the_same_batch() -> None:
    native = _NativeDedupe(window_ms=1000)
    dest = target("s", dedupe=True)
    calls = native.calls({dest: [(0, "a", {"b": b"1"}), (1, "a", {"b": b"1"})]})
    replies: list[Any] = [[b"5", b"0"], b"OK", b"5000-0", b"5000-0", b"OK"]
    outcomes = [o for call, r in zip(calls, replies, strict=True) for o in call.outcomes(r)]
    assert outcomes == [None, Accepted.DUPLICATE]


async def test_a_too_large_message_is_dead_lettered_without_copying_its_body() -> None:
    sink = MemorySink()
    data = {
        "max_message_bytes": 1000,
        "routes": [{"name": "all", "to": [{"stream": "s"}]}],
        "dead_letter": {"stream": "dead"},
    }
    pipeline = pipeline_for(data, sink)
    body = bytes(5000)
    channel = submit(pipeline, [Message(body, queue="q")])
    await flush(pipeline)
    (dead,) = sink.published
    assert dead.dead_letter is not None
    assert dead.dead_letter.reason == "too-large"
    assert dead.message.body is body  # handed on as is, never copied
    assert channel.acked == [1]
