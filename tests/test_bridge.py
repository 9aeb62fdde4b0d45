"""The stream bridge end to end: real RabbitMQ, real Redis, the worker as users run it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import orjson
import pytest

from tests.helpers import (
    WorkerProcess,
    async_wait_for,
    declare_topology,
    delete_keys,
    delete_queues,
    json_message,
    publish,
    queue_depth,
    stream_entries,
    stream_length,
    unique,
)

pytestmark = pytest.mark.broker


@pytest.fixture
def names() -> dict[str, str]:
    return {
        "queue": unique("q"),
        "exchange": unique("x"),
        "stream": unique("s"),
        "stream2": unique("s"),
        "dead": unique("dl"),
    }


@pytest.fixture(autouse=True)
async def cleanup(names: dict[str, str]):
    yield
    await delete_queues(names["queue"])
    await delete_keys(names["stream"], names["stream2"], names["dead"])


def bridge_config(names: dict[str, str], routes: str, extra: str = "") -> str:
    return f"""
{extra}
[batch]
max_messages = 100
max_delay_ms = 5

[[sources]]
queue = "{names["queue"]}"
bindings = [ {{ exchange = "{names["exchange"]}", routing_key = "#" }} ]

{routes}

[dead_letter]
stream = "{names["dead"]}"
"""


async def test_every_message_lands_with_the_exact_fields(
    tmp_path: Path, names: dict[str, str]
) -> None:
    config = bridge_config(
        names, f'[[routes]]\nname = "all"\nto = [ {{ stream = "{names["stream"]}" }} ]'
    )
    stamp = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    with WorkerProcess(config, tmp_path):
        bodies = [bytes([i % 256]) * (i + 1) for i in range(50)]  # binary, every byte value
        await publish(
            [
                (
                    aio_pika.Message(
                        body,
                        message_id=f"m-{i}",
                        correlation_id=f"c-{i}",
                        content_type="application/octet-stream",
                        content_encoding="identity",
                        type="blob",
                        app_id="test",
                        timestamp=stamp,
                        headers={"i": i, "tenant": "acme", "raw": bytearray(b"\xff\x01")},
                    ),
                    f"blob.{i}",
                )
                for i, body in enumerate(bodies)
            ],
            exchange=names["exchange"],
        )
        await publish([aio_pika.Message(b"")], exchange=names["exchange"], routing_key="bare")
        await async_wait_for(lambda: _length_at_least(names["stream"], 51), what="51 entries")
    entries = await stream_entries(names["stream"])
    assert len(entries) == 51
    for i, fields in enumerate(entries[:50]):
        assert fields[b"body"] == bodies[i]
        assert fields[b"routing_key"] == f"blob.{i}".encode()
        assert fields[b"exchange"] == names["exchange"].encode()
        assert fields[b"queue"] == names["queue"].encode()
        assert fields[b"message_id"] == f"m-{i}".encode()
        assert fields[b"correlation_id"] == f"c-{i}".encode()
        assert fields[b"content_type"] == b"application/octet-stream"
        assert fields[b"content_encoding"] == b"identity"
        assert fields[b"type"] == b"blob"
        assert fields[b"app_id"] == b"test"
        assert fields[b"timestamp"] == str(int(stamp.timestamp())).encode()
        assert orjson.loads(fields[b"headers"]) == {"i": i, "tenant": "acme", "raw": "base64:/wE="}
    bare = entries[50]
    assert set(bare) == {b"body", b"routing_key", b"exchange", b"queue", b"message_id"} or set(
        bare
    ) == {b"body", b"routing_key", b"exchange", b"queue"}
    assert bare[b"body"] == b""
    assert await queue_depth(names["queue"]) == 0


async def _length_at_least(stream: str, count: int) -> bool:
    return await stream_length(stream) >= count


async def test_fan_out_to_two_streams_through_continue(
    tmp_path: Path, names: dict[str, str]
) -> None:
    routes = f"""
[[routes]]
name = "copy"
continue = true
to = [ {{ stream = "{names["stream"]}", maxlen = 1000 }} ]

[[routes]]
name = "orders"
match.routing_key = "order.*"
to = [ {{ stream = "{names["stream2"]}" }} ]
"""
    with WorkerProcess(bridge_config(names, routes), tmp_path) as worker:
        await publish(
            [(json_message({"n": i}, message_id=str(i)), f"order.{i}") for i in range(200)]
            + [(json_message({"n": -1}, message_id="other"), "invoice.paid")],
            exchange=names["exchange"],
        )
        await async_wait_for(lambda: _length_at_least(names["stream"], 201), what="copies")
        await async_wait_for(lambda: _length_at_least(names["stream2"], 200), what="orders")
        copied = (
            f'message_proxy_messages_published_total{{destination="{names["stream"]}",'
            'route="copy"} 201.0'
        )
        # Counted once the batch's replies are read, a moment after the entries are visible.
        await async_wait_for(lambda: copied in worker.metrics(), within=5, what="the count")
    first = [f[b"message_id"] for f in await stream_entries(names["stream"])]
    second = [f[b"message_id"] for f in await stream_entries(names["stream2"])]
    assert first == [str(i).encode() for i in range(200)] + [b"other"]
    assert second == [str(i).encode() for i in range(200)]


async def test_bad_input_is_dead_lettered_and_the_worker_keeps_going(
    tmp_path: Path, names: dict[str, str]
) -> None:
    routes = f"""
[[routes]]
name = "typed"
match.routing_key = "typed.#"
match.json = {{ "type" = "order" }}
to = [ {{ stream = "{names["stream"]}" }} ]

[[routes]]
name = "tenant"
match.routing_key = "tenant.#"
to = [ {{ stream = "{names["stream"]}:{{headers.tenant}}" }} ]

