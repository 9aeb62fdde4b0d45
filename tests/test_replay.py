"""``message-proxy replay`` against the real brokers: entries removed only once confirmed, the
unroutable and the truncated kept and reported, filters, a dry run, a replay killed mid-way and run
again, dead-letter queues (the worker's and RabbitMQ's own), Redis Cluster and Sentinel."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from proxy.encoding import DeadLetterInfo, dead_letter_fields
from proxy.message import HOPS_HEADER, Message
from proxy.replay import Progress, Summary
from proxy.sinks.redis_stream import _too_large_entry
from tests.helpers import (
    AMQP_URL,
    REDIS_URL,
    REPO,
    WorkerProcess,
    async_wait_for,
    delete_keys,
    delete_queues,
    publish,
    queue_depth,
    redis_client,
    run_cli,
    unique,
)

pytestmark = pytest.mark.broker

MINIMAL = """
[[sources]]
queue = "unused"
declare = false

[[routes]]
name = "all"
to = [ { stream = "unused" } ]
"""


def config_file(tmp_path: Path, redis: str = "", extra: str = "") -> Path:
    path = tmp_path / f"replay-{unique()}.toml"
    path.write_text(
        f'[amqp]\nurl = "{AMQP_URL}"\n\n[redis]\n{redis or f"url = {REDIS_URL!r}"}\n{extra}'
        + MINIMAL
    )
    return path


def letter(
    number: int,
    exchange: str,
    key: str,
    *,
    reason: str = "unrouted",
    route: str = "a",
    failed_at_ms: int | None = None,
) -> dict[str, Any]:
    message = Message(
        orjson.dumps({"n": number}),
        routing_key=key,
        exchange=exchange,
        queue="events",
        headers={"tenant": "acme", "raw": b"\xff\x01", HOPS_HEADER: 2},
        content_type="application/json",
        message_id=f"m-{number}",
    )
    at = failed_at_ms if failed_at_ms is not None else int(time.time() * 1000)
    return dict(dead_letter_fields(message, DeadLetterInfo(reason, "why", route, at)))


async def add_entries(client: Any, stream: str, entries: list[dict[str, Any]]) -> list[str]:
    ids = []
    for chunk in range(0, len(entries), 500):
        pipe = client.pipeline(transaction=False)
        for fields in entries[chunk : chunk + 500]:
            pipe.xadd(stream, fields)
        ids += [raw.decode() for raw in await pipe.execute()]
    return ids


async def drain(queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message in ``queue``, acked."""
    connection = await aio_pika.connect(AMQP_URL)
    got = []
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        while (message := await q.get(fail=False, no_ack=True)) is not None:
            got.append(message)
    return got


@pytest.fixture
async def topology() -> AsyncIterator[dict[str, str]]:
    """An exchange whose queue takes ``ok.#`` only, and a dead-letter stream."""
    names = {"exchange": unique("rx"), "queue": unique("rq"), "stream": unique("dl")}
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            names["exchange"], aio_pika.ExchangeType.TOPIC, auto_delete=False
        )
        queue = await channel.declare_queue(names["queue"], durable=True)
        await queue.bind(exchange, "ok.#")
    yield names
    await delete_queues(names["queue"])
    await delete_keys(names["stream"])
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(names["exchange"])


