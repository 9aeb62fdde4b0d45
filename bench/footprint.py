"""``uv run python -m bench.footprint``: the memory and CPU a worker needs, to size its container.

The Kubernetes manifests (deploy/kubernetes/) take their resource requests and limits from what
this prints. Each role runs as its image runs it (``PYTHONOPTIMIZE=2``, uvloop, the example
config's batch settings, ``prefetch = 1000``) against the local brokers, in three situations:

- **steady**: an empty queue, then ``--rate`` msg/s of ~200-byte bodies for ``--seconds``;
- **drain**: a backlog of ``--backlog`` ~200-byte messages, filled before the worker starts;
- **drain-large**: a backlog of ``--large-count`` bodies of ``--large-bytes`` (64 KiB): with
  ``prefetch = 1000`` that is ~64 MiB of bodies held unacked, the most ``max_inflight_bytes``
  allows by default, so its peak RSS is the worst case a memory limit must cover.

RSS is psutil's, sampled every 50 ms (peak and median over the measured window); CPU is the
process's user + system time over the measured window divided by its length, in cores. The
steady figures leave out the first 5 s (imports, connect, first batches).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import psutil  # type: ignore[import-untyped]
import redis.asyncio as aioredis

from bench import brokers, publisher
from bench.procs import REPO, http_status
from bench.workloads import free_port

WARM_UP_S = 5.0
SAMPLE_S = 0.05
ROLES = {"stream-bridge": "workers.stream_bridge", "exchange-relay": "workers.exchange_relay"}


@dataclass
class Samples:
    """RSS samples and CPU time of one process, with a window to measure in."""

    process: psutil.Process
    rss: list[tuple[float, int]] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    cpu: tuple[float, float] = (0.0, 0.0)

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def start_window(self) -> None:
        self.window = (time.monotonic(), 0.0)
        self.cpu = (self.cpu_seconds(), 0.0)

    def end_window(self) -> None:
        self.window = (self.window[0], time.monotonic())
        self.cpu = (self.cpu[0], self.cpu_seconds())

    def figures(self) -> dict[str, float]:
        start, end = self.window
        inside = [rss for at, rss in self.rss if start <= at <= end] or [0]
        return {
            "seconds": end - start,
            "peak_rss_mib": max(rss for _, rss in self.rss) / 2**20,
            "median_rss_mib": statistics.median(inside) / 2**20,
            "cores": (self.cpu[1] - self.cpu[0]) / max(end - start, 1e-9),
        }


def _sample(samples: Samples, halt: threading.Event) -> None:
    while not halt.is_set():
        try:
            samples.rss.append((time.monotonic(), samples.process.memory_info().rss))
        except psutil.Error:
            return
        halt.wait(SAMPLE_S)


def _config(role: str, queue: str, target: str, port: int, maxlen: int) -> str:
    if role == "stream-bridge":
        to = f'{{ stream = "{target}", maxlen = {maxlen} }}'
        redis = f'[redis]\nurl = "{brokers.REDIS_URL}"\n'
    else:
        to = f'{{ exchange = "{target}", routing_key = "{{routing_key}}" }}'
        redis = ""
    return f"""\
[amqp]
url = "{brokers.AMQP_URL}"
prefetch = 1000

{redis}
[health]
host = "127.0.0.1"
port = {port}

[batch]
max_messages = 500
max_delay_ms = 5

[[sources]]
queue = "{queue}"

[[routes]]
name = "footprint"
to = [ {to} ]
"""


class Worker:
    def __init__(self, role: str, queue: str, target: str, log_dir: Path, maxlen: int) -> None:
        self.port = free_port()
        config = log_dir / f"{role}-{queue}.toml"
        config.write_text(_config(role, queue, target, self.port, maxlen))
        self.log = log_dir / f"{role}-{queue}.log"
        env = {**os.environ, "PYTHONOPTIMIZE": "2", "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self.popen = psutil.Popen(
                [sys.executable, "-m", ROLES[role], "--config", str(config)],
                stdout=out,
                stderr=out,
                env=env,
                cwd=REPO,
            )
        self.samples = Samples(self.popen)
        self._halt = threading.Event()
        self._sampler = threading.Thread(target=_sample, args=(self.samples, self._halt))
        self._sampler.start()

    async def ready(self, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while http_status(self.port, "/ready", 0.5) != 200:
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready:\n{self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(30)
        self._halt.set()
        self._sampler.join(2)


class Topology:
    """A source queue and the role's destination (a stream, or an exchange with a sink queue)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.queue = brokers.unique("fp")
        self.target = brokers.unique("fp-out")
        self.sink = self.target + "-sink"

    async def declare(self) -> None:
        await brokers.declare_queue(self.queue)
        if self.role == "exchange-relay":
            await brokers.declare_queue(self.sink, exchange=self.target)

    async def delivered(self, client: aioredis.Redis) -> int:
        if self.role == "stream-bridge":
            return int(await client.xlen(self.target))
        return await brokers.queue_depth(self.sink)

    async def remove(self) -> None:
        await brokers.delete_queue(self.queue)
        if self.role == "exchange-relay":
            await brokers.delete_queue(self.sink)
            await brokers.delete_exchange(self.target)
        await brokers.delete_keys(self.target)


