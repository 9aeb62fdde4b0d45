"""Summaries of the raw runs: the printed table, ``docs/BENCHMARKS.md`` and the bar chart."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench import instructions_report

PROXY = "message-proxy"
CEILING = "aio-pika ack-only ceiling"
STRICT_CEILING = "aiormq ack-only ceiling"
LATENCY_P99_TARGET_MS = 3.0  # workload 4, at 2,000 msg/s: the same target as section 8's
NAIVE = "naive bridge"
RELAY = "message-proxy relay"
SHOVEL = "RabbitMQ Shovel"


# --- machine -----------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _command_output(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def machine_notes() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rabbit = ""
    for line in _command_output(["rabbitmqctl", "-q", "version"]).splitlines():
        rabbit = line.strip() or rabbit
    redis_version = ""
    for line in _command_output(["redis-cli", "info", "server"]).splitlines():
        if line.startswith("redis_version:"):
            redis_version = line.split(":", 1)[1].strip()
    packages = {}
    for name in ("aio-pika", "aiormq", "pamqp", "redis", "hiredis", "uvloop", "faststream"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "absent"
    return {
        "cpu": cpu,
        "cores": psutil.cpu_count(logical=True),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rabbitmq": rabbit,
        "redis": redis_version,
        "packages": packages,
        "load_before": load_average(),
    }


# --- summaries ---------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _runs_of(results: dict[str, Any], workload: str) -> dict[str, list[dict[str, Any]]]:
    value = results.get(workload)
    return value if isinstance(value, dict) else {}


def round_ratios(runs: dict[str, list[dict[str, Any]]], top: str, base: str) -> list[float]:
    """Each round's top rate / base rate: top's run paired with (``versus``) base's, in order.

    Results written before the rounds alternated have no ``versus``: top's run of the same round.
    """
    base_by_round = {r["round"]: r["rate"] for r in runs.get(base, [])}
    return [
        r["rate"] / base_by_round[r["round"]]
        for r in runs.get(top, [])
        if r.get("versus", base) == base and r["round"] in base_by_round
    ]


def paired_ratio(runs: dict[str, list[dict[str, Any]]], top: str, base: str) -> float:
    """The median of the rounds' ratios."""
    return median(round_ratios(runs, top, base))


