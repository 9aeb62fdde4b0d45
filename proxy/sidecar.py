"""The HTTP sidecar: ``/health``, ``/ready`` and ``/metrics`` on one daemon thread.

It only reads ``HealthState.snapshot()`` and the metrics registry; it never calls into the event
loop. One selector loop serves every connection, so an idle or hostile client costs a file
descriptor, never a thread:

- a connection has ``IO_TIMEOUT_S`` in total to send its request head (slow senders are cut off);
- the request line and head are capped (414 / 431), anything unparsable gets 400;
- past ``MAX_CONNECTIONS`` the oldest connection is dropped, so a flood cannot lock the probe out;
- every response closes the connection; unread request bytes are drained for a moment first, so
  the client reads the status instead of a TCP reset.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.state import HealthState

log = logging.getLogger(__name__)

IO_TIMEOUT_S = 2.0
LINGER_S = 1.0
STOP_TIMEOUT_S = 5.0
MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD = 16 * 1024
MAX_CONNECTIONS = 128
ACCEPTS_PER_WAKEUP = 64

_JSON = "application/json"
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

Reply = tuple[int, str, bytes]  # status, content type, body


def _json(status: int, body: object) -> Reply:
    return status, _JSON, json.dumps(body, separators=(",", ":")).encode()


def _render(method: str, reply: Reply) -> bytes:
    status, content_type, body = reply
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        head.append("Allow: GET, HEAD")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    return raw if method == "HEAD" else raw + body


@dataclass(eq=False, slots=True)
class _Conn:
    sock: socket.socket
    deadline: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: memoryview | None = None  # the rendered response, once there is one
    lingering: bool = False  # response sent and write side shut; draining until EOF


class Sidecar:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        state: HealthState,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._address = (host, port)
        self._state = state
        self._registry = registry
        self._clock = clock
        self._routes: dict[str, Callable[[], Reply]] = {
            "/health": self._health,
            "/ready": self._ready,
            "/metrics": self._metrics,
        }
        self._bound_port: int | None = None
        self._loop: _Loop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the sidecar was already started")
        host = self._address[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server(self._address, family=family, backlog=128)
        self._bound_port = listener.getsockname()[1]
        self._loop = _Loop(listener, self._respond)
        self._thread = threading.Thread(target=self._loop.run, name="proxy-sidecar", daemon=True)
        self._thread.start()
        log.info("health sidecar listening on %s:%d", host, self._bound_port)

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("the sidecar is not started")
        return self._bound_port

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.request_stop()
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            log.warning("health sidecar did not stop within %.0f s", STOP_TIMEOUT_S)
        else:
            loop.close()

    # The endpoints, called on the sidecar thread

    def _health(self) -> Reply:
        snapshot = self._state.snapshot()
        now = self._clock()
        if snapshot.is_alive(now):
            return _json(200, {"status": "ok"})
        age = round(now - snapshot.heartbeat_at, 3)
        return _json(503, {"status": "stalled", "heartbeat_age_s": age})

    def _ready(self) -> Reply:
        snapshot = self._state.snapshot()
        down = snapshot.problems()
        body: dict[str, object] = (
            {"status": "ready"} if not down else {"status": "not-ready", "down": down}
        )
        if nodes := snapshot.nodes():  # which node each AMQP connection is on: host:port only
            body["nodes"] = nodes
        return _json(200 if not down else 503, body)

    def _metrics(self) -> Reply:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)

    def _respond(self, head: bytes) -> bytes:
        try:
            method, target, version = head.split(b"\n", 1)[0].decode("ascii").split()
        except (UnicodeDecodeError, ValueError):
            return _render("GET", _json(400, {"error": "bad request line"}))
        if not version.startswith("HTTP/1."):
            return _render("GET", _json(400, {"error": "unsupported protocol"}))
        route = self._routes.get(target.split("?", 1)[0])
        if route is None:
            reply = _json(404, {"error": "not found"})
        elif method not in ("GET", "HEAD"):
            reply = _json(405, {"error": "method not allowed"})
        else:
            try:
                reply = route()
            except Exception as exc:
                log.warning("health sidecar: %s failed: %r", target, exc)
                log.debug("health sidecar failure", exc_info=True)
                reply = _json(500, {"error": "internal error"})
        log.debug("%s %s -> %d", method, target, reply[0])
        return _render(method, reply)


class _Loop:
    """The selector loop behind a listening socket; all but the stop calls run on its thread.

    ``respond`` turns a complete request head into a complete response.
    """

    def __init__(self, listener: socket.socket, respond: Callable[[bytes], bytes]) -> None:
        self._listener = listener
        self._respond = respond
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._conns: dict[socket.socket, _Conn] = {}  # insertion order: oldest first
        for sock in (listener, self._wake_r):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)

    def request_stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def close(self) -> None:
        """Release the wake-up pair; only after ``run`` has returned."""
        self._wake_r.close()
        self._wake_w.close()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._step()
                except Exception:  # a bug here must not end the thread
                    log.exception("health sidecar loop error")
                    self._stopping.wait(0.1)
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._selector.close()
            self._listener.close()

    def _step(self) -> None:
        now = time.monotonic()
        next_deadline = min((c.deadline for c in self._conns.values()), default=now + 1.0)
        for key, _events in self._selector.select(max(0.0, min(next_deadline - now, 1.0))):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)
            else:
                self._service(key.data)
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self._close(conn)

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("health sidecar accept failed: %r", exc)
                if exc.errno in _OUT_OF_FDS:
                    if self._conns:
                        self._evict_oldest()
                    else:  # the rest of the process holds the fds: don't spin on the listener
                        self._stopping.wait(0.05)
                return
            sock.setblocking(False)
            if len(self._conns) >= MAX_CONNECTIONS:
                self._evict_oldest()
            conn = _Conn(sock, deadline=time.monotonic() + IO_TIMEOUT_S)
            self._conns[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _service(self, conn: _Conn) -> None:
        try:
            if conn.lingering:
                if not conn.sock.recv(65536):
                    self._close(conn)
            elif conn.outbox is not None:
                self._flush(conn)
            else:
                self._read(conn)
        except BlockingIOError:
            pass
        except OSError:
            self._close(conn)

    def _read(self, conn: _Conn) -> None:
        data = conn.sock.recv(4096)
        if not data:
            self._close(conn)
            return
        conn.inbox += data
        line_end = conn.inbox.find(b"\n")
        if line_end > MAX_REQUEST_LINE or (line_end < 0 and len(conn.inbox) > MAX_REQUEST_LINE):
            response = _render("GET", _json(414, {"error": "request line too long"}))
        elif line_end < 0:
            return
        elif (head_end := _HEAD_END.search(conn.inbox)) is not None:
            response = self._respond(bytes(conn.inbox[: head_end.start()]))
        elif len(conn.inbox) > MAX_HEAD:
            response = _render("GET", _json(431, {"error": "request head too large"}))
        else:
            return
        conn.inbox.clear()
        conn.outbox = memoryview(response)
        conn.deadline = time.monotonic() + IO_TIMEOUT_S
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        if conn.outbox is None:
            return
        try:
            sent = conn.sock.send(conn.outbox)
        except BlockingIOError:
            sent = 0
        conn.outbox = conn.outbox[sent:]
        if conn.outbox:
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return
        conn.sock.shutdown(socket.SHUT_WR)
        conn.lingering = True
        conn.deadline = time.monotonic() + LINGER_S
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _evict_oldest(self) -> None:
        oldest = next(iter(self._conns.values()), None)
        if oldest is not None:
            self._close(oldest)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
