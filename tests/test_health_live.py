"""The sidecar of a live worker (a real ``python -m proxy run`` subprocess) under real faults.

Outages are simulated with ``TcpProxy`` between the worker and the broker, never by stopping the
brokers. Every wait polls against a deadline; the measured reaction times are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

from tests.helpers import (
    AMQP_URL,
    REDIS_URL,
    REPO,
    WorkerProcess,
    delete_keys,
    delete_queues,
    json_message,
    publish,
    redis_client,
    stream_length,
    stream_message_ids,
    unique,
    wait_for,
)
from tests.plugins_for_tests import BLOCK_HEADER
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.broker

READY_WITHIN_S = 2.0  # issue #4: readiness reflects a lost broker within 2 s
AMQP = urlsplit(AMQP_URL)
REDIS = urlsplit(REDIS_URL)


# --- building blocks ------------------------------------------------------------------------------


@dataclass
class Names:
    queue: str = field(default_factory=lambda: unique("hl-q"))
    stream: str = field(default_factory=lambda: unique("hl-s"))
    dead: str = field(default_factory=lambda: unique("hl-dl"))


@pytest.fixture
def names() -> Iterator[Names]:
    found = Names()
    yield found

    async def cleanup() -> None:
        await delete_queues(found.queue)
        await delete_keys(found.stream, found.dead)

    asyncio.run(cleanup())


def config(
    names: Names,
    *,
    amqp_url: str = AMQP_URL,
    redis_url: str = REDIS_URL,
    plugin: str | None = None,
    log_level: str = "INFO",
) -> str:
    match = f'match.plugin = "{plugin}"\n' if plugin else ""
    return f"""
log_level = "{log_level}"

[amqp]
url = "{amqp_url}"
prefetch = 100
connect_timeout = 2

[redis]
url = "{redis_url}"
timeout = 1

[batch]
max_messages = 50
max_delay_ms = 5

[[sources]]
queue = "{names.queue}"

[[routes]]
name = "all"
{match}to = [ {{ stream = "{names.stream}" }} ]

[dead_letter]
stream = "{names.dead}"
"""


def via(proxy: TcpProxy, url: str, userinfo: str | None = None) -> str:
    """``url`` pointed at the proxy's port, with ``userinfo`` ("user:password") when given."""
    parts = urlsplit(url)
    if userinfo is None:
        userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@" if userinfo else ""
    return parts._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}").geturl()


@contextlib.contextmanager
def tcp_proxy(url) -> Iterator[TcpProxy]:
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port).start()
    try:
        yield proxy
    finally:
        proxy.stop()
        # TcpProxy.stop() leaves its event loop open (a ResourceWarning, an error under pytest).
        if not proxy._loop.is_running():
            proxy._loop.close()


def ready(worker: WorkerProcess) -> tuple[int, dict[str, object]]:
    status, body = worker.get("/ready")
    return status, (json.loads(body) if body else {})


def ms_until(predicate: Callable[[], object], timeout: float, what: str) -> int:
    """Poll ``predicate`` every 10 ms; milliseconds until it held (TimeoutError past timeout)."""
    started = time.monotonic()
    wait_for(predicate, timeout, interval=0.01, what=what)
    return round((time.monotonic() - started) * 1000)


def report(text: str) -> None:
    print(f"\n[measured] {text}", file=sys.stderr)


def moves_a_message(worker: WorkerProcess, names: Names, message_id: str) -> None:
    """Publish one message and wait for it in the stream. At least once: a write that timed out
    in a stalled connection may still land when the stall ends, next to its retry."""
    asyncio.run(
        publish([json_message({"id": message_id}, message_id=message_id)], routing_key=names.queue)
    )
    wait_for(
        lambda: message_id in asyncio.run(stream_message_ids(names.stream)),
        10,
        what=f"{message_id} in {names.stream}; logs:\n{worker.logs()}",
    )


def probe(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.probe", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=REPO,
    )


# --- readiness ------------------------------------------------------------------------------------


