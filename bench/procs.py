"""Processes under test: start, sample memory and CPU every 50 ms, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import psutil  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parent.parent
SAMPLE_INTERVAL_S = 0.05


class Sampler(threading.Thread):
    """Peak RSS of a process (psutil, every 50 ms) and its CPU time on demand."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name=f"sampler-{pid}")
        self._process = psutil.Process(pid)
        self._halt = threading.Event()
        self.peak_rss = 0
        self.samples = 0

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                rss = self._process.memory_info().rss
            except psutil.Error:
                return
            self.peak_rss = max(self.peak_rss, rss)
            self.samples += 1
            self._halt.wait(SAMPLE_INTERVAL_S)

    def cpu_seconds(self) -> float:
        try:
            times = self._process.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


class Proc:
    """One program under test, as users run it: ``python -m <module> <args>``."""

    def __init__(
        self,
        module: str,
        args: Sequence[str],
        *,
        log_dir: Path,
        name: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = [sys.executable, "-m", module, *args]
        self.log_path = log_dir / f"{name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.sampler: Sampler | None = None
        self.started_at = 0.0

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            self.started_at = time.perf_counter()
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
            )
        self.sampler = Sampler(self.process.pid)
        self.sampler.start()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cpu_seconds(self) -> float:
        return self.sampler.cpu_seconds() if self.sampler else 0.0

    @property
    def peak_rss(self) -> int:
        return self.sampler.peak_rss if self.sampler else 0

    def stop(self, timeout: float = 30.0) -> int:
        if self.sampler is not None:
            self.sampler.stop()
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise

    def logs(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


def http_status(port: int, path: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def wait_ready(proc: Proc, port: int, *, within: float = 30.0, interval: float = 0.005) -> float:
    """Seconds from process start to the first ``/ready`` 200."""
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.command} exited:\n{proc.logs()}")
        if http_status(port, "/ready", timeout=0.5) == 200:
            return time.perf_counter() - proc.started_at
        time.sleep(interval)
    raise TimeoutError(f"{proc.command} not ready in {within}s:\n{proc.logs()}")


def broker_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by RabbitMQ (beam) and Redis, for per-message cost accounting.

    ``rabbitmq_dirty_cpu`` is the part spent on the Erlang VM's dirty CPU schedulers, which run
    the garbage collection of large process heaps (a queue holding a backlog).
    """
    totals = {"rabbitmq": 0.0, "redis": 0.0, "rabbitmq_dirty_cpu": 0.0}
    for process in psutil.process_iter(["name"]):
        name = process.info["name"] or ""
        key = "rabbitmq" if name.startswith("beam") else "redis" if "redis-server" in name else ""
        if not key:
            continue
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        totals[key] += times.user + times.system
        if key == "rabbitmq":
            totals["rabbitmq_dirty_cpu"] += _thread_seconds(process.pid, "_dirty_cpu_")
    return totals


def _thread_seconds(pid: int, name_part: str) -> float:
    """CPU seconds of a process's threads whose name contains ``name_part`` (Linux /proc)."""
    ticks = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            if name_part not in (task / "comm").read_text():
                continue
            # Fields after the parenthesised name: utime and stime are the 12th and 13th.
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended, or no /proc here
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")