async def test_a_stream_replay_removes_what_was_confirmed_and_keeps_what_was_not(
    tmp_path: Path, topology: dict[str, str]
) -> None:
    exchange, stream = topology["exchange"], topology["stream"]
    now = int(time.time() * 1000)
    old = now - 2 * 86400 * 1000
    big = Message(b"x" * 5000, routing_key="ok.big", exchange=exchange, message_id="big")
    entries = [
        *(letter(n, exchange, f"ok.{n}") for n in range(5)),
        letter(5, exchange, "ok.5", reason="template", route="b", failed_at_ms=old),
        letter(6, exchange, "nobody.home"),  # unroutable: returned
        letter(7, unique("missing-exchange"), "ok.7"),  # refused: 404
        dict(_too_large_entry(big, DeadLetterInfo("too-large", "too big", None, now))),
    ]
    client = redis_client()
    try:
        ids = await add_entries(client, stream, entries)
        config = str(config_file(tmp_path))

        dry = run_cli(["replay", "--config", config, "--from", stream, "--dry-run"])
        assert dry.returncode == 1, dry.stderr  # the missing exchange is found by a dry run too
        assert f"kept {ids[7]}: exchange 'missing-exchange-" in dry.stderr
        would = [line for line in dry.stdout.splitlines() if " -> " in line]
        assert len(would) == 7
        assert would[0] == (
            f"would replay {ids[0]} (unrouted, route a) -> exchange {exchange!r} routing key "
            f"'ok.0' ({len(orjson.dumps({'n': 0}))} bytes)"
        )
        assert f"skip {ids[8]}: body truncated: 1024 of 5000 bytes kept" in dry.stdout
        assert "would replay 7 of 9 dead letters" in dry.stdout
        assert await client.xlen(stream) == 9 and await queue_depth(topology["queue"]) == 0

        one = run_cli(["replay", "--config", config, "--from", stream, "--reason", "template"])
        assert one.returncode == 0, one.stderr
        assert "replayed 1 of 9 dead letters" in one.stdout and "8 filtered out" in one.stdout
        assert await client.xlen(stream) == 8

        recent = run_cli(["replay", "--config", config, "--from", stream, "--since", "1h"])
        assert recent.returncode == 1  # some were not accepted
        assert f"kept {ids[6]}: unroutable: returned: 312 NO_ROUTE" in recent.stderr
        assert f"kept {ids[7]}: exchange 'missing-exchange-" in recent.stderr
        assert "404 NOT_FOUND" in recent.stderr
        assert "replayed 5 of 8" in recent.stdout
        assert "1 kept: body truncated" in recent.stdout and "2 kept: not accepted" in recent.stdout
        left = [raw.decode() for raw, _ in await client.xrange(stream)]
        assert left == [ids[6], ids[7], ids[8]]  # the unrouted, the refused, the truncated

        moved = run_cli(
            [
                "replay",
                "--config",
                config,
                "--from",
                stream,
                "--to-exchange",
                exchange,
                "--routing-key",
                "ok.{routing_key}",
                "--limit",
                "1",
            ]
        )
        assert moved.returncode == 0, moved.stderr
        assert [raw.decode() for raw, _ in await client.xrange(stream)] == [ids[7], ids[8]]

        got = await drain(topology["queue"])
        assert sorted(m.message_id for m in got) == [f"m-{n}" for n in range(7)]
        first = next(m for m in got if m.message_id == "m-0")
        assert first.body == orjson.dumps({"n": 0}) and first.routing_key == "ok.0"
        assert first.content_type == "application/json"
        assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        # the headers back with their types; the hop count restarts: a replay is one hop
        assert first.headers == {"tenant": "acme", "raw": b"\xff\x01", HOPS_HEADER: 1}
        assert next(m for m in got if m.message_id == "m-6").routing_key == "ok.nobody.home"
    finally:
        await client.aclose()


