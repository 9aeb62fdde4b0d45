"""``uv run python -m bench [--quick] [--runs 5]``: run the workloads, print, write the report.

``uv run python -m bench instructions [--commit REV]``: instructions per message under callgrind,
stage by stage (``bench/instructions.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import batching, hotpath, instructions, redis_modes, report, workloads
from bench.procs import REPO

WORKLOADS = (
    "hotpath",
    "instructions",
    "stream",
    "exchange",
    "fanout",
    "latency",
    "memory",
    "startup",
    "redis-cluster",
    "batching",
)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (1 run, 20k)")
    parser.add_argument(
        "--runs", type=int, default=None, help="alternating rounds per comparison (default 5)"
    )
    parser.add_argument("--messages", type=int, default=None, help="backlog of the drains")
    parser.add_argument("--backlog", type=int, default=None, help="backlog of the memory run")
    parser.add_argument("--memory-runs", type=int, default=None, help="runs of the memory drain")
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--rate", type=float, default=2000.0, help="latency workload msg/s")
    parser.add_argument(
        "--baseline",
        default=instructions.BASELINE,
        help="the commit the instruction counts are compared with (default %(default)s)",
    )
    parser.add_argument(
        "--instructions-messages", type=int, default=None, help="counted drain (default 5,000)"
    )
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help=f"comma-separated: {','.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--from-results",
        type=Path,
        default=None,
        help="re-write the report from a results.json of an earlier run, running nothing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where BENCHMARKS.md and benchmarks.png go (default: docs/; --quick: the log dir)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.runs = args.runs or (1 if quick else 5)
    args.instructions_messages = args.instructions_messages or (1_000 if quick else 5_000)
    args.messages = args.messages or (20_000 if quick else 100_000)
    args.backlog = args.backlog or (50_000 if quick else 1_000_000)
    args.memory_runs = args.memory_runs or args.runs
    args.latency_seconds = args.latency_seconds or (5.0 if quick else 20.0)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    return args


async def _run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    def say(line: str) -> None:
        print(line, flush=True)

    results: dict[str, Any] = {"settings": {}, "machine": report.machine_notes()}
    results["settings"] = {
        "runs": args.runs,
        "messages": args.messages,
        "backlog": args.backlog,
        "memory_runs": args.memory_runs,
        "latency_rate": args.rate,
        "latency_seconds": args.latency_seconds,
        "quick": args.quick,
        "baseline": args.baseline,
        "command": "uv run python -m bench " + " ".join(sys.argv[1:]),
    }
    started = time.perf_counter()
    steps = {
        "hotpath": (
            "0. hot path, stage by stage, in process",
            lambda: asyncio.to_thread(hotpath.measure),
        ),
        "instructions": (
            f"0. instructions per message under callgrind, {args.baseline} and the working tree",
            lambda: instructions.run(
                [args.baseline, instructions.WORKTREE],
                list(instructions.ROLES),
                messages=args.instructions_messages,
                warmup=args.instructions_messages // 5,
                repeat=1,
                passes=["plain", "stages"],
                python=instructions.find_python(None),
                log_dir=log_dir,
                say=say,
            ),
        ),
        "stream": (
            "1. drain AMQP -> one Redis stream",
            lambda: workloads.compare(
                workloads.STREAM_PEERS, args.messages, args.runs, log_dir, say
            ),
        ),
        "exchange": (
            "2. drain AMQP -> AMQP exchange",
            lambda: workloads.compare(
                workloads.EXCHANGE_PEERS, args.messages, args.runs, log_dir, say
            ),
        ),
        "fanout": (
            "3. fan-out: two streams and one exchange",
            lambda: workloads.fanout(args.messages, args.runs, log_dir, say),
        ),
        "latency": (
            f"4. latency at {args.rate:,.0f} msg/s for {args.latency_seconds:.0f} s",
            lambda: workloads.latency(args.rate, args.latency_seconds, args.runs, log_dir, say),
        ),
        "memory": (
            f"5. peak RSS draining a backlog of {args.backlog:,}",
            lambda: workloads.memory(args.backlog, args.memory_runs, log_dir, say),
        ),
        "redis-cluster": (
            "7. drain into a 3-master Redis Cluster next to one Redis",
            lambda: redis_modes.compare(
                max(10_000, args.messages // 2), max(5, args.runs), 16, log_dir, say
            ),
        ),
        "batching": (
            "8. natural batching: latency at 2,000 and 8,000 msg/s, drains against a 5 ms linger",
            lambda: batching.run(
                roles=list(batching.ROLES),
                rates=[2000.0, 8000.0],
                seconds=min(10.0, args.latency_seconds),
                runs=args.runs,
                messages=args.messages,
                parts=["latency", "drain"],
                log_dir=log_dir,
                say=say,
            ),
        ),
        "startup": (
            "6. start-up to /ready",
            lambda: workloads.startup(
                max(5, args.runs), log_dir, say, ["workers.stream_bridge", "workers.exchange_relay"]
            ),
        ),
    }
    for name in WORKLOADS:
        if name not in args.only:
            continue
        title, step = steps[name]
        say(f"{title} ...")
        step_started = time.perf_counter()
        results[name] = await step()
        results.setdefault("durations", {})[name] = time.perf_counter() - step_started
    results["machine_after"] = report.load_average()
    results["total_seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["instructions"]:
        return instructions.main(argv[1:])
    args = _arguments(argv)
    if args.from_results:
        results = json.loads(args.from_results.read_text())
        out = args.out or (
            args.from_results.parent if results["settings"]["quick"] else REPO / "docs"
        )
        report.write(results, out / "BENCHMARKS.md", out / "benchmarks.png")
        print(report.table(results))
        print(f"\nwrote {out / 'BENCHMARKS.md'} and {out / 'benchmarks.png'}")
        return 0
    log_dir = Path(tempfile.mkdtemp(prefix="message-proxy-bench-"))
    print(f"logs, configs and raw results: {log_dir}", flush=True)
    results = asyncio.run(_run(args, log_dir))
    (log_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    out = args.out or (log_dir if args.quick else REPO / "docs")
    out.mkdir(parents=True, exist_ok=True)
    print()
    print(report.table(results))
    report.write(results, out / "BENCHMARKS.md", out / "benchmarks.png")
    print(f"\nwrote {out / 'BENCHMARKS.md'} and {out / 'benchmarks.png'}")
    print(f"took {results['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