def _ratios(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _rates(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['rate']:,.0f}" for r in runs)


def _cpu(runs: list[dict[str, Any]], part: str) -> float:
    return median([r["cpu_us_per_msg"][part] for r in runs])


def _gc_share(runs: list[dict[str, Any]]) -> str:
    """The dirty-CPU (garbage collection) part of RabbitMQ's CPU, where the run measured it."""
    if not all("rabbitmq_gc" in r["cpu_us_per_msg"] for r in runs):
        return ""
    return f" ({_cpu(runs, 'rabbitmq_gc'):.0f})"


def _cores(runs: list[dict[str, Any]]) -> str:
    if not all("rabbitmq_cores" in r for r in runs):
        return "-"
    return f"{median([r['rabbitmq_cores'] for r in runs]):.2f}"


def _problems(runs: list[dict[str, Any]]) -> list[str]:
    return [p for r in runs for p in r.get("problems", [])]


def drain_rows(runs: dict[str, list[dict[str, Any]]], top: str) -> list[list[str]]:
    rows = []
    for peer, peer_runs in runs.items():
        rows.append(
            [
                peer,
                f"{median([r['rate'] for r in peer_runs]):,.0f}",
                "-" if peer == top else f"{paired_ratio(runs, top, peer):.2f}x",
                "-" if peer == top else _ratios(round_ratios(runs, top, peer)),
                f"{_cpu(peer_runs, 'peer'):.0f}",
                f"{_cpu(peer_runs, 'rabbitmq'):.0f}" + _gc_share(peer_runs),
                _cores(peer_runs),
                f"{_cpu(peer_runs, 'redis'):.0f}",
                f"{median([r['peak_rss_mb'] for r in peer_runs]):.0f}" if peer != SHOVEL else "-",
                _rates(peer_runs),
            ]
        )
    return rows


DRAIN_HEADER = [
    "peer",
    "msg/s (median)",
    "message-proxy / peer (median)",
    "every round's ratio",
    "peer CPU us/msg",
    "RabbitMQ CPU us/msg (of it GC)",
    "RabbitMQ cores busy",
    "Redis CPU us/msg",
    "peak RSS MB",
    "every run, msg/s",
]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []

    def add(what: str, wanted: str, value: float, ok: Callable[[float], bool], fmt: str) -> None:
        if value != value:  # NaN: not measured
            return
        rows.append([what, wanted, format(value, fmt), "yes" if ok(value) else "**no**"])

    stream = _runs_of(results, "stream")
    if stream:
        add(
            "1. message-proxy / aiormq ack-only ceiling",
            ">= 1.3x",
            paired_ratio(stream, PROXY, STRICT_CEILING),
            lambda v: v >= 1.3,
            ".2f",
        )
        add(
            "1. message-proxy / aio-pika ack-only ceiling",
            ">= 0.9x",
            paired_ratio(stream, PROXY, CEILING),
            lambda v: v >= 0.9,
            ".2f",
        )
        add(
            "1. message-proxy / naive bridge",
            ">= 3x",
            paired_ratio(stream, PROXY, NAIVE),
            lambda v: v >= 3,
            ".2f",
        )
    exchange = _runs_of(results, "exchange")
    if exchange:
        add(
            "2. relay / Shovel",
            ">= 1.0x",
            paired_ratio(exchange, RELAY, SHOVEL),
            lambda v: v >= 1.0,
            ".2f",
        )
    if results.get("latency"):
        add(
            "4. latency p99 (ms)",
            f"<= {LATENCY_P99_TARGET_MS:g}",
            median([r["p99_ms"] for r in results["latency"]]),
            lambda v: v <= LATENCY_P99_TARGET_MS,
            ".2f",
        )
    if results.get("memory"):
        add(
            f"5. peak RSS, backlog {results['settings']['backlog']:,} (MB)",
            "< 80",
            median([r["peak_rss_mb"] for r in results["memory"]]),
            lambda v: v < 80,
            ".1f",
        )
    if results.get("batching"):
        from bench import batching

        rows += batching.target_rows(results["batching"])
    found = instructions_report.bridge_target(results.get("instructions") or {})
    if found:
        ratio, commits = found
        add(
            f"0. stream bridge instructions per message, {commits}",
            "<= 0.70x",
            ratio,
            lambda v: v <= 0.7,
            ".2f",
        )
    return rows


def table(results: dict[str, Any]) -> str:
    """The plain-text summary printed at the end of a run."""
    parts = []
    stream = _runs_of(results, "stream")
    if stream:
        parts.append("1. drain -> one Redis stream (ratio: message-proxy / peer, same round)")
        parts.append(plain_table(DRAIN_HEADER, drain_rows(stream, PROXY)))
    exchange = _runs_of(results, "exchange")
    if exchange:
        parts.append("\n2. drain -> exchange")
        parts.append(plain_table(DRAIN_HEADER, drain_rows(exchange, RELAY)))
    if results.get("fanout"):
        parts.append("\n3. fan-out")
        parts.append(plain_table(*fanout_rows(results["fanout"])))
    if results.get("latency"):
        parts.append("\n4. latency")
        parts.append(plain_table(*latency_rows(results)))
    if results.get("memory"):
        parts.append("\n5. memory")
        parts.append(plain_table(*memory_rows(results)))
    if results.get("startup"):
        parts.append("\n6. start-up")
        parts.append(plain_table(*startup_rows(results["startup"])))
    if results.get("redis-cluster"):
        parts.append("\n7. Redis Cluster next to one Redis (ratio: same round)")
        parts.append(plain_table(*redis_cluster_rows(results["redis-cluster"])))
    if results.get("hotpath"):
        parts.append("\n0. hot path, in process (best of 25 loops)")
        parts.append(plain_table(*hotpath_rows(results["hotpath"])))
    if results.get("instructions"):
        parts.append("\n0. " + instructions_report.text(results["instructions"]))
    parts.append("\ntargets")
    parts.append(plain_table(["target", "wanted", "measured", "met"], targets(results)))
    return "\n".join(parts)


def fanout_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["msg/s", "stream entries/s", "outputs/s (2 entries + 1 publish)", "every run, msg/s"]
    rows = [
        [
            f"{median([r['rate'] for r in runs]):,.0f}",
            f"{median([r['entries_rate'] for r in runs]):,.0f}",
            f"{median([r['outputs_rate'] for r in runs]):,.0f}",
            _rates(runs),
        ]
    ]
    return header, rows


def latency_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    runs = results["latency"]
    header = ["p50 ms", "p99 ms", "max ms", "messages per run", "every run: p50 / p99 / max"]
    every = "; ".join(f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} / {r['max_ms']:.1f}" for r in runs)
    rows = [
        [
            f"{median([r['p50_ms'] for r in runs]):.2f}",
            f"{median([r['p99_ms'] for r in runs]):.2f}",
            f"{median([r['max_ms'] for r in runs]):.1f}",
            f"{median([r['received'] for r in runs]):,.0f}",
            every,
        ]
    ]
    return header, rows


def memory_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    runs = results["memory"]
    header = [
        "backlog",
        "peak RSS MB (median)",
        "drain msg/s",
        "pre-fill msg/s",
        "every run: backlog at its start -> peak RSS MB",
    ]
    rows = [
        [
            f"{results['settings']['backlog']:,}",
            f"{median([r['peak_rss_mb'] for r in runs]):.1f}",
            f"{median([r['rate'] for r in runs]):,.0f}",
            f"{median([r['fill_rate'] for r in runs]):,.0f}",
            "; ".join(f"{r['backlog_at_start']:,} -> {r['peak_rss_mb']:.1f}" for r in runs),
        ]
    ]
    return header, rows


def hotpath_rows(stages: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    return ["stage", "us per message"], [[name, f"{us:.2f}"] for name, us in stages.items()]


def startup_rows(runs: dict[str, list[float]]) -> tuple[list[str], list[list[str]]]:
    header = ["role", "start to /ready, ms (median)", "every run, ms"]
    rows = [
        [
            f"python -m {module}",
            f"{median(times) * 1000:.0f}",
            ", ".join(f"{t * 1000:.0f}" for t in times),
        ]
        for module, times in runs.items()
    ]
    return header, rows


# --- chart -------------------------------------------------------------------------------------


def _label(peer: str) -> str:
    return peer.replace(" ", "\n")


def _color(peer: str, default: str) -> str:
    if "experiment" in peer:
        return "#b0b0b0"
    return "#2e8b57" if peer.startswith(PROXY) else default


def _drain_panel(axis: Any, results: dict[str, Any]) -> None:
    names, values, colors = [], [], []
    for workload, color in (("stream", "#4878a8"), ("exchange", "#c0733a")):
        for peer, runs in _runs_of(results, workload).items():
            names.append(_label(peer))
            values.append(median([r["rate"] for r in runs]))
            colors.append(_color(peer, color))
    bars = axis.bar(range(len(values)), values, color=colors)
    axis.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    axis.set_xticks(range(len(values)), names, fontsize=7)
    axis.set_ylabel("messages per second (median)")
    axis.set_title(
        "Drains: message-proxy (green), peers to a stream (blue) / an exchange (orange)",
        fontsize=9,
    )


def comparisons(results: dict[str, Any]) -> list[tuple[str, list[float]]]:
    """Every ratio the run measured: (label, each round's ratio), message-proxy over the peer."""
    out = []
    for workload, top in (("stream", PROXY), ("exchange", RELAY)):
        runs = _runs_of(results, workload)
        for peer in runs:
            if peer != top:
                out.append((f"{top} / {peer}", round_ratios(runs, top, peer)))
    return out


def _ratio_panel(axis: Any, results: dict[str, Any]) -> None:
    found = [(label, ratios) for label, ratios in comparisons(results) if ratios]
    for index, (_name, ratios) in enumerate(found):
        axis.scatter([index] * len(ratios), ratios, s=14, color="#4878a8", zorder=3)
        middle = median(ratios)
        axis.hlines(middle, index - 0.3, index + 0.3, color="#2e8b57", linewidth=2.5)
        axis.annotate(
            f"{middle:.2f}x", (index + 0.32, middle), fontsize=8, va="center", color="#2e8b57"
        )
    axis.axhline(1.0, color="#999999", linestyle="--", linewidth=1)
    axis.set_yscale("log")
    labels = [_label(label.split(" / ", 1)[1]) for label, _ in found]
    labels = [
        ("relay /\n" if label.startswith(RELAY) else "") + text
        for (label, _), text in zip(found, labels, strict=True)
    ]
    axis.set_xticks(range(len(found)), labels, fontsize=7)
    axis.set_xlim(-0.6, len(found) - 0.2)
    axis.set_ylabel("message-proxy's rate / the peer's, same round")
    axis.set_title("Ratios: every round (dots), median (green)", fontsize=9)


def _latency_panel(axis: Any, results: dict[str, Any]) -> None:
    runs = results["latency"]
    labels = ["p50", "p99", "max"]
    values = [median([r[f"{k}_ms"] for r in runs]) for k in labels]
    bars = axis.bar(labels, values, color=["#2e8b57", "#2e8b57", "#999999"])
    axis.bar_label(bars, labels=[f"{v:.1f} ms" for v in values], fontsize=8)
    axis.axhline(LATENCY_P99_TARGET_MS, color="#b22222", linestyle="--", linewidth=1)
    axis.set_ylabel("publish to visible in Redis, ms")
    rate = results["settings"]["latency_rate"]
    axis.set_title(f"Latency at {rate:,.0f} msg/s (red: p99 target)", fontsize=9)


def _memory_panel(axis: Any, results: dict[str, Any]) -> None:
    names, values = [], []
    for peer, runs in _runs_of(results, "stream").items():
        names.append(_label(peer))
        values.append(median([r["peak_rss_mb"] for r in runs]))
    if results.get("memory"):
        names.append(f"message-proxy\n{results['settings']['backlog'] // 1000}k backlog")
        values.append(median([r["peak_rss_mb"] for r in results["memory"]]))
    colors = [_color(n.replace("\n", " "), "#4878a8") for n in names]
    bars = axis.bar(range(len(values)), values, color=colors)
    axis.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8)
    axis.axhline(80, color="#b22222", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(values)), names, fontsize=6)
    axis.set_ylabel("peak RSS, MB")
    axis.set_title("Peak RSS while draining (red: target)", fontsize=9)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[Callable[[Any, dict[str, Any]], None]] = []
    if _runs_of(results, "stream") or _runs_of(results, "exchange"):
        panels.append(_drain_panel)
    if any(ratios for _label, ratios in comparisons(results)):
        panels.append(_ratio_panel)
    if results.get("latency"):
        panels.append(_latency_panel)
    if results.get("memory") or _runs_of(results, "stream"):
        panels.append(_memory_panel)
    if not panels:
        return
    widths = [1.6 if draw is _drain_panel else 1.0 for draw in panels]
    figure, axes = plt.subplots(
        1,
        len(panels),
        figsize=(5.2 * sum(widths), 4.8),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    for axis, draw in zip(axes[0], panels, strict=True):
        draw(axis, results)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- the document ------------------------------------------------------------------------------


def write(results: dict[str, Any], markdown: Path, png: Path) -> None:
    chart(results, png)
    markdown.write_text(document(results, png.name))


def document(results: dict[str, Any], png_name: str) -> str:
    from bench.notes import (
        HOW_TIMED,
        INSTRUCTION_PROFILE,
        INSTRUCTIONS,
        PEERS,
        PROFILE,
        VARIATION,
        intro,
    )

    settings, machine = results["settings"], results["machine"]
    out = [intro(settings)]
    out.append("## Targets\n")
    out.append(markdown_table(["target", "wanted", "measured", "met"], targets(results)))
    out.append(f"\n![benchmarks]({png_name})\n")
    if results.get("instructions"):
        out.append("## 0. Instructions per message (callgrind)\n")
        out.append(instructions_report.markdown(results["instructions"]))
    stream = _runs_of(results, "stream")
    if stream:
        out.append(
            f"## 1. Drain {settings['messages']:,} messages: AMQP -> one Redis stream\n\n"
            "message-proxy / peer: message-proxy's rate divided by the rate of the peer it "
            "followed in the same round (the rounds alternate: peer, message-proxy, peer, ...); "
            "every round's ratio, then their median. CPU is per message, from the first delivery "
            "to the end of the drain.\n"
        )
        out.append(markdown_table(DRAIN_HEADER, drain_rows(stream, PROXY)))
    exchange = _runs_of(results, "exchange")
    if exchange:
        out.append(
            f"\n## 2. Drain {settings['messages']:,} messages: AMQP -> AMQP exchange\n\n"
            "The Shovel runs inside RabbitMQ, so its CPU is counted in RabbitMQ's column. "
            "RabbitMQ spends no more CPU per message on the relay than on the Shovel, whose own "
            "work is inside it; the relay's own CPU comes on top, out of the same two cores. "
            "Neither saturates them (cores busy): the relay is held by the cycle of one batch "
            "(publish, wait for RabbitMQ to confirm, ack, send the next), which more batches in "
            "flight did not shorten (see the profile).\n"
        )
        out.append(markdown_table(DRAIN_HEADER, drain_rows(exchange, RELAY)))
    if results.get("fanout"):
        out.append(
            "\n## 3. Fan-out: each message to two streams and one exchange (message-proxy)\n\n"
            "One route, three destinations: two Redis streams and one exchange, in one batch.\n"
        )
        out.append(markdown_table(*fanout_rows(results["fanout"])))
    if results.get("latency"):
        out.append(
            f"\n## 4. Latency at a steady {settings['latency_rate']:,.0f} msg/s for "
            f"{settings['latency_seconds']:.0f} s (default batch settings)\n\n"
            "Natural batching (the default): a batch goes out as soon as the worker has read what "
            "the socket held and the previous batch is written, so at this rate most batches hold "
            "a message or two and a message waits for nothing but delivery, the XADD round trip "
            "and the read. Section 8 has both roles at two rates.\n"
        )
        out.append(markdown_table(*latency_rows(results)))
    if results.get("memory"):
        out.append(
            f"\n## 5. Memory: draining a backlog of {settings['backlog']:,}\n\n"
            "The backlog is pre-filled once (the slow part) and drained in as many legs as runs, "
            "by one worker process each: the first starts against the whole backlog and is "
            "stopped (SIGTERM) once it has written its share, the next starts against the rest. "
            "Peak RSS is each process's, sampled every 50 ms over its whole life.\n"
        )
        out.append(markdown_table(*memory_rows(results)))
    if results.get("startup"):
        out.append("\n## 6. Start-up: process start to `/ready` 200\n")
        out.append(markdown_table(*startup_rows(results["startup"])))
    if results.get("redis-cluster"):
        out.append(redis_cluster_section(results["redis-cluster"]))
    if results.get("batching"):
        from bench import batching

        out.append(batching.section(results["batching"]))
    out.append("\n" + HOW_TIMED)
    out.append(INSTRUCTIONS)
    out.append(PEERS)
    out.append(VARIATION)
    out.append(PROFILE)
    if results.get("hotpath"):
        out.append(
            "Measured in this run, in process, no broker (`bench/hotpath.py`: best of 25 loops "
            "over 1,000 realistic deliveries; the lines marked *before* are the forms this "
            "suite replaced):\n"
        )
        out.append(markdown_table(*hotpath_rows(results["hotpath"])) + "\n")
    out.append(INSTRUCTION_PROFILE)
    out.append(machine_section(results, machine))
    problems = [
        p
        for w in ("stream", "exchange")
        for runs in _runs_of(results, w).values()
        for p in _problems(runs)
    ]
    problems += [p for w in ("fanout", "memory") for p in _problems(results.get(w) or [])]
    if problems:
        out.append("\n## Problems seen in this run\n\n" + "\n".join(f"- {p}" for p in problems))
    return "\n".join(out) + "\n"


REDIS_CLUSTER_HEADER = ["destination", "msg/s", "worker CPU us/msg", "/ single Redis", "each round"]


def redis_cluster_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    from bench.redis_modes import summary

    rows = []
    first = data["modes"][0]
    for name, rate, cpu, ratio in summary(data):
        each = ", ".join(f"{r[name]['rate'] / r[first]['rate']:.2f}" for r in data["rounds"])
        rows.append([name, f"{rate:,.0f}", f"{cpu:.0f}", f"{ratio:.2f}", each])
    return REDIS_CLUSTER_HEADER, rows


def redis_cluster_section(data: dict[str, Any]) -> str:
    return (
        f"\n## 7. Drain {data['messages']:,} messages into {data['streams']} streams: one Redis, "
        "a Redis Cluster\n\n"
        "The stream bridge drains the same backlog (16 routing keys in turn, one stream each) into "
        "the machine's single Redis and into a 3-master Redis Cluster with one replica per master "
        "(started on this machine by `tests/servers`), without and with `min_replicas = 1` (a WAIT "
        "per node per batch), the three in turn in each of "
        f"{len(data['rounds'])} rounds; ratios are to the single Redis of the same round, the "
        "column the median of them. This part alone: `uv run python -m bench --only "
        "redis-cluster` (or `uv run python -m bench.redis_modes`, which prints only).\n\n"
        + markdown_table(*redis_cluster_rows(data))
        + "\n"
    )


def machine_section(results: dict[str, Any], machine: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
    durations = ", ".join(
        f"{name} {seconds / 60:.1f} min" for name, seconds in results.get("durations", {}).items()
    )
    return (
        "\n## Machine\n\n"
        f"- {machine['cpu']}, {machine['cores']} logical cores, {machine['memory_gb']} GB, "
        f"Linux {machine['kernel']}; Python {machine['python']}.\n"
        f"- RabbitMQ {machine['rabbitmq']}, Redis {machine['redis']}, both on the same machine, "
        "shared with other work: load average "
        f"{machine['load_before']} before the run and {results.get('machine_after')} after.\n"
        f"- {packages}.\n"
        f"- The whole run took {results.get('total_seconds', 0) / 60:.1f} min ({durations}).\n"
    )
