"""Reload without restart, against the real RabbitMQ: routes swapped between two batches under a
steady flow, sources added and removed, invalid files refused with the running config kept."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import tomllib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import aio_pika
import orjson
import pytest

from proxy.config import Config, parse_config
from proxy.metrics import Metrics
from proxy.routing import StreamTarget
from proxy.sinks.memory import MemorySink
from proxy.state import HealthState
from proxy.worker import Worker
from tests.helpers import (
    AMQP_URL,
    REDIS_URL,
    WorkerProcess,
    async_wait_for,
    delete_keys,
    delete_queues,
    publish,
    queue_depth,
    run_cli,
    stream_entries,
    unique,
    wait_for,
)

pytestmark = pytest.mark.broker


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def source_config(queue: str, stream: str) -> Config:
    text = f"""
[batch]
max_messages = 100
max_delay_ms = 5

[[sources]]
queue = "{queue}"

[[routes]]
name = "all"
to = [ {{ stream = "{stream}" }} ]
"""
    return parse_config(tomllib.loads(text), environ={})


async def consumer_count(queue: str) -> int:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count or 0)


@pytest.fixture
async def queues() -> AsyncIterator[tuple[str, str]]:
    names = (unique("reload-a"), unique("reload-b"))
    yield names
    await delete_queues(*names)


async def test_a_removed_source_is_settled_by_the_old_rules_and_an_added_one_consumed_by_the_new(
    queues: tuple[str, str], metrics: Metrics
) -> None:
    old_queue, new_queue = queues
    running = source_config(old_queue, "old")
    replacement = source_config(new_queue, "new")
    sink = MemorySink("memory")
    worker = Worker(
        running,
        role="all",
        metrics=metrics,
        health=HealthState(),
        sinks={StreamTarget: sink},
        load=lambda: replacement,
    )
    task = asyncio.create_task(worker.run())
    try:
        await async_wait_for(lambda: worker.health.snapshot().consumers == 1, what="consuming")
        sink.failures_left = 1_000  # the first batch is held
        await publish(
            [aio_pika.Message(b"held", message_id=str(i)) for i in range(20)], routing_key=old_queue
        )
        await async_wait_for(
            lambda: sample(
                metrics, "message_proxy_publish_errors_total", destination="old", error="transient"
            ),
            what="the batch held",
        )
        reload = asyncio.create_task(worker.reload())

        async def not_consumed() -> bool:
            return await consumer_count(old_queue) == 0

        await async_wait_for(not_consumed, what="the removed source's consumer cancelled")
        await asyncio.sleep(0.3)
        assert not reload.done(), "applied while the removed source's deliveries were held"
        assert sample(metrics, "message_proxy_config_reloads_total", result="applied") == 0
        sink.failures_left = 0
        assert await asyncio.wait_for(reload, 10) == "applied"
        held = [item for item in sink.published if item.message.queue == old_queue]
        assert [item.target.name for item in held] == ["old"] * 20  # by the rules they came in
        assert sample(metrics, "message_proxy_messages_acked_total", queue=old_queue) == 20

        await async_wait_for(lambda: worker.health.snapshot().consumers == 1, what="new consumer")
        assert worker.health.snapshot().expected_consumers == 1
        await publish([aio_pika.Message(b"after") for _ in range(5)], routing_key=old_queue)
        await publish([aio_pika.Message(b"new") for _ in range(7)], routing_key=new_queue)
        await async_wait_for(
            lambda: sum(item.target.name == "new" for item in sink.published) == 7,
            what="the new source's messages",
        )
        assert await queue_depth(old_queue) == 5  # no longer consumed: they wait in the queue
        assert sample(metrics, "message_proxy_config_reloads_total", result="applied") == 1
    finally:
        worker.stop_requested.set()
        await asyncio.wait_for(task, 15)
    assert await queue_depth(old_queue) == 5  # the 20 held were acked, not given back


# --- a worker process, as operators run it ----------------------------------------------------


def worker_config(queue: str, exchange: str, stream: str, pid_file: Path, extra: str = "") -> str:
    return f"""
pid_file = "{pid_file}"
{extra}
[redis]
url = "{REDIS_URL}"

