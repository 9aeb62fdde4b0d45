"""The stream bridge draining one backlog into the machine's single Redis, and into a local
3-master Redis Cluster (one replica each) with and without ``min_replicas = 1``, in alternating
rounds. Workload ``redis-cluster`` of ``uv run python -m bench``; alone:
``uv run python -m bench.redis_modes [--messages 50000] [--rounds 5] [--streams 16]``.

The backlog's messages carry 16 routing keys in turn (``shard.0`` ... ``shard.15``) and route to
``bench-…:{routing_key}``, so a batch writes to streams spread over the cluster's slots, and on
every master. The cluster is started by the tests' own scripts (``tests/servers``), its nodes
announced on their own ports (no fault proxies). Each round prints each mode's msg/s and the
ratios to the single Redis of the same round; the summary prints the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from bench import brokers
from bench.procs import Proc, wait_ready
from bench.publisher import RawPublisher, Template
from bench.workloads import free_port
from tests.servers.base import Workspace
from tests.servers.redis_servers import RedisCluster

Reader = Callable[[], aioredis.Redis | ClusterClient]


def config(queue: str, stream: str, port: int, redis: str) -> str:
    return f"""\
[amqp]
url = "{brokers.AMQP_URL}"
prefetch = 1000

[health]
host = "127.0.0.1"
port = {port}

{redis}

[[sources]]
queue = "{queue}"

[[routes]]
name = "bench"
to = [ {{ stream = "{stream}:{{routing_key}}", maxlen = 1000000 }} ]
"""


async def fill(exchange: str, total: int, shards: int) -> None:
    templates = [Template(f"shard.{k}", exchange=exchange) for k in range(shards)]
    publisher = await RawPublisher().connect()
    try:
        for start in range(0, total, 500):
            stop = min(total, start + 500)
            frames = [templates[i % shards].frames(i) for i in range(start, stop)]
            await publisher.publish(frames)
            await publisher.wait_confirmed(5_000)
        await publisher.wait_confirmed(0)
    finally:
        await publisher.close()


async def drain(
    mode: str, redis: str, reader: Reader, total: int, shards: int, log_dir: Path
) -> dict[str, Any]:
    queue, exchange, stream = brokers.unique("rq"), brokers.unique("rx"), brokers.unique("bench")
    streams = [f"{stream}:shard.{k}" for k in range(shards)]
    await brokers.declare_queue(queue, exchange=exchange)
    await fill(exchange, total, shards)
    port = free_port()
    config_file = log_dir / f"{queue}.toml"
    config_file.write_text(config(queue, stream, port, redis))
    proc = Proc("workers.stream_bridge", ["--config", str(config_file)], log_dir=log_dir,
                name=f"{mode}-{queue}")  # fmt: skip
    client = reader()

    async def complete() -> bool:
        return sum([int(await client.xlen(s)) for s in streams]) >= total

    try:
        proc.start()
        await asyncio.to_thread(wait_ready, proc, port)
        cpu_before = proc.cpu_seconds()
        timing = await brokers.observe_drain(queue, total, complete, alive=proc.alive)
        cpu = proc.cpu_seconds() - cpu_before
        written = sum([int(await client.xlen(s)) for s in streams])
    finally:
        proc.stop()
        for name in streams:
            await client.delete(name)
        await client.aclose()
        await brokers.delete_queue(queue)
        await brokers.delete_exchange(exchange)
    if written != total:
        raise RuntimeError(f"{mode}: {written} entries for {total} messages")
    return {"rate": total / timing.seconds, "cpu_us": cpu / total * 1e6}


def modes(cluster: RedisCluster) -> dict[str, tuple[str, Reader]]:
    urls = ", ".join(f'"{u}"' for u in cluster.urls())
    first = cluster.nodes[0].port
    section = f'[redis]\nmode = "cluster"\nurl = [{urls}]'

    def reader() -> ClusterClient:
        return ClusterClient(host="127.0.0.1", port=first)

    return {
        "single redis": (
            f'[redis]\nurl = "{brokers.REDIS_URL}"',
            lambda: aioredis.Redis.from_url(brokers.REDIS_URL),
        ),
        "cluster": (f"{section}\nmin_replicas = 0", reader),
        "cluster, min_replicas=1": (f"{section}\nmin_replicas = 1", reader),
    }


async def compare(
    total: int, rounds: int, streams: int, log_dir: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """Every mode once per round, the starting mode rotating; the raw figures of each round."""
    workspace = Workspace()
    try:
        started = time.perf_counter()
        cluster = RedisCluster(workspace, proxied=False).start()
        say(f"  cluster of 3 masters + 3 replicas up in {time.perf_counter() - started:.1f} s")
        table = modes(cluster)
        names = list(table)
        results: list[dict[str, dict[str, float]]] = []
        for round_ in range(rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            figures = {}
            for name in order:
                redis, reader = table[name]
                figures[name] = await drain(name, redis, reader, total, streams, log_dir)
            results.append({name: figures[name] for name in names})
            single = figures[names[0]]["rate"]
            say(
                f"  round {round_ + 1}/{rounds}: "
                + ", ".join(f"{n} {figures[n]['rate']:,.0f} msg/s" for n in names)
                + "; to single: "
                + ", ".join(f"{n} {figures[n]['rate'] / single:.2f}x" for n in names[1:])
            )
    finally:
        workspace.close()
    return {"messages": total, "streams": streams, "modes": names, "rounds": results}


def summary(results: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """Per mode: median msg/s, median worker CPU us/msg, median of the per-round ratios to the
    single Redis."""
    names, rounds = results["modes"], results["rounds"]
    rows = []
    for name in names:
        rates = [r[name]["rate"] for r in rounds]
        ratios = [r[name]["rate"] / r[names[0]]["rate"] for r in rounds]
        cpus = [r[name]["cpu_us"] for r in rounds]
        rows.append(
            (name, statistics.median(rates), statistics.median(cpus), statistics.median(ratios))
        )
    return rows


async def run(args: argparse.Namespace) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-redis-modes-"))
    results = await compare(args.messages, args.rounds, args.streams, log_dir, print)
    print(f"\nmedians over {args.rounds} rounds of {args.messages:,} messages into "
          f"{args.streams} streams (logs: {log_dir}):")  # fmt: skip
    for name, rate, cpu, ratio in summary(results):
        print(f"  {name:<24} {rate:>9,.0f} msg/s  {cpu:>5.0f} us worker CPU/msg  "
              f"{ratio:.2f}x single")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_modes", description=__doc__)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=16)
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
