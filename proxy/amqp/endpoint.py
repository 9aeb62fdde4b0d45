"""Where and how to reach a broker: the ``amqp://`` or ``amqps://`` URL read into an
``Endpoint`` (TLS context included), and the options every broker socket gets."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

KEEPALIVE_PROBES = 3  # unanswered probes before the kernel gives the socket up


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect, from an ``amqp://`` or ``amqps://`` URL (aiormq's query keys:
    ``cafile``, ``capath``, ``certfile``, ``keyfile``, ``no_verify_ssl``; and ``server_name``, the
    name the broker's certificate must carry, sent as SNI, when it is not the host connected to)."""

    host: str
    port: int
    vhost: str
    username: str
    password: str = field(repr=False)
    heartbeat: int
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    server_name: str | None = None

    @property
    def address(self) -> str:
        """``host:port``: which node this is, safe to show anywhere (no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def from_url(cls, url: str, *, heartbeat: int) -> Endpoint:
        parts = urlsplit(url)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        secure = parts.scheme == "amqps"
        path = unquote(parts.path[1:]) if parts.path not in ("", "/") else "/"
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (5671 if secure else 5672),
            vhost=path,
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            heartbeat=int(query.get("heartbeat", heartbeat)),
            tls=_tls_context(query) if secure else None,
            server_name=query.get("server_name") or None,
        )


def _tls_context(query: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=query.get("cafile"), capath=query.get("capath")
    )
    if query.get("certfile"):
        context.load_cert_chain(query["certfile"], query.get("keyfile"))
    if query.get("no_verify_ssl", "0") != "0":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def keep_alive(sock: socket.socket, heartbeat: int) -> None:
    """TCP keepalive on the broker socket: probes after ``heartbeat`` idle seconds, three of them.

    Heartbeats find a silent broker once the handshake has negotiated them; keepalive covers the
    socket before that, and any stretch in which this side sends nothing.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    interval = max(1, heartbeat)
    for option, value in (
        ("TCP_KEEPIDLE", interval),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        if hasattr(socket, option):  # Linux; macOS names some differently
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