[amqp]
url = "{AMQP_URL}"
prefetch = 2000

[batch]
max_messages = 200
max_delay_ms = 5

[[sources]]
queue = "{queue}"
bindings = [ {{ exchange = "{exchange}", routing_key = "#" }} ]

[[routes]]
name = "all"
to = [ {{ stream = "{stream}" }} ]
"""


def log_lines(worker: WorkerProcess, pattern: str) -> list[dict[str, str]]:
    lines = [orjson.loads(line) for line in worker.logs().splitlines() if line.startswith("{")]
    return [line for line in lines if re.search(pattern, line["message"])]


def reloads(worker: WorkerProcess, result: str) -> float:
    found = re.search(
        rf'message_proxy_config_reloads_total\{{result="{result}"\}} (\S+)', worker.metrics()
    )
    return float(found[1]) if found else 0.0


RATE = 2_000  # messages per second
SECONDS = 3.0


async def paced_publish(exchange: str, sent: list[tuple[int, float]]) -> None:
    """``RATE`` messages per second for ``SECONDS``, each body its number and publish time."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        started = time.monotonic()
        step = 0.05
        total = int(RATE * SECONDS)
        while len(sent) < total:
            due = int((time.monotonic() - started + step) * RATE)
            pending = []
            while len(sent) < min(due, total):
                number, at = len(sent), time.time()
                sent.append((number, at))
                body = orjson.dumps({"n": number, "at": at})
                pending.append(target.publish(aio_pika.Message(body), routing_key="k"))
            await asyncio.gather(*pending)
            await asyncio.sleep(step)


async def test_routes_swapped_under_a_steady_flow_lose_nothing_and_apply_at_once(
    tmp_path: Path,
) -> None:
    queue, exchange = unique("reload-flow"), unique("reload-x")
    old_stream, new_stream = unique("reload-old"), unique("reload-new")
    pid_file = tmp_path / "worker.pid"
    text = worker_config(queue, exchange, old_stream, pid_file)
    sent: list[tuple[int, float]] = []
    try:
        with WorkerProcess(text, tmp_path) as worker:
            flow = asyncio.create_task(paced_publish(exchange, sent))
            await asyncio.sleep(SECONDS / 2)
            worker.config_path.write_text(text.replace(old_stream, new_stream))
            done = await asyncio.to_thread(
                run_cli,
                ["reload", "--config", str(worker.config_path)],
                env={
                    "MESSAGE_PROXY_HEALTH__PORT": str(worker.health_port),
                    "MESSAGE_PROXY_HEALTH__HOST": "127.0.0.1",
                },
            )
            assert done.returncode == 0, done.stderr
            assert "reload applied" in done.stdout
            await flow
            total = len(sent)

            async def all_written() -> bool:
                count = len(await stream_entries(old_stream))
                return count + len(await stream_entries(new_stream)) >= total

            await async_wait_for(all_written, within=20, what="every message")
            assert worker.stop() == 0
        applied = log_lines(worker, r"^config reload applied: routes$")
        assert len(applied) == 1, worker.logs()
        swapped_at = datetime.fromisoformat(applied[0]["ts"]).timestamp()
        old = [orjson.loads(e[b"body"])["n"] for e in await stream_entries(old_stream)]
        new = [orjson.loads(e[b"body"])["n"] for e in await stream_entries(new_stream)]
        assert sorted(old + new) == list(range(total)), "lost or written twice"
        assert old and new
        assert max(old) < min(new), "one queue, in order: the old rules up to a batch, then new"
        after = [number for number, at in sent if at > swapped_at]
        assert after and set(after) <= set(new), "published after the swap, routed by old rules"
        print(
            f"\n{total} messages at {RATE}/s; swap after #{min(new)}; "
            f"{len(after)} published after the logged swap; 0 lost, 0 duplicated"
        )
    finally:
        await delete_queues(queue)
        await delete_keys(old_stream, new_stream)


