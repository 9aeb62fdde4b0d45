"""``python -m bench instructions``: instructions per message under callgrind, stage by stage.

A worker (the stream bridge, the relay) runs as users run it, ``python -m workers.<role>``,
under ``valgrind --tool=callgrind``, against the shared RabbitMQ and Redis. Callgrind counts the
instructions the process executes, which do not depend on what else the machine is doing.

One measurement: start the worker with instrumentation off (start-up is not measured), turn it
on, drain a warm-up of ``--warmup`` messages, dump (the dump resets the counters), freeze the
worker (SIGSTOP), pre-fill ``--messages`` messages, let it go (SIGCONT), wait until every message
is written and acked, dump again. The second dump holds the drain and nothing else.

Two passes per measurement: *plain* (the interpreter as it ships: the figure) and *stages*
(``python -X perf`` with every C function folded into its Python caller, ``bench.callgrind``:
the split by stage and the top functions). The perf trampoline costs instructions of its own
(every Python call goes through C), so the stages pass's total is printed beside the plain one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import brokers, callgrind, publisher, stages, workloads
from bench.procs import REPO, http_status

BASELINE = "de47afe"  # the commit the round-2 CPU target is measured against
WORKTREE = "."  # the working tree, as it is, instead of a commit
READY_WITHIN_S = 600.0
DRAIN_WITHIN_S = 1800.0


@dataclass(frozen=True)
class Role:
    name: str
    module: str
    kind: str  # "stream" or "exchange"


ROLES = {
    "bridge": Role("stream bridge", "workers.stream_bridge", "stream"),
    "relay": Role("relay", "workers.exchange_relay", "exchange"),
}


@dataclass(frozen=True)
class Tree:
    """The code under test: a checkout and the interpreter of its own venv."""

    label: str  # what the user asked for: "." or a revision
    commit: str  # short id; "+dirty" when the working tree differs from it
    root: Path
    python: Path


# --- interpreters and checkouts ----------------------------------------------------------------


def find_python(explicit: str | None) -> Path:
    """A CPython 3.12+ (the perf trampoline): ``--python``, ``python3.12`` on PATH, or pyenv's."""
    candidates: list[str | None] = [explicit] if explicit else []
    candidates += [shutil.which(f"python3.{minor}") for minor in (12, 13)]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(str(pyenv / "versions/3.1[23].*/bin/python3.1[23]")))
    for candidate in candidates:
        if not candidate:
            continue
        done = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info >= (3, 12))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.stdout.strip() == "True":
            return Path(candidate)
    raise SystemExit(
        "the instructions mode needs CPython 3.12 or newer (its perf trampoline names Python "
        "functions for callgrind): pass --python PATH"
    )


def _git(*args: str, cwd: Path = REPO) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _sync(root: Path, venv: Path, python: Path) -> Path:
    """``uv sync --locked`` of ``root`` into ``venv`` with ``python``; the venv's interpreter."""
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv)}
    subprocess.run(
        ["uv", "sync", "--locked", "--all-extras", "--quiet", "--python", str(python)],
        cwd=root,
        env=env,
        check=True,
    )
    return venv / "bin" / "python"


@contextlib.contextmanager
def checkout(label: str, python: Path, scratch: Path) -> Iterator[Tree]:
    """The working tree (``.``) or a revision in a temporary git worktree, each with its venv."""
    if label == WORKTREE:
        commit = _git("rev-parse", "--short", "HEAD")
        if _git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"
        key = hashlib.sha1(f"{REPO}:{python}".encode()).hexdigest()[:10]
        venv = Path(tempfile.gettempdir()) / "message-proxy-bench" / f"venv-{key}"
        yield Tree(label, commit, REPO, _sync(REPO, venv, python))
        return
    commit = _git("rev-parse", "--short", label)
    root = scratch / f"tree-{commit}"
    _git("worktree", "add", "--detach", "--force", str(root), commit)
    try:
        yield Tree(label, commit, root, _sync(root, root / ".venv", python))
    finally:
        _git("worktree", "remove", "--force", str(root))


# --- the worker under callgrind ----------------------------------------------------------------