def test_readiness_follows_rabbitmq_through_a_cut(tmp_path, names):
    with (
        tcp_proxy(AMQP) as amqp,
        WorkerProcess(config(names, amqp_url=via(amqp, AMQP_URL)), tmp_path) as worker,
    ):
        node = f"127.0.0.1:{amqp.port}"  # host:port of the one node, never credentials
        assert ready(worker) == (200, {"status": "ready", "nodes": {"amqp": node}})
        moves_a_message(worker, names, "before-cut")

        amqp.cut()
        took = ms_until(lambda: ready(worker)[0] == 503, READY_WITHIN_S, "not ready after cut")
        status, body = ready(worker)
        assert status == 503 and body["status"] == "not-ready"
        assert set(body["down"]) >= {"amqp", "consumer"}, body
        assert body["down"]["amqp"].startswith(f"{node}: "), body
        assert "redis" not in body["down"], body
        assert worker.get("/health")[0] == 200  # a lost broker is not a dead process
        report(f"readiness false {took} ms after the RabbitMQ cut: {body['down']}")

        amqp.heal()
        back = ms_until(lambda: ready(worker)[0] == 200, 15, "ready after heal")
        report(f"ready again {back} ms after healing RabbitMQ")
        moves_a_message(worker, names, "after-cut")
        assert 'message_proxy_reconnects_total{broker="amqp"}' in worker.metrics()


@pytest.mark.slow
def test_readiness_follows_redis_through_a_cut_and_a_blackhole(tmp_path, names):
    with (
        tcp_proxy(REDIS) as redis,
        WorkerProcess(config(names, redis_url=via(redis, REDIS_URL)), tmp_path) as worker,
    ):
        moves_a_message(worker, names, "before")
        for fault in ("cut", "blackhole"):
            getattr(redis, fault)()
            took = ms_until(
                lambda: ready(worker)[0] == 503, READY_WITHIN_S, f"not ready after {fault}"
            )
            status, body = ready(worker)
            assert status == 503 and set(body["down"]) == {"redis"}, body
            assert 'message_proxy_broker_up{broker="redis"} 0.0' in worker.metrics()
            report(f"readiness false {took} ms after the Redis {fault}: {body['down']}")

            redis.heal()
            back = ms_until(lambda: ready(worker)[0] == 200, 10, f"ready after {fault} healed")
            report(f"ready again {back} ms after healing the Redis {fault}")
            assert 'message_proxy_broker_up{broker="redis"} 1.0' in worker.metrics()
            moves_a_message(worker, names, f"after-{fault}")


