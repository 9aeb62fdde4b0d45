"""What every test server shares: free ports, one folder per session, a reaper, bounded waits."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.servers.reaper import PIDS_FILE


class ServerStartError(RuntimeError):
    """A server could not be started here (binary missing, port taken, timed out)."""


def free_ports(count: int) -> list[int]:
    """Ports free right now, distinct; bound together so the kernel cannot hand one out twice."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def need_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerStartError(f"{name} is not installed")
    return path


def wait_until(check: Callable[[], Any], within: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + within
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise ServerStartError(f"{what}: not within {within:.0f} s" + (f" ({last})" if last else ""))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


class Workspace:
    """One temporary folder for a session's servers; the processes it started are written down so
    that the reaper can end them if this process dies without ``close``."""

    def __init__(self, prefix: str = "mp-servers-") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self._groups: list[int] = []
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "tests.servers.reaper", str(self.root), str(os.getpid())],
            cwd=Path(__file__).resolve().parents[2],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the terminal must not kill it before cleanup
        )

    def folder(self, name: str) -> Path:
        """An empty folder: a server started again after a failed attempt must not find the
        state of the last one (a Redis Cluster node would rejoin with its old node id)."""
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def spawn(
        self, args: Sequence[str], *, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A server in its own process group (so it and its children end together)."""
        with log.open("ab") as out:
            process = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._groups.append(process.pid)
        with (self.root / PIDS_FILE).open("a") as pids:
            pids.write(f"{process.pid}\n")
        return process

    def close(self) -> None:
        for group in self._groups:
            kill_group(group)
        self._groups.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            self._reaper.terminate()
            self._reaper.wait(5)


def kill_group(group: int, signum: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)