def _control(pid: int, *args: str) -> None:
    done = subprocess.run(
        ["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0 or "OK" not in done.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(args)} {pid}: {done.stdout}{done.stderr}")


def _metric(port: int, name: str) -> float:
    """The sum of a metric's samples (every label set) from the worker's ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def _unacked(queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) of a queue, from ``rabbitmqctl`` (no management API needed)."""
    done = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "--no-table-headers",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == queue:
            return int(parts[1]), int(parts[2])
    raise RuntimeError(f"queue {queue} not listed by rabbitmqctl")


async def _until(check: Callable[[], Any], what: str, within: float, alive: Callable[[], bool]):
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if not alive():
            raise RuntimeError(f"the worker exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {within:.0f}s")
        await asyncio.sleep(0.25)


def _dump_path(out: str, pid: int, number: int) -> Path:
    return Path(out.replace("%p", str(pid)) + f".{number}")


def _dump_complete(path: Path) -> bool:
    """A dump is complete once its last line (``totals:``) is written."""
    return path.exists() and b"\ntotals:" in path.read_bytes()[-200:]


async def _wait_dump(path: Path) -> None:
    for _ in range(600):
        if await asyncio.to_thread(_dump_complete, path):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"callgrind did not write {path}")


def _start(command: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPERFSUPPORT", None)
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=out)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(300)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(30)


def valgrind_command(out: str, *, attribute: bool) -> list[str]:
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--instr-atstart=no"]
    if attribute:
        command += [f"--fn-skip={pattern}" for pattern in callgrind.skip_patterns()]
    return command


async def measure(
    tree: Tree,
    role: Role,
    *,
    messages: int,
    warmup: int,
    attribute: bool,
    log_dir: Path,
) -> dict[str, Any]:
    """One drain of ``messages`` after ``warmup``, counted; with ``attribute``, split by stage."""
    queue, target = brokers.unique("q"), brokers.unique("s" if role.kind == "stream" else "x")
    output = brokers.unique("dest") if role.kind == "exchange" else ""
    await brokers.declare_queue(queue)
    if output:
        await brokers.declare_queue(output, exchange=target)
    port = workloads.free_port()
    config = log_dir / f"{queue}.toml"
    destination = workloads.stream_to(target) if output == "" else workloads.exchange_to(target)
    config.write_text(workloads.proxy_config(queue, [destination], port))
    out = str(log_dir / f"callgrind.{queue}.%p")
    command = [*valgrind_command(out, attribute=attribute), str(tree.python)]
    command += ["-X", "perf"] if attribute else []
    command += ["-m", role.module, "--config", str(config)]
    client = brokers.redis_client()

    async def written() -> int:
        if output:
            return await brokers.queue_depth(output)
        return int(await client.xlen(target))

    worker = _start(command, tree.root, log_dir / f"{queue}.log")
    alive = lambda: worker.poll() is None  # noqa: E731
    pid = worker.pid
    try:

        async def ready() -> bool:
            return await asyncio.to_thread(http_status, port, "/ready") == 200

        await _until(ready, "the worker's /ready", READY_WITHIN_S, alive)
        _control(pid, "--instr=on")
        await publisher.fill(queue, warmup, lanes=1)

        async def warmed() -> bool:
            acked = await asyncio.to_thread(_metric, port, "message_proxy_messages_acked_total")
            return await written() >= warmup and acked >= warmup

        await _until(warmed, "the warm-up", DRAIN_WITHIN_S, alive)
        batches_before = await asyncio.to_thread(_metric, port, "message_proxy_batch_size_count")
        _control(pid, "--dump")
        await _wait_dump(_dump_path(out, pid, 1))
        os.kill(pid, signal.SIGSTOP)
        try:
            await publisher.fill(queue, messages, lanes=1, first=warmup)
        finally:
            os.kill(pid, signal.SIGCONT)
        started = time.monotonic()

        async def drained() -> bool:
            if await written() < warmup + messages:
                return False
            return await asyncio.to_thread(_unacked, queue) == (0, 0)

        await _until(drained, "the drain", DRAIN_WITHIN_S, alive)
        seconds = time.monotonic() - started
        _control(pid, "--dump")
        dump = _dump_path(out, pid, 2)
        await _wait_dump(dump)
        batches = await asyncio.to_thread(_metric, port, "message_proxy_batch_size_count")
        count = await written()
    finally:
        await asyncio.to_thread(_stop, worker)
        await client.aclose()
        await brokers.delete_queue(queue, *([output] if output else []))
        if output:
            await brokers.delete_exchange(target)
        else:
            await brokers.delete_keys(target)
    perf_map = Path(f"/tmp/perf-{pid}.map")
    result: dict[str, Any] = {
        "role": role.name,
        "commit": tree.commit,
        "pass": "stages" if attribute else "plain",
        "messages": messages,
        "warmup": warmup,
        "written": count - warmup,
        "batches": batches - batches_before,
        "drain_s_under_valgrind": seconds,
        "log": str(log_dir / f"{queue}.log"),
    }
    kept = log_dir / perf_map.name if attribute else None
    result.update(await asyncio.to_thread(_count, dump, perf_map, kept, messages))
    return result