async def _publish_large(queue: str, count: int, size: int) -> None:
    connection = await aio_pika.connect(brokers.AMQP_URL)
    async with connection:
        channel = await connection.channel()
        body = os.urandom(size)
        for start in range(0, count, 100):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(body, message_id=str(i)), routing_key=queue
                    )
                    for i in range(start, min(count, start + 100))
                )
            )


async def _paced(queue: str, rate: float, seconds: float) -> int:
    connection = await aio_pika.connect(brokers.AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        body = publisher.template_body()
        sent, started = 0, time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate)
            while sent < due:
                await channel.default_exchange.publish(
                    aio_pika.Message(body, content_type="application/json"), routing_key=queue
                )
                sent += 1
            await asyncio.sleep(0.002)
        return sent


async def _until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not finish in time")
        await asyncio.sleep(0.05)


async def measure(
    role: str, situation: str, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    topology = Topology(role)
    await topology.declare()
    client = brokers.redis_client()
    worker: Worker | None = None
    try:
        if situation == "steady":
            worker = Worker(role, topology.queue, topology.target, log_dir, 100_000)
            await worker.ready()
            publishing = asyncio.create_task(_paced(topology.queue, args.rate, args.seconds))
            await asyncio.sleep(WARM_UP_S)
            worker.samples.start_window()
            sent = await publishing
            worker.samples.end_window()
            await _until(lambda: _reached(topology, client, sent), 60)
            total = sent
        else:
            large = situation == "drain-large"
            total = args.large_count if large else args.backlog
            if large:
                await _publish_large(topology.queue, total, args.large_bytes)
            else:
                await publisher.fill(topology.queue, total, lanes=1)
            maxlen = 1_000 if large else total
            worker = Worker(role, topology.queue, topology.target, log_dir, maxlen)
            await worker.ready()
            worker.samples.start_window()
            target = total if role == "exchange-relay" else min(total, maxlen)

            async def drained() -> bool:
                left = await brokers.queue_depth(topology.queue)
                return left == 0 and await topology.delivered(client) >= target

            await _until(drained, 600)
            worker.samples.end_window()
        figures = worker.samples.figures()
        figures["messages"] = total
        figures["msg_per_s"] = args.rate if situation == "steady" else total / figures["seconds"]
        return figures
    finally:
        if worker is not None:
            worker.stop()
        await client.aclose()
        await topology.remove()


async def _reached(topology: Topology, client: aioredis.Redis, sent: int) -> bool:
    return await topology.delivered(client) >= sent


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__)
    parser.add_argument("--rate", type=float, default=2000.0, help="steady msg/s")
    parser.add_argument("--seconds", type=float, default=30.0, help="steady flow length")
    parser.add_argument("--backlog", type=int, default=200_000, help="small-message backlog")
    parser.add_argument("--large-count", type=int, default=4_000)
    parser.add_argument("--large-bytes", type=int, default=64 * 1024)
    parser.add_argument("--roles", default=",".join(ROLES))
    parser.add_argument("--situations", default="steady,drain,drain-large")
    parser.add_argument("--runs", type=int, default=1, help="runs of each situation")
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="footprint-"))
    print(f"logs and configs in {log_dir}", flush=True)
    print("| role | situation | msg/s | peak RSS MiB | median RSS MiB | cores | seconds |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for role in args.roles.split(","):
        for situation in args.situations.split(","):
            for _ in range(args.runs):
                got = await measure(role, situation, args, log_dir)
                cells = (
                    f"{got['msg_per_s']:,.0f}",
                    f"{got['peak_rss_mib']:.1f}",
                    f"{got['median_rss_mib']:.1f}",
                    f"{got['cores']:.2f}",
                    f"{got['seconds']:.1f}",
                )
                print(f"| {role} | {situation} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
