"""Natural batching against a fixed linger, for both roles: latency at steady rates, drain rates.

``uv run python -m bench.batching [--runs 5] [--rates 2000,8000] [--seconds 10]`` prints; as
``uv run python -m bench --only batching`` it is section 8 of the report.

- **Latency**: the bench paces ``rate`` msg/s (a tick every millisecond, ``time.time_ns()`` in
  the header ``x-bench-sent-ns`` of each message as it is written) into a queue the worker
  consumes, with default batch settings. For the stream bridge the bench reads the stream with
  ``XREAD BLOCK``; for the relay it consumes the queue bound to the destination exchange. Each
  message's latency is the time it was read minus the time in its header; the first second is
  warm-up, left out of the percentiles. Two peers run in the same rounds, in the same rig: the
  RabbitMQ Shovel (on-confirm) into the same kind of exchange and bound queue, the relay's peer;
  and the rig's floor, the reader consuming the source queue itself with nothing between (what
  publishing, one pass through RabbitMQ and the reading cost at that rate on this machine).
- **Drain A/B**: the 100,000-message drain of workloads 1 and 2, once with ``max_delay_ms = 5``
  (the fixed linger this replaced) and once with the default (natural batching), alternating in
  each round (the order flips every round); a round's ratio is natural over linger.
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

import orjson

from bench import brokers, workloads
from bench.procs import wait_ready
from proxy.amqp.connection import AmqpConnection
from proxy.amqp.endpoint import Endpoint

LINGER_MS = 5.0  # the fixed linger natural batching replaced: the A side of the drain A/B
TARGETS = {2000.0: (3.0, 10.0), 8000.0: (5.0, None)}  # rate: (p99 ms, max ms) wanted
ROLES = {"bridge": "workers.stream_bridge", "relay": "workers.exchange_relay"}
# Measured beside the roles in each latency round: the relay's peer and the rig's own floor.
PEERS = ("shovel", "floor")
LABELS = {"shovel": "RabbitMQ Shovel (relay's peer)", "floor": "floor: no forwarder"}
READER_PREFETCH = 10_000


def _env(linger_ms: float | None) -> dict[str, str] | None:
    return None if linger_ms is None else {"MESSAGE_PROXY_BATCH__MAX_DELAY_MS": str(linger_ms)}


# --- latency ---------------------------------------------------------------------------------


async def _read_queue(queue: str, expected: Callable[[], int | None]) -> list[float]:
    """Consume ``queue`` (acked in bulk); the latency of each message in ms, in order."""
    latencies: list[float] = []
    got = asyncio.Event()
    endpoint = Endpoint.from_url(brokers.AMQP_URL, heartbeat=0)
    connection = await AmqpConnection.open(endpoint, connection_name="bench latency reader")

    def on_message(values: dict[str, Any], tag: int, _defect: str | None) -> None:
        now_ns = time.time_ns()
        latencies.append((now_ns - int(values["headers"][brokers.SENT_HEADER])) / 1e6)
        if tag % 500 == 0:
            connection.ack(tag, multiple=True)
        got.set()

    try:
        await connection.qos(READER_PREFETCH)
        await connection.consume(queue, on_message)
        while True:
            target = expected()
            if target is not None and len(latencies) >= target:
                return latencies
            got.clear()
            try:
                await asyncio.wait_for(got.wait(), 0.2)
            except TimeoutError:
                pass
    finally:
        await connection.close(2.0)


async def latency_run(
    role: str, rate: float, seconds: float, log_dir: Path, *, linger_ms: float | None = None
) -> dict[str, Any]:
    """One paced run against a fresh worker of ``role``: percentiles of the steady part."""
    queue = brokers.unique("q")
    await brokers.declare_queue(queue)
    output = bound = queue  # the floor: the reader takes the source queue itself
    read: Callable[[str, Callable[[], int | None]], Any] = _read_queue
    if role == "bridge":
        output = bound = brokers.unique("s")
        read = workloads._read_latencies  # the stream, with XREAD BLOCK
    elif role in ("relay", "shovel"):
        output, bound = brokers.unique("x"), brokers.unique("dest")
        await brokers.declare_queue(bound, exchange=output)
    handle: workloads.Handle | None = None
    try:
        if role in ROLES:
            destination = (
                workloads.stream_to(output) if role == "bridge" else workloads.exchange_to(output)
            )
            proc, port = workloads.start_proxy(
                ROLES[role], [], queue, [destination], log_dir, f"latency-{role}-{queue}",
                _env(linger_ms),
            )  # fmt: skip
            handle = proc
            await asyncio.to_thread(wait_ready, proc, port)
        elif role == "shovel":
            handle = await asyncio.to_thread(workloads.Shovel, queue, output)
        published: list[int] = []
        reader = asyncio.create_task(read(bound, lambda: published[0] if published else None))
        published.append(await workloads._paced_publish(queue, rate, seconds))
        latencies = await asyncio.wait_for(reader, 60)
        cpu = handle.cpu_seconds() if handle is not None else 0.0
    finally:
        if handle is not None:
            await asyncio.to_thread(handle.stop)
        await brokers.delete_queue(queue)
        if role == "bridge":
            await brokers.delete_keys(output)
        elif output != queue:
            await brokers.delete_queue(bound)
            await brokers.delete_exchange(output)
    warmup = min(1.0, seconds / 10)
    steady = sorted(latencies[int(warmup * rate) :])
    return {
        "role": role,
        "rate": rate,
        "linger_ms": linger_ms,
        "published": published[0],
        "received": len(latencies),
        "p50_ms": workloads._percentile(steady, 50),
        "p99_ms": workloads._percentile(steady, 99),
        "max_ms": steady[-1],
        "worker_cpu_s": cpu,
        "warmup_s": warmup,
    }


# --- drain A/B -------------------------------------------------------------------------------


def _peer(role: str, linger_ms: float | None) -> workloads.Peer:
    kind = "stream" if role == "bridge" else "exchange"
    label = "natural" if linger_ms is None else f"linger {linger_ms:g} ms"

    def start(queue: str, target: str, log_dir: Path) -> workloads.Handle:
        destination = workloads.stream_to(target) if kind == "stream" else (
            workloads.exchange_to(target)
        )
        name = f"drain-{role}-{target}"
        proc, _port = workloads.start_proxy(
            ROLES[role], [], queue, [destination], log_dir, name, _env(linger_ms)
        )
        return proc

    return workloads.Peer(f"{role}, {label}", kind, start)


async def drain_ab(
    role: str, total: int, runs: int, log_dir: Path, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """``runs`` rounds of (linger, natural) drains, the order flipped every round."""
    linger, natural = _peer(role, LINGER_MS), _peer(role, None)
    rounds = []
    for round_ in range(runs):
        order = (linger, natural) if round_ % 2 == 0 else (natural, linger)
        done = {peer.name: await workloads.drain_peer(peer, total, log_dir) for peer in order}
        a, b = done[linger.name], done[natural.name]
        ratio = b["rate"] / a["rate"]
        rounds.append({"linger": a, "natural": b, "ratio": ratio, "first": order[0].name})
        problems = a["problems"] + b["problems"]
        say(
            f"  {role} round {round_ + 1}/{runs}: linger {LINGER_MS:g} ms {a['rate']:>8,.0f} "
            f"msg/s (cpu {a['cpu_us_per_msg']['peer']:.0f} us/msg), natural {b['rate']:>8,.0f} "
            f"msg/s (cpu {b['cpu_us_per_msg']['peer']:.0f}): {ratio:.2f}x"
            + (f"  PROBLEMS: {problems}" if problems else "")
        )
    return rounds


# --- the workload ----------------------------------------------------------------------------


async def run(
    *,
    roles: list[str],
    rates: list[float],
    seconds: float,
    runs: int,
    messages: int,
    parts: list[str],
    log_dir: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    results: dict[str, Any] = {"latency": [], "drain": {}, "seconds": seconds}
    lingers: list[float | None] = [None, LINGER_MS] if "linger-latency" in parts else [None]
    if "latency" in parts:
        for round_ in range(runs):
            for role in [*roles, *PEERS]:
                for rate in rates:
                    order = lingers if round_ % 2 == 0 else lingers[::-1]
                    for linger in order if role in ROLES else [None]:  # a peer has no linger
                        result = await latency_run(role, rate, seconds, log_dir, linger_ms=linger)
                        result["round"] = round_
                        results["latency"].append(result)
                        how = "natural" if linger is None else f"linger {linger:g} ms"
                        say(
                            f"  round {round_ + 1}/{runs} {role} at {rate:,.0f} msg/s, {how}: "
                            f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, max "
                            f"{result['max_ms']:.2f} ms ({result['received']:,} messages)"
                        )
    if "drain" in parts:
        for role in roles:
            results["drain"][role] = await drain_ab(role, messages, runs, log_dir, say)
    return results


def summary(results: dict[str, Any]) -> list[str]:
    """One line per (role, rate) and per drain, with the targets."""
    lines = []
    by_case: dict[tuple[str, float, float | None], list[dict[str, Any]]] = {}
    for result in results["latency"]:
        case = (result["role"], result["rate"], result["linger_ms"])
        by_case.setdefault(case, []).append(result)
    for (role, rate, linger), runs in by_case.items():
        p99 = statistics.median(r["p99_ms"] for r in runs)
        worst = max(r["max_ms"] for r in runs)
        wanted = TARGETS.get(rate) if linger is None and role in ROLES else None
        verdict = "" if linger is None else f" (linger {linger:g} ms, for comparison)"
        if role in PEERS:
            verdict = " (peer, for comparison)"
        if wanted is not None:
            p99_ok = p99 <= wanted[0]
            max_ok = wanted[1] is None or worst <= wanted[1]
            verdict = f"  target p99 <= {wanted[0]:g}" + (
                f", max <= {wanted[1]:g}" if wanted[1] is not None else ""
            )
            verdict += ": met" if p99_ok and max_ok else ": NOT met"
        p99s = ", ".join(f"{r['p99_ms']:.2f}" for r in runs)
        maxes = ", ".join(f"{r['max_ms']:.1f}" for r in runs)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        lines.append(
            f"{role} at {rate:,.0f} msg/s: p50 {p50:.2f} ms, p99 {p99:.2f} ms (every run "
            f"{p99s}), max {worst:.2f} ms (every run {maxes}){verdict}"
        )
    for role, rounds in results["drain"].items():
        ratios = [r["ratio"] for r in rounds]
        lines.append(
            f"{role} drain, natural / linger {LINGER_MS:g} ms: {statistics.median(ratios):.2f}x "
            f"(every round {', '.join(f'{x:.2f}' for x in ratios)}); natural "
            f"{statistics.median(r['natural']['rate'] for r in rounds):,.0f} msg/s, linger "
            f"{statistics.median(r['linger']['rate'] for r in rounds):,.0f} msg/s"
        )
    return lines


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    """Rows for the targets table: each latency target per role, and the drain A/B per role."""
    rows: list[list[str]] = []
    by_case: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for result in results.get("latency", []):
        if result["linger_ms"] is None:
            by_case.setdefault((result["role"], result["rate"]), []).append(result)
    for (role, rate), runs in sorted(by_case.items()):
        wanted = TARGETS.get(rate)
        if wanted is None or role not in ROLES:
            continue
        p99 = statistics.median(r["p99_ms"] for r in runs)
        rows.append(
            [f"8. {role} latency p99 at {rate:,.0f} msg/s (ms)", f"<= {wanted[0]:g}",
             f"{p99:.2f}", "yes" if p99 <= wanted[0] else "**no**"]
        )  # fmt: skip
        if wanted[1] is not None:
            worst = max(r["max_ms"] for r in runs)
            rows.append(
                [f"8. {role} latency max at {rate:,.0f} msg/s (ms)", f"<= {wanted[1]:g}",
                 f"{worst:.1f}", "yes" if worst <= wanted[1] else "**no**"]
            )  # fmt: skip
    for role, rounds in results.get("drain", {}).items():
        ratio = statistics.median(r["ratio"] for r in rounds)
        rows.append(
            [f"8. {role} drain, natural batching / 5 ms linger", ">= 1.0x", f"{ratio:.2f}",
             "yes" if ratio >= 1.0 else "**no**"]
        )  # fmt: skip
    return rows


def section(results: dict[str, Any]) -> str:
    """The report's section: every latency run and every drain round."""
    out = [
        "\n## 8. Natural batching: latency at steady rates, drains against a 5 ms linger\n\n"
        "A batch goes out as soon as the worker has read what the socket held and no other batch "
        "is being written (`max_delay_ms = 0`, the default); what arrives meanwhile makes the next "
        "batch. Latency: publish to visible (read from the stream, or consumed from the queue "
        "bound to the relay's exchange), default settings, the first second left out. "
        "Drains: 100,000 messages, the same worker with `max_delay_ms = 5` (the linger this "
        "replaced) and with the default, alternating. Beside them, in the same rounds and rig: "
        "the RabbitMQ Shovel (on-confirm, into the same exchange and bound queue), the relay's "
        "peer, and the rig's floor, the reader consuming the source queue itself (publishing, "
        "one pass through RabbitMQ and reading, at that rate on this machine). This part alone: "
        "`uv run python -m bench.batching`.\n",
        "| role | msg/s | batching | p50 ms | p99 ms | max ms | every run: p99 / max |",
        "|---|---|---|---|---|---|---|",
    ]
    by_case: dict[tuple[str, float, float | None], list[dict[str, Any]]] = {}
    for result in results.get("latency", []):
        by_case.setdefault((result["role"], result["rate"], result["linger_ms"]), []).append(result)
    for (role, rate, linger), runs in by_case.items():
        every = "; ".join(f"{r['p99_ms']:.2f} / {r['max_ms']:.1f}" for r in runs)
        how = "natural" if linger is None else f"linger {linger:g} ms"
        if role in PEERS:
            how = "-"
        p50 = statistics.median(r["p50_ms"] for r in runs)
        out.append(
            f"| {LABELS.get(role, role)} | {rate:,.0f} | {how} | {p50:.2f} "
            f"| {statistics.median(r['p99_ms'] for r in runs):.2f} "
            f"| {max(r['max_ms'] for r in runs):.1f} | {every} |"
        )
    drains = results.get("drain", {})
    if drains:
        out += [
            "",
            "| role | natural msg/s | 5 ms linger msg/s | natural / linger | each round |",
            "|---|---|---|---|---|",
        ]
        for role, rounds in drains.items():
            each = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
            out.append(
                f"| {role} | {statistics.median(r['natural']['rate'] for r in rounds):,.0f} "
                f"| {statistics.median(r['linger']['rate'] for r in rounds):,.0f} "
                f"| {statistics.median(r['ratio'] for r in rounds):.2f} | {each} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rates", default="2000,8000", help="latency rates, msg/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="each latency run")
    parser.add_argument("--messages", type=int, default=100_000, help="each drain")
    parser.add_argument("--roles", default="bridge,relay")
    parser.add_argument(
        "--parts",
        default="latency,drain",
        help="latency, drain; linger-latency adds a 5 ms linger run beside each latency run",
    )
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="message-proxy-batching-"))
    print(f"logs and configs: {log_dir}", flush=True)
    results = asyncio.run(
        run(
            roles=[r.strip() for r in args.roles.split(",") if r.strip()],
            rates=[float(r) for r in args.rates.split(",") if r.strip()],
            seconds=args.seconds,
            runs=args.runs,
            messages=args.messages,
            parts=[p.strip() for p in args.parts.split(",") if p.strip()],
            log_dir=log_dir,
            say=lambda line: print(line, flush=True),
        )
    )
    raw = orjson.dumps(results, option=orjson.OPT_INDENT_2)
    (log_dir / "results.json").write_bytes(raw)
    print()
    print("\n".join(summary(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