def _count(dump: Path, perf_map: Path, kept: Path | None, messages: int) -> dict[str, Any]:
    """The dump's instructions per message; with the perf map, by stage and by function.

    The perf map is moved next to the dump (``kept``); without ``kept`` it was not written.
    """
    graph = callgrind.parse(dump.read_text())
    result: dict[str, Any] = {"instructions": graph.total, "per_message": graph.total / messages}
    if kept is None:
        return result
    perf_map.rename(kept)
    profile = callgrind.python_profile(graph, callgrind.PerfMap.parse(kept.read_text()))
    stage_of = callgrind.stage_of(stages.RULES, stages.NATIVE)
    split = callgrind.by_stage(profile, stage_of, stages.OTHER)
    own = {callgrind.short(k): v / messages for k, v in profile.own.items()}
    unnamed = {
        callgrind.short(k): v / messages
        for k, v in profile.own.items()
        if stage_of(k) is None and callgrind.short(k).startswith("proxy/")
    }
    result["stages"] = {name: split.get(name, 0.0) / messages for name in stages.STAGES}
    result["top"] = callgrind.top(own, 25)
    result["unnamed_proxy"] = callgrind.top(unnamed, 8)
    return result


def _version(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip()


# --- the mode ----------------------------------------------------------------------------------


async def run(
    labels: list[str],
    roles: list[str],
    *,
    messages: int,
    warmup: int,
    repeat: int,
    passes: list[str],
    python: Path,
    log_dir: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Every pass of every role of every tree, ``repeat`` times; the raw results."""
    results: dict[str, Any] = {
        "messages": messages,
        "warmup": warmup,
        "python": _version([str(python), "-V"]),
        "valgrind": _version(["valgrind", "--version"]),
        "trees": [],
    }
    with tempfile.TemporaryDirectory(prefix="message-proxy-trees-") as scratch:
        for label in labels:
            with checkout(label, python, Path(scratch)) as tree:
                runs: list[dict[str, Any]] = []
                results["trees"].append({"label": label, "commit": tree.commit, "runs": runs})
                for role_key in roles:
                    for round_ in range(repeat):
                        for pass_ in passes:
                            say(
                                f"  {tree.commit} {ROLES[role_key].name}, {pass_} pass, "
                                f"run {round_ + 1}/{repeat} ..."
                            )
                            result = await measure(
                                tree,
                                ROLES[role_key],
                                messages=messages,
                                warmup=warmup,
                                attribute=pass_ == "stages",
                                log_dir=log_dir,
                            )
                            runs.append(result)
                            say("    " + summary_line(result))
    return results


def summary_line(result: dict[str, Any]) -> str:
    line = (
        f"{result['per_message']:,.0f} instructions per message over {result['messages']:,} "
        f"({result['batches']:.0f} batches, {result['drain_s_under_valgrind']:.0f} s under "
        "valgrind)"
    )
    if result["written"] != result["messages"]:
        line += f"  PROBLEM: {result['written']} written of {result['messages']}"
    return line


def main(argv: list[str]) -> int:
    from bench import instructions_report

    parser = argparse.ArgumentParser(prog="python -m bench instructions", description=__doc__)
    parser.add_argument(
        "--commit",
        action="append",
        default=None,
        help="a revision to measure, in a temporary worktree with its own venv; repeatable; "
        f"'{WORKTREE}' is the working tree (default: the working tree)",
    )
    parser.add_argument("--roles", default="bridge,relay", help="bridge, relay or both")
    parser.add_argument("--messages", type=int, default=5_000, help="the counted drain")
    parser.add_argument("--warmup", type=int, default=1_000, help="drained before counting")
    parser.add_argument("--repeat", type=int, default=1, help="measurements of each pass")
    parser.add_argument(
        "--passes", default="plain,stages", help="plain (the figure), stages (the split), or both"
    )
    parser.add_argument("--python", default=None, help="a CPython 3.12+ for the workers' venvs")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = parser.parse_args(argv)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    if set(roles) - set(ROLES) or set(passes) - {"plain", "stages"}:
        parser.error("--roles takes bridge,relay; --passes takes plain,stages")
    for tool in ("valgrind", "callgrind_control", "rabbitmqctl"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    log_dir = Path(tempfile.mkdtemp(prefix="message-proxy-instructions-"))
    print(f"logs, configs, callgrind dumps: {log_dir}", flush=True)
    results = asyncio.run(
        run(
            args.commit or [WORKTREE],
            roles,
            messages=args.messages,
            warmup=args.warmup,
            repeat=args.repeat,
            passes=passes,
            python=find_python(args.python),
            log_dir=log_dir,
            say=lambda line: print(line, flush=True),
        )
    )
    (args.json or log_dir / "instructions.json").write_text(json.dumps(results, indent=2))
    print()
    print(instructions_report.text(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
