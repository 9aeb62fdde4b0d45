"""The exchange relay against RabbitMQ's Shovel: the same backlog moved the same way.

``uv run python bench/shovel_compare.py [--messages 100000] [--runs 3]``

Each run pre-fills a durable queue with persistent ~200-byte JSON messages (a few headers), then
drains it into a topic exchange bound to a sink queue, with confirms downstream before the ack
upstream: a dynamic shovel (``ack-mode`` on-confirm, network URIs), or ``python -m
workers.exchange_relay``. Runs alternate. A run is timed from the first message taken off the
source queue to the last one counted in the sink queue, so neither the shovel's ``rabbitmqctl``
call nor the relay's start-up is counted; both are printed apart. Medians and the ratio at the end.

Enables the ``rabbitmq_shovel`` plugin (it stays enabled) and needs ``rabbitmqctl`` on the PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import aiormq
import orjson
import psutil  # type: ignore[import-untyped]
from pamqp import commands as spec

REPO = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
SHOVEL_URI = "amqp://guest:guest@127.0.0.1:5672"
POLL_S = 0.02


@dataclass
class Run:
    kind: str
    messages: int
    seconds: float  # first message taken to last message counted
    setup_seconds: float  # rabbitmqctl, or the relay's start-up, until the first message moved
    cpu_seconds: float | None = None  # the relay process, user + system

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


@dataclass
class Names:
    source: str
    exchange: str
    sink: str

    @classmethod
    def fresh(cls, kind: str) -> Names:
        tag = uuid.uuid4().hex[:8]
        return cls(f"bench-{kind}-src-{tag}", f"bench-{kind}-dst-{tag}", f"bench-{kind}-sink-{tag}")


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


# --- broker side -----------------------------------------------------------------------------


async def declare(names: Names) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(names.source, durable=True)
        exchange = await channel.declare_exchange(names.exchange, "topic", durable=True)
        sink = await channel.declare_queue(names.sink, durable=True)
        await sink.bind(exchange, "#")


async def delete(names: Names) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(names.source)
        await channel.queue_delete(names.sink)
        await channel.exchange_delete(names.exchange)


def body(index: int) -> bytes:
    document = {
        "id": index,
        "type": "order.created",
        "tenant": "acme",
        "amount": {"value": index % 1000 + 0.99, "currency": "EUR"},
        "created_at": "2026-11-28T12:00:00Z",
        "pad": "",
    }
    raw = orjson.dumps(document)
    document["pad"] = "x" * max(0, 200 - len(raw))
    return orjson.dumps(document)


async def prefill(queue: str, count: int, window: int = 5000) -> float:
    """``count`` persistent messages, confirmed; returns the seconds it took."""
    started = time.monotonic()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        raw = await channel.get_underlay_channel()
        stamp = datetime.now(UTC).replace(microsecond=0)
        for start in range(0, count, window):
            await asyncio.gather(
                *(
                    raw.basic_publish(
                        body(i),
                        routing_key=queue,
                        properties=spec.Basic.Properties(
                            delivery_mode=2,
                            content_type="application/json",
                            message_id=str(i),
                            timestamp=stamp,
                            app_id="bench",
                            headers={"tenant": "acme", "source": "bench", "attempt": 1},
                        ),
                    )
                    for i in range(start, min(count, start + window))
                )
            )
    return time.monotonic() - started


class Depths:
    """Ready-message counts by passive declare, on one connection."""

    def __init__(self) -> None:
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None

    async def __aenter__(self) -> Depths:
        self._connection = await aio_pika.connect(AMQP_URL)
        channel = await self._connection.channel()
        self._channel = await channel.get_underlay_channel()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def depth(self, queue: str) -> int:
        if self._channel is None:
            raise RuntimeError("not entered")
        declared = await self._channel.queue_declare(queue, passive=True)
        return int(declared.message_count or 0)


async def time_drain(names: Names, count: int, started_at: float, within: float) -> Run:
    """Wait for the first message to leave the source, then for all to reach the sink."""
    async with Depths() as depths:
        deadline = time.monotonic() + within
        while await depths.depth(names.source) >= count:
            if time.monotonic() > deadline:
                raise TimeoutError("nothing was taken off the source queue")
            await asyncio.sleep(POLL_S)
        first = time.monotonic()
        while await depths.depth(names.sink) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {await depths.depth(names.sink)} of {count} arrived")
            await asyncio.sleep(POLL_S)
        last = time.monotonic()
        source_left = await depths.depth(names.source)
    if source_left:
        raise RuntimeError(f"{source_left} messages still in the source queue")
    return Run("", count, last - first, first - started_at)


# --- the two contenders ----------------------------------------------------------------------


async def shovel_run(count: int) -> Run:
    names = Names.fresh("shovel")
    await declare(names)
    try:
        await prefill(names.source, count)
        definition = {
            "src-protocol": "amqp091",
            "src-uri": SHOVEL_URI,
            "src-queue": names.source,
            "dest-protocol": "amqp091",
            "dest-uri": SHOVEL_URI,
            "dest-exchange": names.exchange,
            "ack-mode": "on-confirm",
        }
        shovel = f"bench-{names.source}"
        started = time.monotonic()
        run("rabbitmqctl", "-q", "set_parameter", "shovel", shovel, json.dumps(definition))
        try:
            result = await time_drain(names, count, started, within=600)
        finally:
            run("rabbitmqctl", "-q", "clear_parameter", "shovel", shovel)
        result.kind = "shovel"
        return result
    finally:
        await delete(names)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def relay_config(names: Names, prefetch: int = 1000, batch: int = 500) -> str:
    return f"""
