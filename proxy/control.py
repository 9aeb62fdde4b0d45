"""Reaching a running worker from outside: its pid file, and ``message-proxy reload``.

``reload`` sends SIGHUP, exactly what ``kill -HUP PID`` does, and then reads the result where the
worker publishes it: ``message_proxy_config_reloads_total`` on its sidecar's ``/metrics``. The
worker is never asked anything else; the sidecar only reads what the worker recorded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config
from proxy.errors import ConfigError

RELOADS = "message_proxy_config_reloads"
POLL_INTERVAL_S = 0.1
# What the sidecar listens on, as a client reaches it from the same machine.
_LOCAL = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


# --- the pid file (written by the worker) ----------------------------------------------------


def write_pid_file(path: str) -> None:
    """Write this process's id to ``path`` (through a temporary file: a reader never sees half)."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    partial.write_text(f"{os.getpid()}\n")
    partial.replace(target)


def remove_pid_file(path: str) -> None:
    """Remove ``path`` if it still names this process (another worker may have taken it)."""
    with contextlib.suppress(OSError, ValueError):
        if int(Path(path).read_text().strip()) == os.getpid():
            Path(path).unlink()


def read_pid_file(path: str) -> int:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError("--pid-file", f"cannot read {path}: {exc.strerror}") from None
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError("--pid-file", f"{path} does not hold a process id")
    return int(text)


# --- message-proxy reload --------------------------------------------------------------------


def reload_counts(config: Config, timeout: float = 2.0) -> dict[str, float] | str:
    """The worker's reload counter by result, or why its sidecar could not be read."""
    host = _LOCAL.get(config.health.host, config.health.host)
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{config.health.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == RELOADS:
            for sample in family.samples:
                if sample.name == f"{RELOADS}_total":
                    counts[sample.labels.get("result", "")] = sample.value
    return counts


def _result(before: Mapping[str, float], after: Mapping[str, float]) -> str | None:
    for result, count in after.items():
        if count > before.get(result, 0.0):
            return result
    return None


def send_reload(pid: int, config: Config | None, *, wait: float | None) -> int:
    """SIGHUP to ``pid``; with ``wait`` (seconds) and a config, wait for the worker's result.

    Exit code: 0 applied or unchanged (or sent, when not waiting), 1 rejected, no such process,
    or no result within ``wait``.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        print(f"message-proxy: no process {pid} (a stale pid file?)", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"message-proxy: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    before = reload_counts(config) if config is not None and wait else None
    os.kill(pid, signal.SIGHUP)
    if before is None:
        print(f"SIGHUP sent to {pid}; the worker logs the result")
        return 0
    if isinstance(before, str):
        print(f"SIGHUP sent to {pid}; the result is in the worker's log (its sidecar: {before})")
        return 0
    deadline = time.monotonic() + (wait or 0.0)
    while time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        after = reload_counts(config) if config is not None else {}
        result = _result(before, after) if isinstance(after, dict) else None
        if result == "rejected":
            print(
                f"reload rejected by {pid}: it keeps the running config; its log names every "
                "problem",
                file=sys.stderr,
            )
            return 1
        if result is not None:
            print(f"reload {result}: {pid}")
            return 0
    print(f"SIGHUP sent to {pid}; no result within {wait:g}s: see its log", file=sys.stderr)
    return 1
