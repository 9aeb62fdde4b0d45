"""The HEALTHCHECK probe: exit codes against real sockets, and proof it imports only the stdlib."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy.probe import main
from proxy.sidecar import Sidecar
from proxy.state import HealthState

REPO = Path(__file__).resolve().parent.parent
ALLOWED_OUTSIDE_STDLIB = {"proxy", "proxy.probe"}  # the package __init__ and the probe itself


@pytest.fixture
def sidecar() -> Iterator[Sidecar]:
    # a fresh state is alive (heartbeat just now) and not ready (nothing connected)
    server = Sidecar(host="127.0.0.1", port=0, state=HealthState(), registry=CollectorRegistry())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose backlog completes the handshake and then nothing ever answers."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


@contextlib.contextmanager
def answering(reply: bytes) -> Iterator[int]:
    """A one-shot server that reads the request and sends ``reply`` verbatim."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(2)
        listener.close()


def test_exit_0_when_health_answers_200(sidecar):
    assert main(["--port", str(sidecar.port)]) == 0


def test_exit_1_on_503(sidecar):
    assert main(["--port", str(sidecar.port), "--path", "/ready"]) == 1


def test_exit_1_on_404(sidecar):
    assert main(["--port", str(sidecar.port), "--path", "/nope"]) == 1


def test_exit_1_when_nothing_listens(closed_port, capsys):
    assert main(["--port", str(closed_port)]) == 1
    assert "ConnectionRefusedError" in capsys.readouterr().err


def test_exit_1_on_timeout_when_the_server_never_answers(silent_port):
    started = time.monotonic()
    assert main(["--port", str(silent_port), "--timeout", "0.3"]) == 1
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"garbage\r\n", id="garbage"),
        pytest.param(b"", id="closes-at-once"),
        pytest.param(b"HTTP/1.1 abc Weird\r\n\r\n", id="non-numeric-status"),
    ],
)
def test_exit_1_on_garbage(reply):
    with answering(reply) as port:
        assert main(["--port", str(port), "--timeout", "1"]) == 1


def test_exit_0_on_a_bare_200():
    with answering(b"HTTP/1.0 200 OK\r\n\r\n") as port:
        assert main(["--port", str(port), "--timeout", "1"]) == 0


def test_default_port_comes_from_the_environment(sidecar, monkeypatch):
    monkeypatch.setenv("MESSAGE_PROXY_HEALTH__PORT", str(sidecar.port))
    assert main([]) == 0


@pytest.mark.parametrize("argv", [["--port", "http"], ["--port", "70000"], ["--bogus"]])
def test_usage_errors_exit_1_never_2(argv, capsys):
    assert main(argv) == 1
    capsys.readouterr()


def imported_modules(*args: str) -> tuple[int, set[str]]:
    """Run a fresh interpreter with ``-X importtime``; its exit code and every module imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        cwd=REPO, capture_output=True, text=True, timeout=15, check=False,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "imported package" not in line
    }
    return result.returncode, modules


def test_the_probe_imports_only_the_standard_library(sidecar):
    _, startup = imported_modules("-c", "pass")  # site hooks of this venv are not the probe's
    code, modules = imported_modules("-m", "proxy.probe", "--port", str(sidecar.port))
    assert code == 0
    outside = {
        name
        for name in modules - startup
        if name.split(".")[0] not in sys.stdlib_module_names and name not in ALLOWED_OUTSIDE_STDLIB
    }
    assert not outside
    assert "prometheus_client" not in modules
