"""The Docker HEALTHCHECK: ``python -m proxy.probe`` asks the sidecar once; exits 0 on 200, else 1.

Standard library only, and nothing else from ``proxy``: it starts a fresh interpreter every few
seconds and must keep working when a dependency is broken.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

MAX_STATUS_LINE = 4096


def http_status(host: str, port: int, path: str, timeout: float) -> int:
    """One GET; the response's status code. Raises OSError (incl. timeouts) or ValueError."""
    deadline = time.monotonic() + timeout
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "User-Agent: message-proxy-probe\r\nConnection: close\r\n\r\n"
    )
    received = b""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request.encode("ascii"))
        while b"\n" not in received and len(received) < MAX_STATUS_LINE:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no status line in time")
            sock.settimeout(remaining)
            chunk = sock.recv(MAX_STATUS_LINE)
            if not chunk:
                break
            received += chunk
    parts = received.split(b"\n", 1)[0].split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {received[:80]!r}")
    return int(parts[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.probe", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default=os.environ.get("MESSAGE_PROXY_HEALTH__PORT") or "8000")
    parser.add_argument("--path", default="/health")
    parser.add_argument("--timeout", type=float, default=2.0)
    try:
        args = parser.parse_args(argv)
        port = int(args.port)
        if not 0 < port < 65536:
            raise ValueError(port)
    except SystemExit as exc:  # a HEALTHCHECK must exit 0 or 1, never argparse's 2
        return 0 if exc.code == 0 else 1
    except ValueError:
        print(f"probe: not a port: {args.port!r}", file=sys.stderr)
        return 1
    url = f"http://{args.host}:{port}{args.path}"
    try:
        status = http_status(args.host, port, args.path, args.timeout)
    except (OSError, ValueError) as exc:
        print(f"probe: {url}: {exc!r}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"probe: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
