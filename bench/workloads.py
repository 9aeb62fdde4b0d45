"""The six workloads. Each returns plain dicts (one per run) that ``report`` summarises."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from bench import brokers, publisher
from bench.procs import Proc, broker_cpu_seconds, wait_ready
from bench.publisher import RawPublisher

STREAM_MAXLEN = 10_000_000  # what a user sets so the stream cannot grow without bound


def free_port() -> int:
    """A port the kernel just handed out, so two bench processes never pick the same one."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- peers -------------------------------------------------------------------------------------


class Handle(Protocol):
    def alive(self) -> bool: ...
    def cpu_seconds(self) -> float: ...
    @property
    def peak_rss(self) -> int: ...
    def stop(self) -> int: ...


@dataclass
class Peer:
    name: str
    kind: str  # "stream", "exchange" or "counter" (acked so far): what its output is
    start: Callable[[str, str, Path], Handle]  # (queue, stream or exchange, log dir)


def proxy_config(queue: str, destinations: list[str], port: int) -> str:
    to = ", ".join(destinations)
    return f"""\
[amqp]
url = "{brokers.AMQP_URL}"
prefetch = 1000

[health]
host = "127.0.0.1"
port = {port}

[[sources]]
queue = "{queue}"

[[routes]]
name = "bench"
to = [ {to} ]
"""


def stream_to(stream: str) -> str:
    return f'{{ stream = "{stream}", maxlen = {STREAM_MAXLEN} }}'


def exchange_to(exchange: str) -> str:
    return f'{{ exchange = "{exchange}", routing_key = "{{routing_key}}" }}'


def start_proxy(
    module: str,
    args: list[str],
    queue: str,
    destinations: list[str],
    log_dir: Path,
    name: str,
    env: dict[str, str] | None = None,
) -> tuple[Proc, int]:
    port = free_port()
    config = log_dir / f"{name}.toml"
    config.write_text(proxy_config(queue, destinations, port))
    proc = Proc(module, [*args, "--config", str(config)], log_dir=log_dir, name=name, env=env)
    return proc.start(), port


def _proxy_stream(queue: str, stream: str, log_dir: Path) -> Handle:
    name = f"message-proxy-{stream}"
    return start_proxy("workers.stream_bridge", [], queue, [stream_to(stream)], log_dir, name)[0]


def _proxy_exchange(queue: str, exchange: str, log_dir: Path) -> Handle:
    name = f"message-proxy-{exchange}"
    destinations = [exchange_to(exchange)]
    return start_proxy("workers.exchange_relay", [], queue, destinations, log_dir, name)[0]


def _peer_process(module: str) -> Callable[[str, str, Path], Handle]:
    def start(queue: str, stream: str, log_dir: Path) -> Handle:
        args = ["--queue", queue, "--stream", stream, "--prefetch", "1000"]
        proc = Proc(module, args, log_dir=log_dir, name=f"{module.rsplit('.', 1)[-1]}-{queue}")
        return proc.start()

    return start


class Shovel:
    """A dynamic shovel (inside RabbitMQ): its CPU shows up as the broker's."""

    enabled = False

    def __init__(self, queue: str, exchange: str) -> None:
        self.name = f"{queue}-shovel"
        if not Shovel.enabled:
            _run(["rabbitmq-plugins", "enable", "rabbitmq_shovel"])
            Shovel.enabled = True
        definition = {
            "src-protocol": "amqp091",
            "src-uri": brokers.AMQP_URL,
            "src-queue": queue,
            "src-prefetch-count": 1000,
            "dest-protocol": "amqp091",
            "dest-uri": brokers.AMQP_URL,
            "dest-exchange": exchange,
            "ack-mode": "on-confirm",
            "src-delete-after": "never",
        }
        _run(["rabbitmqctl", "-q", "set_parameter", "shovel", self.name, json.dumps(definition)])

    def alive(self) -> bool:
        return True

    def cpu_seconds(self) -> float:
        return 0.0

    @property
    def peak_rss(self) -> int:
        return 0

    def stop(self) -> int:
        _run(["rabbitmqctl", "-q", "clear_parameter", "shovel", self.name])
        return 0


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr or done.stdout}")


STREAM_PEERS = [  # message-proxy first: it is compared with each of the others
    Peer("message-proxy", "stream", _proxy_stream),
    Peer("aiormq ack-only ceiling", "counter", _peer_process("bench.peers.ack_only_aiormq")),
    Peer("aio-pika ack-only ceiling", "counter", _peer_process("bench.peers.ack_only")),
    Peer("naive bridge", "stream", _peer_process("bench.peers.naive_bridge")),
    Peer("FastStream bridge", "stream", _peer_process("bench.peers.faststream_bridge")),
]
EXCHANGE_PEERS = [
    Peer("message-proxy relay", "exchange", _proxy_exchange),
    Peer("RabbitMQ Shovel", "exchange", lambda queue, exchange, _log: Shovel(queue, exchange)),
]