class ReadyRecorder:
    """Polls ``/ready`` on a thread so that a short not-ready window cannot slip between polls."""

    def __init__(self, worker: WorkerProcess) -> None:
        self._worker = worker
        self._stop = threading.Event()
        self.seen: list[tuple[float, int, dict[str, object]]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body = ready(self._worker)
            self.seen.append((time.monotonic(), status, body))
            self._stop.wait(0.005)

    def __enter__(self) -> ReadyRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_readiness_false_while_the_broker_cancels_the_consumer(tmp_path, names):
    with WorkerProcess(config(names), tmp_path) as worker:
        moves_a_message(worker, names, "before-delete")
        with ReadyRecorder(worker) as recorder:
            deleted_at = time.monotonic()
            asyncio.run(delete_queues(names.queue))  # the broker cancels the worker's consumer
            wait_for(
                lambda: any(s == 503 for _, s, _ in recorder.seen),
                READY_WITHIN_S,
                interval=0.005,
                what="not ready after the queue was deleted",
            )
            wait_for(lambda: recorder.seen[-1][1] == 200, 10, what=f"ready again; {worker.logs()}")
        not_ready = [(t, body) for t, s, body in recorder.seen if s == 503]
        first, last = not_ready[0][0], not_ready[-1][0]
        assert all("consumer" in body["down"] for _, body in not_ready), not_ready  # type: ignore[operator]
        report(
            f"readiness false {round((first - deleted_at) * 1000)} ms after the source queue was "
            f"deleted, for {round((last - first) * 1000)} ms: {not_ready[0][1]['down']}"
        )
        # The worker declared the queue again and consumes from it.
        moves_a_message(worker, names, "after-delete")


# --- liveness and the probe -----------------------------------------------------------------------


@pytest.mark.slow
def test_liveness_and_probe_follow_a_blocked_event_loop(tmp_path, names):
    plugin = "tests.plugins_for_tests:sleep_when_asked"
    worker = WorkerProcess(config(names, plugin=plugin), tmp_path, env={"PYTHONPATH": str(REPO)})
    with worker:
        port = worker.health_port
        assert probe(port).returncode == 0
        assert worker.get("/health") == (200, b'{"status":"ok"}')

        blocked = json_message({"id": "blocker"}, message_id="blocker", headers={BLOCK_HEADER: "7"})
        asyncio.run(publish([blocked], routing_key=names.queue))
        published_at = time.monotonic()

        took = ms_until(lambda: worker.get("/health")[0] == 503, 7, "liveness 503 while blocked")
        # The sidecar runs on its own thread: it answers at once while the loop is stuck.
        started = time.monotonic()
        status, body = worker.get("/health")
        answered_in = time.monotonic() - started
        assert status == 503, body
        stalled = json.loads(body)
        assert stalled["status"] == "stalled" and stalled["heartbeat_age_s"] >= 5, stalled
        assert answered_in < 0.5
        result = probe(port)
        assert result.returncode == 1, result
        assert "HTTP 503" in result.stderr
        report(f"liveness 503 {took} ms after publishing a message that blocks the loop for 7 s")

        ms_until(lambda: worker.get("/health")[0] == 200, 6, "liveness 200 after the block")
        since_publish = round((time.monotonic() - published_at) * 1000)
        report(f"liveness 200 again {since_publish} ms after publishing the blocking message")
        assert probe(port).returncode == 0
        wait_for(lambda: asyncio.run(stream_length(names.stream)) == 1, 10, what="blocker landed")
        moves_a_message(worker, names, "after-block")

        assert worker.stop() == 0
    result = probe(port)
    assert result.returncode == 1
    assert "refused" in result.stderr.lower() or "Errno" in result.stderr


# --- hostile clients ------------------------------------------------------------------------------


def raw_exchange(port: int, payload: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``payload``, half-close, return whatever the server answered (b"" on a reset)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return received


def status_of(response: bytes) -> int:
    parts = response.split(b"\r\n", 1)[0].split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@pytest.mark.slow
def test_hostile_clients_neither_crash_nor_block_the_worker(tmp_path, names):
    with WorkerProcess(config(names), tmp_path) as worker:
        port = worker.health_port

        assert status_of(raw_exchange(port, b"\x00\xff\x16\x03\x01garbage\r\n\r\n")) == 400
        assert status_of(raw_exchange(port, bytes(range(256)) * 64)) in (0, 400, 414)
        huge = b"GET /" + b"a" * (1024 * 1024) + b" HTTP/1.1\r\n\r\n"
        assert status_of(raw_exchange(port, huge)) in (0, 414)
        assert status_of(raw_exchange(port, b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 5000)) in (
            0,
            431,
        )
        assert status_of(raw_exchange(port, b"DELETE /ready HTTP/1.1\r\n\r\n")) == 405

        # 200 connections at once: half send nothing, half stop halfway through their head.
        flood: list[socket.socket] = []
        try:
            for i in range(200):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                if i % 2:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                flood.append(sock)
            started = time.monotonic()
            assert worker.get("/health")[0] == 200
            assert worker.get("/ready")[0] == 200
            report(
                f"/health and /ready answered in {round((time.monotonic() - started) * 1000)} ms "
                "with 200 hostile connections open"
            )
            moves_a_message(worker, names, "during-flood")
        finally:
            for sock in flood:
                sock.close()

        # 200 complete requests at once, read only after all were sent.
        answers: list[int] = []
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(200)]
        for sock in socks:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        for sock in socks:
            try:
                answers.append(status_of(sock.recv(64)))
            except OSError:
                answers.append(0)
            finally:
                sock.close()
        assert answers.count(200) > 0 and set(answers) <= {0, 200}

        assert worker.process is not None and worker.process.poll() is None
        assert worker.get("/health") == (200, b'{"status":"ok"}')
        moves_a_message(worker, names, "after-flood")
        assert "Traceback" not in worker.logs()


# --- logs -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def rabbitmq_user(user: str, password: str) -> Iterator[bool]:
    """A RabbitMQ user made with rabbitmqctl for this test; yields False when that is impossible."""
    ctl = shutil.which("rabbitmqctl")

    def run(*args: str) -> bool:
        if ctl is None:
            return False
        result = subprocess.run([ctl, *args], capture_output=True, timeout=60)
        return result.returncode == 0

    made = run("add_user", user, password) and run(
        "set_permissions", "-p", "/", user, ".*", ".*", ".*"
    )
    try:
        yield made
    finally:
        if made or ctl is not None:
            run("delete_user", user)


@contextlib.contextmanager
def redis_user(user: str, password: str) -> Iterator[None]:
    async def call(*args: str) -> None:
        client = redis_client()
        try:
            await client.execute_command(*args)
        finally:
            await client.aclose()

    asyncio.run(call("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all"))
    try:
        yield
    finally:
        asyncio.run(call("ACL", "DELUSER", user))


@pytest.mark.slow
def test_logs_are_json_lines_and_never_show_a_password(tmp_path, names):
    user = unique("mp-user")
    secret = f"Pw-{unique('secret')}-Zq"
    with contextlib.ExitStack() as stack:
        made = stack.enter_context(rabbitmq_user(user, secret))
        stack.enter_context(redis_user(user, secret))
        amqp = stack.enter_context(tcp_proxy(AMQP))
        redis = stack.enter_context(tcp_proxy(REDIS))
        amqp_userinfo = f"{user}:{secret}" if made else None  # else guest:guest, checked below
        amqp_url = via(amqp, AMQP_URL, amqp_userinfo)
        redis_url = via(redis, REDIS_URL, f"{user}:{secret}")
        text = config(names, amqp_url=amqp_url, redis_url=redis_url, log_level="DEBUG")
        worker = stack.enter_context(WorkerProcess(text, tmp_path))

        moves_a_message(worker, names, "with-secret")
        views = [worker.metrics(), json.dumps(ready(worker)[1])]
        # Both brokers down: the reconnect and ping-failure paths log their URLs and errors.
        amqp.cut()
        redis.cut()
        wait_for(
            lambda: {"amqp", "redis"} <= set(ready(worker)[1].get("down", {})),  # type: ignore[arg-type]
            READY_WITHIN_S,
            what="both brokers reported down",
        )
        wait_for(lambda: worker.logs().count("lost or refused") >= 2, 10, what="reconnect attempts")
        views += [worker.metrics(), json.dumps(ready(worker)[1]), worker.get("/health")[1].decode()]
        amqp.heal()
        redis.heal()
        wait_for(lambda: ready(worker)[0] == 200, 15, what="ready again")
        assert worker.stop() == 0
        logs = worker.logs()

    lines = logs.splitlines()
    assert len(lines) > 10
    for line in lines:
        entry = json.loads(line)  # every line, stdout and stderr alike, is one JSON object
        assert {"ts", "level", "logger", "message"} <= set(entry), line
    levels = {json.loads(line)["level"] for line in lines}
    assert "DEBUG" in levels and "WARNING" in levels  # log_level = "DEBUG" took effect

    secrets = [secret] if made else [amqp_url]
    for where, text in [("logs", logs), *((f"view {i}", v) for i, v in enumerate(views))]:
        for forbidden in secrets:
            assert forbidden not in text, f"{forbidden!r} leaked into {where}"
    masked_user = user if made else "guest"
    assert f"{masked_user}:***@127.0.0.1:{amqp.port}" in logs
