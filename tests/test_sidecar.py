"""The sidecar against a real server thread on a free port, with a clock the test controls."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics
from proxy.sidecar import IO_TIMEOUT_S, Sidecar
from proxy.state import HealthState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> HealthState:
    return HealthState(clock=clock)


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Metrics(registry, role="stream-bridge", version="1.2.3")
    return registry


@pytest.fixture
def sidecar(state, registry, clock):
    server = Sidecar(host="127.0.0.1", port=0, state=state, registry=registry, clock=clock)
    server.start()
    yield server
    server.stop()


def request(server: Sidecar, path: str, method: str = "GET"):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def get_json(server: Sidecar, path: str) -> tuple[int, object]:
    status, headers, body = request(server, path)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


def raw_exchange(server: Sidecar, payload: bytes) -> bytes:
    """Send raw bytes, then read until the server closes; a reset ends the read too."""
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
        try:
            sock.sendall(payload)
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def assert_still_serving(server: Sidecar) -> None:
    started = time.monotonic()
    status, body = get_json(server, "/health")
    assert (status, body) == (200, {"status": "ok"})
    assert time.monotonic() - started < 1.0
    assert server._thread is not None and server._thread.is_alive()


def test_health_turns_503_when_the_heartbeat_ages_past_5_s(sidecar, state, clock):
    assert get_json(sidecar, "/health") == (200, {"status": "ok"})
    clock.now += 4.9
    assert get_json(sidecar, "/health") == (200, {"status": "ok"})
    clock.now += 0.25
    assert get_json(sidecar, "/health") == (503, {"status": "stalled", "heartbeat_age_s": 5.15})
    state.beat()
    assert get_json(sidecar, "/health") == (200, {"status": "ok"})


def test_ready_names_what_is_down(sidecar, state):
    assert get_json(sidecar, "/ready") == (
        503, {"status": "not-ready", "down": {"amqp": "not connected yet"}}
    )
    state.set_broker("amqp", True)
    state.set_broker("redis", True)
    assert get_json(sidecar, "/ready") == (200, {"status": "ready"})

    state.set_broker("redis", False, "connection refused")
    state.expect_consumers(2)
    state.set_consumers(1)
    assert get_json(sidecar, "/ready") == (
        503,
        {
            "status": "not-ready",
            "down": {"redis": "connection refused", "consumer": "1 of 2 queues consumed"},
        },
    )

    state.set_broker("redis", True)
    state.set_consumers(2)
    assert get_json(sidecar, "/ready") == (200, {"status": "ready"})

    state.stopping()
    assert get_json(sidecar, "/ready") == (
        503, {"status": "not-ready", "down": {"worker": "shutting down"}}
    )


def test_ready_says_which_node_each_amqp_connection_is_on(sidecar, state):
    state.set_broker("amqp", True, node="rabbit-2:5672")
    state.set_broker("amqp_out", True, node="[::1]:5673")
    state.set_broker("redis", True)
    assert get_json(sidecar, "/ready") == (
        200, {"status": "ready", "nodes": {"amqp": "rabbit-2:5672", "amqp_out": "[::1]:5673"}}
    )
    state.set_broker("amqp", False, "rabbit-2:5672: connection lost", node="rabbit-2:5672")
    assert get_json(sidecar, "/ready") == (
        503,
        {
            "status": "not-ready",
            "down": {"amqp": "rabbit-2:5672: connection lost"},
            "nodes": {"amqp_out": "[::1]:5673"},
        },
    )


def test_metrics_are_prometheus_text(sidecar):
    status, headers, body = request(sidecar, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    (sample,) = families["message_proxy_build_info"].samples
    assert sample.labels == {"version": "1.2.3", "role": "stream-bridge"}
    assert sample.value == 1


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        pytest.param("GET", "/nope", 404, id="unknown-path"),
        pytest.param("GET", "/", 404, id="root"),
        pytest.param("POST", "/health", 405, id="post"),
        pytest.param("DELETE", "/metrics", 405, id="delete"),
        pytest.param("GET", "/health?verbose=1", 200, id="query-string-ignored"),
    ],
)
def test_status_codes(sidecar, method, path, status):
    got, headers, _body = request(sidecar, path, method)
    assert got == status
    if status == 405:
        assert headers["Allow"] == "GET, HEAD"


def test_head_has_headers_and_no_body(sidecar):
    response = raw_exchange(sidecar, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Length: 15" in head
    assert body == b""


def test_a_failing_endpoint_answers_500_and_the_server_goes_on(state, clock):
    class Broken:
        def collect(self):
            raise RuntimeError("boom")

    registry = CollectorRegistry()
    registry.register(Broken())  # type: ignore[arg-type]
    server = Sidecar(host="127.0.0.1", port=0, state=state, registry=registry, clock=clock)
    server.start()
    try:
        assert request(server, "/metrics")[0] == 500
        assert_still_serving(server)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x00\xff\xfe\x80 garbage\r\n\r\n", id="binary"),
        pytest.param(b"GET\r\n\r\n", id="short-request-line"),
        pytest.param(b"GET /health HTTP/2.0\r\n\r\n", id="wrong-protocol"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="h2-preface"),
    ],
)
def test_garbage_gets_400(sidecar, payload):
    assert raw_exchange(sidecar, payload).startswith(b"HTTP/1.1 400 ")
    assert_still_serving(sidecar)


def test_a_1_mb_request_line_gets_414_and_the_connection_closes(sidecar):
    payload = b"GET /" + b"a" * (1024 * 1024) + b" HTTP/1.1\r\n\r\n"
    assert raw_exchange(sidecar, payload).startswith(b"HTTP/1.1 414 ")
    assert_still_serving(sidecar)


def test_an_endless_head_gets_431(sidecar):
    payload = b"GET /health HTTP/1.1\r\n" + b"X-Pad: aaaaaaaaaaaaaaaa\r\n" * 2000
    assert raw_exchange(sidecar, payload).startswith(b"HTTP/1.1 431 ")
    assert_still_serving(sidecar)


def test_a_client_that_stops_sending_is_cut_off(sidecar):
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=IO_TIMEOUT_S + 2) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        started = time.monotonic()
        assert sock.recv(1024) == b""
        assert time.monotonic() - started < IO_TIMEOUT_S + 1
    assert_still_serving(sidecar)


def test_200_idle_connections_do_not_lock_out_health(sidecar):
    idle = [socket.create_connection(("127.0.0.1", sidecar.port), timeout=2) for _ in range(200)]
    try:
        assert_still_serving(sidecar)
    finally:
        for sock in idle:
            sock.close()
    assert_still_serving(sidecar)


def test_a_taken_port_raises_oserror(state, registry, sidecar):
    other = Sidecar(host="127.0.0.1", port=sidecar.port, state=state, registry=registry)
    with pytest.raises(OSError):
        other.start()
    other.stop()


def test_stop_closes_the_port_and_is_idempotent(state, registry):
    server = Sidecar(host="127.0.0.1", port=0, state=state, registry=registry)
    server.stop()  # never started: nothing to do
    server.start()
    port = server.port
    server.stop()
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