async def test_an_invalid_file_or_a_restart_key_is_rejected_and_the_running_config_kept(
    tmp_path: Path,
) -> None:
    queue, exchange, stream = unique("reload-bad"), unique("reload-x"), unique("reload-s")
    pid_file = tmp_path / "worker.pid"
    text = worker_config(queue, exchange, stream, pid_file)
    try:
        with WorkerProcess(text, tmp_path) as worker:
            assert int(pid_file.read_text()) == worker.process.pid  # type: ignore[union-attr]
            broken = text.replace('name = "all"', 'name = ""').replace(
                "max_messages = 200", "max_messages = 0"
            )
            worker.config_path.write_text(broken)
            worker.signal(signal.SIGHUP)  # what kill -HUP does: the worker judges the file
            wait_for(lambda: reloads(worker, "rejected") == 1, what="rejected")
            (line,) = log_lines(worker, "config reload rejected")
            assert line["level"] == "ERROR"
            assert "batch.max_messages" in line["message"]
            assert "routes[0].name" in line["message"]

            # The CLI checks the file first and sends nothing for one the worker would refuse.
            refused = run_cli(["reload", "--config", str(worker.config_path)])
            assert refused.returncode == 2
            assert "batch.max_messages" in refused.stderr
            assert reloads(worker, "rejected") == 1

            worker.config_path.write_text(
                text.replace("prefetch = 2000", "prefetch = 10").replace(stream, "elsewhere")
            )
            env = {
                "MESSAGE_PROXY_HEALTH__PORT": str(worker.health_port),
                "MESSAGE_PROXY_HEALTH__HOST": "127.0.0.1",
            }
            restart = run_cli(["reload", "--config", str(worker.config_path)], env=env)
            assert restart.returncode == 1
            assert "rejected" in restart.stderr
            (line,) = log_lines(worker, "config reload rejected.*amqp.prefetch")
            assert "restart the worker" in line["message"]

            await publish([aio_pika.Message(b"still")], exchange=exchange, routing_key="k")

            async def landed() -> bool:
                return len(await stream_entries(stream)) == 1

            await async_wait_for(landed, what="routed by the running config")
            assert reloads(worker, "applied") == 0
            worker.config_path.write_text(text)
            same = run_cli(
                ["reload", "--pid-file", str(pid_file), "--config", str(worker.config_path)],
                env=env,
            )
            assert same.returncode == 0, same.stderr
            assert "reload unchanged" in same.stdout
            assert worker.stop() == 0
        assert not pid_file.exists()
    finally:
        await delete_queues(queue)
        await delete_keys(stream)


async def test_a_new_declared_exchange_is_declared_by_the_reload_or_the_reload_refused(
    tmp_path: Path,
) -> None:
    queue, stream = unique("reload-decl"), unique("reload-s")
    first, added, clash = unique("reload-x0"), unique("reload-x1"), unique("reload-x2")
    audit = '\n[[routes]]\nname = "audit"\nmatch.routing_key = "audit.#"\n'
    text = worker_config(queue, unique("reload-app"), stream, tmp_path / "w.pid").replace(
        '[[routes]]\nname = "all"',
        audit + f'to = [ {{ exchange = "{first}", declare = true }} ]\n\n[[routes]]\nname = "all"',
    )
    connection = await aio_pika.connect(AMQP_URL)
    try:
        async with connection:
            channel = await connection.channel()
            await channel.declare_exchange(clash, aio_pika.ExchangeType.FANOUT)
        with WorkerProcess(text, tmp_path) as worker:
            worker.config_path.write_text(text.replace(first, added))
            worker.signal(signal.SIGHUP)
            wait_for(lambda: reloads(worker, "applied") == 1, what="applied")
            async with await aio_pika.connect(AMQP_URL) as check:
                await (await check.channel()).get_exchange(added)  # passive: it exists now

            worker.config_path.write_text(text.replace(first, clash))
            worker.signal(signal.SIGHUP)
            wait_for(lambda: reloads(worker, "rejected") == 1, what="rejected")
            (line,) = log_lines(worker, "config reload rejected")
            assert f"exchange {clash!r}: 406 PRECONDITION_FAILED" in line["message"]
            assert worker.get("/ready")[0] == 200  # the refusal cost the publisher nothing
            assert worker.stop() == 0
    finally:
        await delete_queues(queue)
        async with await aio_pika.connect(AMQP_URL) as cleanup:
            channel = await cleanup.channel()
            for name in (first, added, clash):
                await channel.exchange_delete(name)