# --- drains (workloads 1, 2, 5) -----------------------------------------------------------------


@dataclass
class Cpu:
    peer: float = 0.0
    rabbitmq: float = 0.0
    redis: float = 0.0
    rabbitmq_gc: float = 0.0  # of ``rabbitmq``: its dirty CPU schedulers (large-heap GC)

    @staticmethod
    def now(handle: Handle) -> Cpu:
        brokers_cpu = broker_cpu_seconds()
        return Cpu(
            handle.cpu_seconds(),
            brokers_cpu["rabbitmq"],
            brokers_cpu["redis"],
            brokers_cpu["rabbitmq_dirty_cpu"],
        )


@dataclass
class Outputs:
    """Where a drain's output lands and how to tell it is complete."""

    streams: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)  # bound to the destination exchange
    counters: list[str] = field(default_factory=list)  # Redis keys the ack-only peer counts in

    async def counts(self, client: aioredis.Redis | None = None) -> list[int]:
        """How many entries (or acks) each output holds so far."""
        own = client is None
        client = client or brokers.redis_client()
        try:
            counts = [int(await client.xlen(s)) for s in self.streams]
            counts += [int(await client.get(c) or 0) for c in self.counters]
        finally:
            if own:
                await client.aclose()
        return counts + [await brokers.queue_depth(q) for q in self.queues]


async def drain(
    start: Callable[[], Handle],
    queue: str,
    total: int,
    outputs: Outputs,
    *,
    fill: bool = True,
) -> dict[str, Any]:
    """Pre-fill, start the peer, time the drain from the broker's side, stop, verify."""
    if fill:
        await brokers.declare_queue(queue)
        filled_at = time.perf_counter()
        await publisher.fill(queue, total, lanes=1)
        fill_rate = total / (time.perf_counter() - filled_at)
    else:
        fill_rate = 0.0
    depth = await brokers.queue_depth(queue)
    if depth != total:
        raise RuntimeError(f"pre-fill left {depth} messages in {queue}, expected {total}")
    client = brokers.redis_client()

    async def complete() -> bool:
        return all(count >= total for count in await outputs.counts(client))

    handle = start()
    marks: dict[str, Cpu] = {}
    try:
        timing = await brokers.observe_drain(
            queue,
            total,
            complete,
            alive=handle.alive,
            on_first=lambda: marks.__setitem__("first", Cpu.now(handle)),
        )
        end = Cpu.now(handle)
    finally:
        await client.aclose()
        code = handle.stop()
    first = marks["first"]
    left = await brokers.queue_depth(queue)
    counts = await outputs.counts()
    problems = []
    if left:
        problems.append(f"{left} messages left unacked in the source queue")
    if any(count != total for count in counts):
        problems.append(f"output counts {counts}, expected {total} each")
    if code not in (0, -15):
        problems.append(f"exit code {code}")
    return {
        "messages": total,
        "seconds": timing.seconds,
        "rate": total / timing.seconds,
        "delivered_after_s": timing.delivered_by - timing.first_delivery,
        "cpu_us_per_msg": {
            "peer": (end.peer - first.peer) / total * 1e6,
            "rabbitmq": (end.rabbitmq - first.rabbitmq) / total * 1e6,
            "redis": (end.redis - first.redis) / total * 1e6,
            "rabbitmq_gc": (end.rabbitmq_gc - first.rabbitmq_gc) / total * 1e6,
        },
        # Cores RabbitMQ kept busy: next to the machine's two, whether the broker is the limit.
        "rabbitmq_cores": (end.rabbitmq - first.rabbitmq) / timing.seconds,
        "peak_rss_mb": handle.peak_rss / 2**20,
        "fill_rate": fill_rate,
        "problems": problems,
    }


async def drain_peer(peer: Peer, total: int, log_dir: Path) -> dict[str, Any]:
    queue = brokers.unique("q")
    target = brokers.unique("s" if peer.kind != "exchange" else "x")
    outputs = Outputs()
    if peer.kind == "stream":
        outputs.streams.append(target)
    elif peer.kind == "counter":
        outputs.counters.append(target)
    elif peer.kind == "exchange":
        destination = brokers.unique("dest")
        await brokers.declare_queue(destination, exchange=target)
        outputs.queues.append(destination)
    try:
        return await drain(lambda: peer.start(queue, target, log_dir), queue, total, outputs)
    finally:
        await brokers.delete_queue(queue, *outputs.queues)
        if peer.kind == "exchange":
            await brokers.delete_exchange(target)
        await brokers.delete_keys(*outputs.streams, *outputs.counters)


