"""Start test servers by hand: ``python -m tests.servers up KIND...``, Ctrl-C to stop.

Kinds: ``redis-cluster`` (add ``--direct`` for nodes announced on their own ports, no proxies),
``redis-sentinel``, ``redis-tls``, ``rabbit-cluster``. Prints each server's addresses as JSON, then
waits; on Ctrl-C or SIGTERM every server is killed and its folder removed. ``down FOLDER`` cleans up
after an ``up`` that was itself killed (the reaper normally does it).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tests.servers.base import ServerStartError, Workspace
from tests.servers.certs import Certificates
from tests.servers.rabbit_servers import RabbitCluster
from tests.servers.reaper import reap
from tests.servers.redis_servers import RedisCluster, RedisSentinelGroup, RedisTls

KINDS = ("redis-cluster", "redis-sentinel", "redis-tls", "rabbit-cluster")


def up(kinds: list[str], *, direct: bool) -> dict[str, Any]:
    workspace = Workspace()
    found: dict[str, Any] = {"folder": str(workspace.root)}
    certs = Certificates.make(workspace.folder("certs"))
    found["certs"] = {k: str(v) for k, v in vars(certs).items()}
    for kind in kinds:
        if kind == "redis-cluster":
            found[kind] = RedisCluster(workspace, proxied=not direct).start().urls()
        elif kind == "redis-sentinel":
            group = RedisSentinelGroup(workspace).start()
            found[kind] = {"sentinels": group.sentinel_urls(), "service_name": group.SERVICE}
        elif kind == "redis-tls":
            found[kind] = f"rediss://localhost:{RedisTls(workspace, certs).start().port}"
        elif kind == "rabbit-cluster":
            cluster = RabbitCluster(workspace, certs).start()
            found[kind] = {"urls": cluster.urls(), "amqps_port": cluster.tls_node.tls_port}
    found["_workspace"] = workspace
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.servers")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up")
    start.add_argument("kinds", nargs="+", choices=KINDS)
    start.add_argument("--direct", action="store_true")
    clean = commands.add_parser("down")
    clean.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "down":
        reap(args.folder)
        return 0
    try:
        found = up(args.kinds, direct=args.direct)
    except ServerStartError as exc:
        print(f"could not start: {exc}", file=sys.stderr)
        return 1
    workspace: Workspace = found.pop("_workspace")
    print(json.dumps(found, indent=2), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        workspace.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