async def test_a_replay_killed_mid_way_and_run_again_loses_nothing_and_leaves_nothing(
    tmp_path: Path, topology: dict[str, str]
) -> None:
    exchange, stream, count = topology["exchange"], topology["stream"], 3000
    client = redis_client()
    try:
        await add_entries(client, stream, [letter(n, exchange, f"ok.{n}") for n in range(count)])
        config = str(config_file(tmp_path))
        first = start_cli(["replay", "--config", config, "--from", stream])
        try:
            await async_wait_for(
                lambda: _below(client, stream, count * 2 // 3),
                within=30,
                interval=0.005,
                what="a third replayed",
            )
            assert first.poll() is None, "finished before it could be killed"
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
        left = int(await client.xlen(stream))
        assert 0 < left < count, "killed mid-way"
        again = run_cli(["replay", "--config", config, "--from", stream])
        assert again.returncode == 0, again.stderr
        assert await client.xlen(stream) == 0  # none left behind
        got = [m.message_id for m in await drain(topology["queue"])]
        assert set(got) == {f"m-{n}" for n in range(count)}  # each at least once
        twice = len(got) - count
        assert 0 <= twice <= 100  # at most the page in flight when killed
        print(f"\nkilled with {left} of {count} left; run again: 0 lost, {twice} sent twice")
    finally:
        await client.aclose()


def start_cli(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _below(client: Any, stream: str, limit: int) -> bool:
    return int(await client.xlen(stream)) <= limit


# --- from a dead-letter queue -------------------------------------------------------------------


async def test_a_queue_dead_lettered_by_the_worker_goes_back_to_its_source(
    tmp_path: Path,
) -> None:
    source, app, dlx, dlq = unique("rs"), unique("rapp"), unique("rdlx"), unique("rdlq")
    config = f"""
[amqp]
url = "{AMQP_URL}"

[redis]
url = "{REDIS_URL}"

[[sources]]
queue = "{source}"
bindings = [ {{ exchange = "{app}", routing_key = "#" }} ]

[[routes]]
name = "ok"
match.routing_key = "ok.#"
to = [ {{ stream = "{unique("unused")}" }} ]

[dead_letter]
exchange = "{dlx}"
declare = true
"""
    try:
        with WorkerProcess(config, tmp_path) as worker:
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(dlq, durable=True)
                await queue.bind(dlx, "#")
            await publish(
                [
                    (aio_pika.Message(f"{n}".encode(), message_id=f"b-{n}"), f"bad.{n}")
                    for n in range(5)
                ],
                exchange=app,
            )

            async def dead_lettered() -> bool:
                return await queue_depth(dlq) == 5

            await async_wait_for(dead_lettered, what="5 dead letters on the queue")
            assert worker.stop() == 0
        path = str(worker.config_path)
        dry = run_cli(["replay", "--config", path, "--from-queue", dlq, "--dry-run"])
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.count(f"-> exchange {app!r} routing key 'bad.") == 5
        assert await queue_depth(dlq) == 5  # a dry run gives every message back
        done = run_cli(["replay", "--config", path, "--from-queue", dlq, "--reason", "unrouted"])
        assert done.returncode == 0, done.stderr
        assert "replayed 5 of 5 dead letters from queue" in done.stdout
        assert await queue_depth(dlq) == 0
        back = await drain(source)
        assert sorted(m.message_id for m in back) == [f"b-{n}" for n in range(5)]
        assert {m.routing_key for m in back} == {f"bad.{n}" for n in range(5)}
        for message in back:  # the relay's facts are off; it counts as one hop
            assert message.headers == {HOPS_HEADER: 1}
    finally:
        await delete_queues(source, dlq)


async def test_a_queue_dead_lettered_by_rabbitmq_goes_back_by_its_x_death(
    tmp_path: Path,
) -> None:
    source, app, dlx, dlq, check = (unique(p) for p in ("rs", "rapp", "rdlx", "rdlq", "rc"))
    connection = await aio_pika.connect(AMQP_URL)
    try:
        async with connection:
            channel = await connection.channel()
            origin = await channel.declare_exchange(app, aio_pika.ExchangeType.TOPIC)
            dead = await channel.declare_exchange(dlx, aio_pika.ExchangeType.FANOUT)
            q = await channel.declare_queue(
                source, durable=True, arguments={"x-dead-letter-exchange": dlx}
            )
            await q.bind(origin, "k.#")
            await (await channel.declare_queue(dlq, durable=True)).bind(dead)
            await origin.publish(aio_pika.Message(b"first", message_id="x-1"), routing_key="k.1")
            got = await async_wait_for(lambda: q.get(fail=False), what="the message")
            await got.reject(requeue=False)  # RabbitMQ dead-letters it, with x-death
            await async_wait_for(lambda: _depth_is(dlq, 1), what="dead-lettered")
            await (await channel.declare_queue(check, durable=True)).bind(origin, "k.#")
        done = run_cli(
            [
                "replay",
                "--config",
                str(config_file(tmp_path)),
                "--from-queue",
                dlq,
                "--reason",
                "rejected",
            ]
        )
        assert done.returncode == 0, done.stderr
        (back,) = await drain(check)
        assert (back.message_id, back.routing_key, back.body) == ("x-1", "k.1", b"first")
        assert back.headers["x-death"][0]["reason"] == "rejected"  # its history is kept
    finally:
        await delete_queues(source, dlq, check)


async def _depth_is(queue: str, depth: int) -> bool:
    return await queue_depth(queue) == depth


# --- Redis Cluster and Sentinel -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cluster", "sentinel"])
async def test_a_replay_reads_and_deletes_through_cluster_and_sentinel(
    tmp_path: Path, topology: dict[str, str], mode: str, request: pytest.FixtureRequest
) -> None:
    exchange, stream = topology["exchange"], topology["stream"]
    client: Any
    if mode == "cluster":
        cluster = request.getfixturevalue("healthy_redis_cluster")
        host, port = cluster.urls()[0].removeprefix("redis://").split(":")
        client = ClusterClient(host=host, port=int(port))
        urls = ", ".join(f'"{url}"' for url in cluster.urls())
        redis = f'mode = "cluster"\nurl = [{urls}]'
    else:
        group = request.getfixturevalue("healthy_redis_sentinel")
        master = group.current_master()
        client = aioredis.Redis(host="127.0.0.1", port=master.port)
        sentinels = ", ".join(f'"{url}"' for url in group.sentinel_urls())
        redis = f'mode = "sentinel"\nsentinels = [{sentinels}]\nservice_name = "{group.SERVICE}"'
    try:
        await add_entries(client, stream, [letter(n, exchange, f"ok.{n}") for n in range(250)])
        done = run_cli(["replay", "--config", str(config_file(tmp_path, redis)), "--from", stream])
        assert done.returncode == 0, done.stderr
        assert "replayed 250 of 250" in done.stdout
        assert await client.xlen(stream) == 0
        assert len(await drain(topology["queue"])) == 250
    finally:
        await client.delete(stream)
        await client.aclose()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "pipe"])
def test_the_progress_bar_is_drawn_on_a_terminal_only(tty: bool) -> None:
    out = Terminal() if tty else io.StringIO()
    summary = Summary("stream 'dl'", dry_run=False, scanned=50, replayed=40, kept=2, total=100)
    progress = Progress(out, summary)
    progress.show(last=False)
    progress.note("kept 1-0: unroutable")
    progress.show(last=True)
    if not tty:
        assert out.getvalue() == "kept 1-0: unroutable\n"  # the reports, without the bar
        return
    assert out.getvalue() == (
        "\rreplay [###############               ] 50/100 read, 40 replayed, 2 kept"
        "\r\x1b[Kkept 1-0: unroutable\n"
        "\rreplay [###############               ] 50/100 read, 40 replayed, 2 kept\n"
    )
