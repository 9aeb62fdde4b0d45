"""A 3-node RabbitMQ cluster beside the machine's own broker, the first node also on ``amqps``.

Each node runs as the current user with its own name (``mp-<random>-N@localhost``), AMQP and
distribution ports, config file and data folder; all share one ``HOME`` (the Erlang cookie that
clustering and ``rabbitmqctl`` need). The nodes boot in parallel; nodes 2 and 3 then join node 1
with ``rabbitmqctl join_cluster``.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.servers.base import (
    ServerStartError,
    Workspace,
    free_ports,
    kill_group,
    need_binary,
    port_open,
    wait_until,
)
from tests.servers.certs import Certificates

BOOT_S = 90.0  # one node boots in ~20 s on a quiet 2-core machine; three at once, under load, more
CTL_S = 60.0


def _scripts() -> Path:
    """The package's own scripts: the wrappers on PATH switch to the rabbitmq user and drop the
    environment that tells a node its name and ports."""
    return Path(os.path.realpath(need_binary("rabbitmq-server"))).parent


class RabbitNode:
    def __init__(
        self, workspace: Workspace, home: Path, name: str, certs: Certificates | None
    ) -> None:
        self.workspace = workspace
        self.home = home
        self.name = name
        self.folder = workspace.folder(name.split("@")[0])
        self.port, self.dist_port, tls_port = free_ports(3)
        self.tls_port = tls_port if certs is not None else None
        config = [f"listeners.tcp.1 = 127.0.0.1:{self.port}", "loopback_users = none"]
        if certs is not None:
            config += [
                f"listeners.ssl.1 = 127.0.0.1:{tls_port}",
                f"ssl_options.cacertfile = {certs.ca}",
                f"ssl_options.certfile = {certs.server_cert}",
                f"ssl_options.keyfile = {certs.server_key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = true",
            ]
        (self.folder / "rabbitmq.conf").write_text("\n".join(config) + "\n")
        (self.folder / "enabled_plugins").write_text("[].\n")
        self.process: subprocess.Popen[bytes] | None = None

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.home),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_PID_FILE": str(self.folder / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self) -> RabbitNode:
        """Boot the Erlang VM (or boot it again after ``kill``) and wait until it serves."""
        self.process = self.workspace.spawn(
            [str(_scripts() / "rabbitmq-server")], log=self.folder / "out.log", env=self._env()
        )
        process = self.process

        def started() -> bool:
            if process.poll() is not None:
                raise ServerStartError(f"{self.name} exited: {self.log_tail()}")
            try:  # answers at once "not running at all" until the VM is registered with epmd
                self.ctl("await_startup", timeout=BOOT_S)
            except ServerStartError:
                if process.poll() is not None:
                    raise
                return False
            return True

        wait_until(started, BOOT_S, f"{self.name} booted", interval=0.5)
        return self

    def ctl(self, *args: str, timeout: float = CTL_S) -> str:
        command = [str(_scripts() / "rabbitmqctl"), "-n", self.name, *args]
        try:
            done = subprocess.run(
                command, env=self._env(), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise ServerStartError(
                f"rabbitmqctl {' '.join(args)} on {self.name}: timed out"
            ) from None
        if done.returncode:
            raise ServerStartError(
                f"rabbitmqctl {' '.join(args)} on {self.name}: {done.stderr.strip()[-400:]}"
                f"\n{self.log_tail()}"
            )
        return done.stdout

    def stop_app(self) -> None:
        """The RabbitMQ application stops (connections closed, port refused); the VM stays."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        wait_until(lambda: port_open(self.port), 30, f"{self.name} listening again")

    def kill(self) -> None:
        """kill -9 of the whole node (VM and children)."""
        if self.process is not None:
            kill_group(self.process.pid)
            self.process.wait(10)
            self.process = None

    def log_tail(self) -> str:
        try:
            return (self.folder / "out.log").read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"


class RabbitCluster:
    def __init__(self, workspace: Workspace, certs: Certificates | None = None) -> None:
        tag = uuid.uuid4().hex[:6]
        home = workspace.folder(f"rabbit-home-{tag}")
        self.nodes = [
            RabbitNode(workspace, home, f"mp-{tag}-{n}@localhost", certs if n == 1 else None)
            for n in (1, 2, 3)
        ]
        self.certs = certs

    @property
    def tls_node(self) -> RabbitNode:
        return self.nodes[0]

    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> RabbitCluster:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(RabbitNode.start, self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        wait_until(lambda: len(self.running_nodes()) == 3, 60, "3 running cluster nodes")
        return self

    def running_nodes(self) -> list[str]:
        """The cluster's running nodes as node 1 (or the first that answers) sees them."""
        import json

        for node in self.nodes:
            try:
                status = json.loads(node.ctl("cluster_status", "--formatter", "json", timeout=20))
            except ServerStartError:
                continue
            return list(status.get("running_nodes", []))
        return []

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