async def compare(
    peers: list[Peer], total: int, runs: int, log_dir: Path, say: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """The first peer (message-proxy) against each other one, in ``runs`` alternating rounds.

    In each round every other peer drains once, in a rotating order, and message-proxy drains
    right after it: the sequence goes peer, message-proxy, peer, message-proxy, ... Each of
    message-proxy's runs names the run it follows (``versus``); the two make that round's ratio,
    drained one right after the other, so a drift of the machine's speed moves both alike.
    """
    top, others = peers[0], peers[1:]
    results: dict[str, list[dict[str, Any]]] = {peer.name: [] for peer in peers}
    for round_ in range(runs):
        shift = round_ % len(others)
        for peer in others[shift:] + others[:shift]:
            base = await drain_peer(peer, total, log_dir)
            mine = await drain_peer(top, total, log_dir)
            base["round"] = mine["round"] = round_
            mine["versus"] = peer.name
            results[peer.name].append(base)
            results[top.name].append(mine)
            problems = base["problems"] + mine["problems"]
            say(
                f"  round {round_ + 1}/{runs} {peer.name:<26} {base['rate']:>9,.0f} msg/s "
                f"(cpu {base['cpu_us_per_msg']['peer']:>4.0f} us/msg), then {top.name} "
                f"{mine['rate']:>9,.0f} msg/s (cpu {mine['cpu_us_per_msg']['peer']:>4.0f}): "
                f"{mine['rate'] / base['rate']:.2f}x"
                + (f"  PROBLEMS: {problems}" if problems else "")
            )
    return results


# --- workload 3: fan-out -----------------------------------------------------------------------


async def fanout(total: int, runs: int, log_dir: Path, say: Callable[[str], None]) -> list[Any]:
    results = []
    for round_ in range(runs):
        queue = brokers.unique("q")
        streams = [brokers.unique("s"), brokers.unique("s")]
        exchange, destination = brokers.unique("x"), brokers.unique("dest")
        await brokers.declare_queue(destination, exchange=exchange)
        outputs = Outputs(streams=streams, queues=[destination])
        destinations = [stream_to(s) for s in streams] + [exchange_to(exchange)]

        def start(queue: str = queue, destinations: list[str] = destinations) -> Handle:
            name = f"message-proxy-fanout-{queue}"
            return start_proxy("proxy", ["run"], queue, destinations, log_dir, name)[0]

        try:
            result = await drain(start, queue, total, outputs)
        finally:
            await brokers.delete_queue(queue, destination)
            await brokers.delete_exchange(exchange)
            await brokers.delete_keys(*streams)
        result["entries_rate"] = result["rate"] * len(streams)
        result["outputs_rate"] = result["rate"] * (len(streams) + 1)
        results.append(result)
        say(
            f"  round {round_ + 1}/{runs} fan-out {result['rate']:>9,.0f} msg/s, "
            f"{result['entries_rate']:,.0f} stream entries/s"
            + (f"  PROBLEMS: {result['problems']}" if result["problems"] else "")
        )
    return results


# --- workload 4: latency -----------------------------------------------------------------------


async def _paced_publish(queue: str, rate: float, seconds: float) -> int:
    """Publish at a steady ``rate`` (a tick every ms), the send time in a header of each."""
    template = publisher.Template(queue, with_time=True)
    pub = await RawPublisher().connect()
    sent = 0
    started = time.perf_counter()
    try:
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
            due = int(elapsed * rate) + 1
            if due > sent:
                now_ns = time.time_ns()
                await pub.publish([template.frames(i, now_ns) for i in range(sent, due)])
                sent = due
            await asyncio.sleep(0.001)
        await pub.wait_confirmed(0)
    finally:
        await pub.close()
    return sent


async def _read_latencies(stream: str, expected: Callable[[], int | None]) -> list[float]:
    """XREAD BLOCK from the start; the latency of each entry in ms, in order."""
    client = brokers.redis_client()
    latencies: list[float] = []
    last: bytes | str = "0-0"
    try:
        while True:
            target = expected()
            if target is not None and len(latencies) >= target:
                return latencies
            reply: Any = await client.xread({stream: last}, block=200, count=1000)
            now_ns = time.time_ns()
            for _name, entries in reply or []:
                for entry_id, fields in entries:
                    headers = orjson.loads(fields[b"headers"])
                    sent_ns = int(headers[brokers.SENT_HEADER])
                    latencies.append((now_ns - sent_ns) / 1e6)
                    last = entry_id
    finally:
        await client.aclose()


async def latency(
    rate: float, seconds: float, runs: int, log_dir: Path, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    results = []
    warmup = min(1.0, seconds / 10)
    for round_ in range(runs):
        queue, stream = brokers.unique("q"), brokers.unique("s")
        await brokers.declare_queue(queue)
        proc, port = start_proxy(
            "workers.stream_bridge", [], queue, [stream_to(stream)], log_dir, f"latency-{queue}"
        )
        try:
            await asyncio.to_thread(wait_ready, proc, port)
            published: list[int] = []

            def expected(published: list[int] = published) -> int | None:
                return published[0] if published else None

            reader = asyncio.create_task(_read_latencies(stream, expected))
            published.append(await _paced_publish(queue, rate, seconds))
            latencies = await asyncio.wait_for(reader, 60)
        finally:
            proc.stop()
            await brokers.delete_queue(queue)
            await brokers.delete_keys(stream)
        skip = int(warmup * rate)
        steady = sorted(latencies[skip:])
        result = {
            "published": published[0],
            "received": len(latencies),
            "p50_ms": _percentile(steady, 50),
            "p99_ms": _percentile(steady, 99),
            "max_ms": steady[-1],
            "warmup_s": warmup,
            "max_ms_with_warmup": max(latencies),
        }
        results.append(result)
        say(
            f"  round {round_ + 1}/{runs} latency p50 {result['p50_ms']:.2f} ms, "
            f"p99 {result['p99_ms']:.2f} ms, max {result['max_ms']:.2f} ms"
        )
    return results


def _percentile(ordered: list[float], pct: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# --- workload 5: memory with a big backlog ------------------------------------------------------


async def memory(
    total: int, runs: int, log_dir: Path, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """One backlog of ``total``, drained in ``runs`` legs by as many worker processes.

    Pre-filling is the slow part (RabbitMQ takes ~60 us of CPU per persistent message), so the
    backlog is filled once: worker 1 starts against all of it and is stopped (SIGTERM, a graceful
    drain) once it has written 1/runs of it, worker 2 starts against the rest, and so on. Every
    worker starts against a backlog of at least total/runs, the first against all of it.
    """
    queue, stream = brokers.unique("q"), brokers.unique("s")
    await brokers.declare_queue(queue)
    filled_at = time.perf_counter()
    await publisher.fill(queue, total, lanes=1)
    fill_rate = total / (time.perf_counter() - filled_at)
    results: list[dict[str, Any]] = []
    client = brokers.redis_client()
    try:
        for leg in range(runs):
            backlog = await brokers.queue_depth(queue)
            written = int(await client.xlen(stream))
            target = total if leg == runs - 1 else (leg + 1) * total // runs

            async def complete(target: int = target) -> bool:
                return int(await client.xlen(stream)) >= target

            name = f"mem-{queue}-{leg}"
            proc, _port = start_proxy(
                "workers.stream_bridge", [], queue, [stream_to(stream)], log_dir, name
            )
            try:
                timing = await brokers.observe_drain(
                    queue, backlog, complete, alive=proc.alive, require_empty=leg == runs - 1
                )
            finally:
                code = proc.stop()
            moved = int(await client.xlen(stream)) - written
            result: dict[str, Any] = {
                "backlog_at_start": backlog,
                "messages": moved,
                "rate": moved / timing.seconds,
                "peak_rss_mb": proc.peak_rss / 2**20,
                "fill_rate": fill_rate,
                "problems": [] if code in (0, -15) else [f"exit code {code}"],
            }
            results.append(result)
            say(
                f"  run {leg + 1}/{runs} against a backlog of {backlog:,}: peak RSS "
                f"{result['peak_rss_mb']:.1f} MB, {result['rate']:,.0f} msg/s"
                + (f"  PROBLEMS: {result['problems']}" if result["problems"] else "")
            )
        left, entries = await brokers.queue_depth(queue), int(await client.xlen(stream))
        if left or entries != total:
            results[-1]["problems"].append(
                f"after the last leg: {left} left in the queue, {entries} entries of {total}"
            )
    finally:
        await client.aclose()
        await brokers.delete_queue(queue)
        await brokers.delete_keys(stream)
    return results


# --- workload 6: start-up ----------------------------------------------------------------------


async def startup(
    runs: int, log_dir: Path, say: Callable[[str], None], modules: list[str]
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    for module in modules:
        times = []
        for _ in range(runs):
            queue, target = brokers.unique("q"), brokers.unique("s")
            await brokers.declare_queue(queue)
            destination = (
                exchange_to(target) if module == "workers.exchange_relay" else stream_to(target)
            )
            proc, port = start_proxy(module, [], queue, [destination], log_dir, f"start-{queue}")
            try:
                times.append(await asyncio.to_thread(wait_ready, proc, port))
            finally:
                proc.stop()
                await brokers.delete_queue(queue)
        results[module] = times
        say(f"  {module}: ready after {statistics.median(times) * 1000:.0f} ms (median of {runs})")
    return results