[[routes]]
name = "vip"
match.routing_key = "vip.#"
match.plugin = "tests.route_plugins:is_vip"
to = [ {{ stream = "{names["stream"]}" }} ]
"""
    with WorkerProcess(bridge_config(names, routes), tmp_path) as worker:
        await publish(
            [
                (aio_pika.Message(b"\xff not json", message_id="bad-json"), "typed.x"),
                (aio_pika.Message(b"{}", message_id="no-tenant"), "tenant.x"),
                (aio_pika.Message(b"{}", message_id="lost"), "nobody.listens"),
                (aio_pika.Message(b"{}", message_id="crash", headers={"crash": "1"}), "vip.x"),
                (json_message({"type": "order"}, message_id="good"), "typed.x"),
            ],
            exchange=names["exchange"],
        )
        await async_wait_for(lambda: _length_at_least(names["dead"], 4), what="dead letters")
        await async_wait_for(lambda: _length_at_least(names["stream"], 1), what="good message")
        assert worker.process is not None and worker.process.poll() is None
        assert worker.get("/ready")[0] == 200
        metrics = worker.metrics()
        assert await queue_depth(names["queue"]) == 0
    dead = {f[b"message_id"]: f for f in await stream_entries(names["dead"])}
    assert {k: v[b"error"] for k, v in dead.items()} == {
        b"bad-json": b"not-json",
        b"no-tenant": b"template",
        b"lost": b"unrouted",
        b"crash": b"plugin-error",
    }
    assert dead[b"bad-json"][b"route"] == b"typed"
    assert dead[b"bad-json"][b"body"] == b"\xff not json"
    assert b"route" not in dead[b"lost"]
    assert b"ZeroDivisionError" in dead[b"crash"][b"detail"]
    assert all(int(v[b"failed_at"]) > 1_700_000_000_000 for v in dead.values())
    for reason in ("not-json", "template", "unrouted", "plugin-error"):
        assert f'message_proxy_messages_dead_lettered_total{{reason="{reason}"}} 1.0' in metrics
    # Logged once each, never a traceback for bad input.
    logs = worker.logs()
    assert logs.count("dead-lettering message bad-json") == 1
    assert "Traceback" not in logs


async def test_unrouted_drop_acks_and_counts(tmp_path: Path, names: dict[str, str]) -> None:
    stream = names["stream"]
    routes = f'[[routes]]\nname = "o"\nmatch.routing_key = "o"\nto = [{{ stream = "{stream}" }}]'
    config = bridge_config(names, routes, extra='unrouted = "drop"')
    with WorkerProcess(config, tmp_path) as worker:
        await publish([aio_pika.Message(b"x")] * 5, exchange=names["exchange"], routing_key="zzz")
        await async_wait_for(
            lambda: (
                "message_proxy_messages_unrouted_total" in worker.metrics()
                and f'queue="{names["queue"]}"}} 5.0' in worker.metrics()
            ),
            what="5 unrouted",
        )
        assert await queue_depth(names["queue"]) == 0
    assert await stream_length(names["dead"]) == 0


async def test_without_dead_letter_section_the_queue_dlx_applies(tmp_path: Path) -> None:
    queue, dlx, parked, stream = unique("q"), unique("dlx"), unique("parked"), unique("s")
    await declare_topology(parked, dlx, "#")
    await declare_topology(queue, arguments={"x-dead-letter-exchange": dlx})
    config = f"""
[[sources]]
queue = "{queue}"
arguments = {{ "x-dead-letter-exchange" = "{dlx}" }}

[[routes]]
name = "json"
match.json = {{ "ok" = true }}
to = [ {{ stream = "{stream}" }} ]
"""
    try:
        with WorkerProcess(config, tmp_path):
            await publish([aio_pika.Message(b"garbage", message_id="g")], routing_key=queue)
            await async_wait_for(lambda: _depth_is(parked, 1), what="message parked by the DLX")
        assert await queue_depth(queue) == 0
    finally:
        await delete_queues(queue, parked)
        await delete_keys(stream)


async def _depth_is(queue: str, count: int) -> bool:
    return await queue_depth(queue) == count


async def test_two_sources_in_one_worker(tmp_path: Path, names: dict[str, str]) -> None:
    other = unique("q2")
    config = f"""
[[sources]]
queue = "{names["queue"]}"

[[sources]]
queue = "{other}"

[[routes]]
name = "by-queue"
to = [ {{ stream = "{names["stream"]}:{{queue}}" }} ]
"""
    try:
        with WorkerProcess(config, tmp_path):
            await publish([aio_pika.Message(b"a")] * 3, routing_key=names["queue"])
            await publish([aio_pika.Message(b"b")] * 4, routing_key=other)
            await async_wait_for(
                lambda: _length_at_least(f"{names['stream']}:{other}", 4), what="second queue"
            )
            await async_wait_for(
                lambda: _length_at_least(f"{names['stream']}:{names['queue']}", 3), what="first"
            )
    finally:
        await delete_queues(other)
        await delete_keys(f"{names['stream']}:{other}", f"{names['stream']}:{names['queue']}")


async def test_run_from_role_entry_point(tmp_path: Path, names: dict[str, str]) -> None:
    config = bridge_config(
        names, f'[[routes]]\nname = "all"\nto = [ {{ stream = "{names["stream"]}" }} ]'
    )
    with WorkerProcess(config, tmp_path, module="workers.stream_bridge", args=()) as worker:
        await publish([aio_pika.Message(b"x")] * 10, exchange=names["exchange"], routing_key="k")
        await async_wait_for(lambda: _length_at_least(names["stream"], 10), what="10 entries")
        assert 'role="stream-bridge"' in worker.metrics()
        assert worker.stop() == 0
    await asyncio.sleep(0)