log_level = "WARNING"

[amqp]
url = "{AMQP_URL}"
prefetch = {prefetch}

[batch]
max_messages = {batch}

[[sources]]
queue = "{names.source}"

[[routes]]
name = "relay"
to = [ {{ exchange = "{names.exchange}", routing_key = "{{routing_key}}" }} ]
"""


async def relay_run(count: int, workdir: Path, prefetch: int, batch: int) -> Run:
    names = Names.fresh("relay")
    await declare(names)
    config = workdir / f"{names.source}.toml"
    config.write_text(relay_config(names, prefetch, batch))
    log = (workdir / f"{names.source}.log").open("wb")
    try:
        await prefill(names.source, count)
        env = {
            **os.environ,
            "MESSAGE_PROXY_HEALTH__PORT": str(free_port()),
            "MESSAGE_PROXY_HEALTH__HOST": "127.0.0.1",
        }
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "workers.exchange_relay", "--config", str(config)),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            result = await time_drain(names, count, started, within=600)
            cpu = psutil.Process(process.pid).cpu_times()
            result.cpu_seconds = cpu.user + cpu.system
        finally:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                code = await process.wait()
        if code != 0:
            raise RuntimeError(f"the relay exited with {code}; see {log.name}")
        result.kind = "relay"
        return result
    finally:
        log.close()
        await delete(names)


# --- main ------------------------------------------------------------------------------------


def report(runs: list[Run]) -> None:
    print()
    for kind in ("shovel", "relay"):
        mine = [r for r in runs if r.kind == kind]
        rates = [r.rate for r in mine]
        setup = statistics.median(r.setup_seconds for r in mine)
        line = (
            f"{kind:>6}: median {statistics.median(rates):8.0f} msg/s"
            f"  (runs: {', '.join(f'{r:.0f}' for r in rates)};"
            f" set-up before the first message {setup:.2f} s"
        )
        cpus = [r.cpu_seconds for r in mine if r.cpu_seconds is not None]
        if cpus:
            per_message = statistics.median(cpus) / mine[0].messages * 1e6
            line += f"; relay CPU {statistics.median(cpus):.1f} s = {per_message:.0f} µs/msg"
        print(line + ")")
    shovel = statistics.median(r.rate for r in runs if r.kind == "shovel")
    relay = statistics.median(r.rate for r in runs if r.kind == "relay")
    print(f"ratio relay / shovel: {relay / shovel:.2f}")


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--only", choices=("shovel", "relay"), default=None, help="one contender (profiling)"
    )
    parser.add_argument("--prefetch", type=int, default=1000, help="relay [amqp] prefetch")
    parser.add_argument("--batch", type=int, default=500, help="relay [batch] max_messages")
    args = parser.parse_args(argv)
    print(run("rabbitmq-plugins", "enable", "rabbitmq_shovel").strip().splitlines()[-1])
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the start")
    print(f"relay: prefetch {args.prefetch}, batches of {args.batch}; shovel: its defaults")
    runs: list[Run] = []
    kinds = [args.only] if args.only else ["shovel", "relay"]
    with tempfile.TemporaryDirectory(prefix="shovel-compare-") as tmp:
        for number in range(args.runs):
            for kind in kinds:
                if kind == "shovel":
                    result = await shovel_run(args.messages)
                else:
                    result = await relay_run(args.messages, Path(tmp), args.prefetch, args.batch)
                runs.append(result)
                cpu = f", relay CPU {result.cpu_seconds:.1f} s" if result.cpu_seconds else ""
                print(
                    f"run {number + 1} {kind:>6}: {result.messages} in {result.seconds:6.2f} s"
                    f" = {result.rate:7.0f} msg/s (set-up {result.setup_seconds:.2f} s{cpu})"
                    f"; load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    if not args.only:
        report(runs)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
