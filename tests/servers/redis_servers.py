"""Redis test servers: a cluster (3 masters, 1 replica each), a Sentinel group, a TLS listener.

Each ``redis-server`` runs with its own port, folder and log under the session's ``Workspace``,
nothing persisted (no RDB, no AOF: a restarted node resynchronises from its master).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Any

import redis

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
from tests.tcp_proxy import TcpProxy

BOOT_S = 10.0
SLOTS = 16384


# What a server logs once it listens: a data node, and a sentinel (which has no such line).
READY_LINES = ("Ready to accept connections", "Sentinel ID is")


class RedisNode:
    def __init__(self, workspace: Workspace, name: str, port: int, args: Sequence[str]) -> None:
        self.workspace = workspace
        self.name = name
        self.port = port
        self.folder = workspace.folder(name)
        self.args = [
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--save", "", "--appendonly", "no", "--logfile", str(self.folder / "redis.log"),
            "--daemonize", "no", "--repl-diskless-sync-delay", "0", *args,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self._client: redis.Redis | None = None

    def start(self, *, wait: bool = True) -> RedisNode:
        binary = need_binary("redis-server")
        self.process = self.workspace.spawn([binary, *self.args], log=self.folder / "out.log")
        if wait:
            self.wait_up()
        return self

    def wait_up(self) -> None:
        # Its own log line, not only an open port: another process may hold the port it was
        # given, and then something answers there while this server exits.
        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise ServerStartError(f"redis {self.name} exited: {self.log_tail()}")
            log = self.log_tail(None)
            return any(line in log for line in READY_LINES) and port_open(self.port)

        wait_until(up, BOOT_S, f"redis {self.name} on {self.port}")

    def kill(self) -> None:
        """kill -9: no shutdown, no last write."""
        if self.process is not None:
            kill_group(self.process.pid)
            self.process.wait(5)
            self.process = None
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        """One client per node, for managing it (kept: tests ask often)."""
        if self._client is None:
            self._client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        return self._client

    def log_tail(self, size: int | None = 1500) -> str:
        try:
            text = (self.folder / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text if size is None else text[-size:]


# --- Redis Cluster -------------------------------------------------------------------------------


class RedisCluster:
    """3 masters, 1 replica each, on 127.0.0.1.

    With ``proxied`` (the tests' default) every node announces the port of a ``TcpProxy`` in front
    of it instead of its own: clients (and replication) go through the proxies, the cluster bus does
    not, so ``cut_all()`` makes every node unreachable to clients while the cluster stays healthy.
    """

    def __init__(self, workspace: Workspace, *, proxied: bool = True) -> None:
        self.workspace = workspace
        self.proxied = proxied
        ports = free_ports(12)
        self.proxies: list[TcpProxy] = []
        self.nodes: list[RedisNode] = []
        for index in range(6):
            port, bus = ports[index], ports[index + 6]
            args = ["--cluster-enabled", "yes", "--cluster-port", str(bus),
                    "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
                    "--cluster-replica-validity-factor", "0"]  # fmt: skip
            if proxied:
                proxy = TcpProxy("127.0.0.1", port).start()
                self.proxies.append(proxy)
                args += ["--cluster-announce-port", str(proxy.port),
                         "--cluster-announce-bus-port", str(bus)]  # fmt: skip
            self.nodes.append(RedisNode(workspace, f"cluster-{index}", port, args))
        self.buses = ports[6:]

    # Seen from a client: the addresses the cluster announces.
    def client_port(self, node: RedisNode) -> int:
        return self.proxies[self.nodes.index(node)].port if self.proxied else node.port

    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{self.client_port(node)}" for node in self.nodes[:3]]

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            node.wait_up()
        first = self.nodes[0].client()
        for node, bus in zip(self.nodes[1:], self.buses[1:], strict=True):
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", self.client_port(node), bus)
        wait_until(
            lambda: all(len(self._known(n)) == 6 for n in self.nodes), BOOT_S, "cluster meet"
        )
        per_master = SLOTS // 3
        for index, node in enumerate(self.nodes[:3]):
            last = SLOTS - 1 if index == 2 else (index + 1) * per_master - 1
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", index * per_master, last)
        for master, replica in zip(self.nodes[:3], self.nodes[3:], strict=True):
            master_id = self.node_id(master)
            wait_until(
                lambda r=replica, m=master_id: r.client().execute_command(
                    "CLUSTER", "REPLICATE", m
                ),
                BOOT_S, "cluster replicate",
            )  # fmt: skip
        self.wait_healthy()
        return self

    def _known(self, node: RedisNode) -> list[str]:
        text = node.client().execute_command("CLUSTER", "NODES")
        raw = text.decode() if isinstance(text, bytes) else str(text)
        return [line for line in raw.splitlines() if line.strip()]

    def node_id(self, node: RedisNode) -> str:
        return str(node.client().execute_command("CLUSTER", "MYID").decode())

    def wait_healthy(self, within: float = 20.0) -> None:
        """Every node up, the cluster ``ok`` everywhere, each of 3 masters with a synced replica."""

        def problem() -> str | None:
            live = [n for n in self.nodes if n.running]
            if len(live) < 6:
                return f"{6 - len(live)} node(s) not running"
            for node in live:
                info = node.client().execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return f"{node.name}: cluster_state not ok"
            masters = self.masters()
            if len(masters) != 3:
                return f"masters: {[m.name for m in masters]}"
            for master in masters:
                replication = master.client().info("replication")
                if replication.get("connected_slaves") != 1:
                    return f"{master.name}: {replication.get('connected_slaves')} replicas"
                if not str(replication.get("slave0", {}).get("state", "")) == "online":
                    return f"{master.name}: its replica is not online yet"
            return None

        found: list[str | None] = [None]

        def healthy() -> bool:
            found[0] = problem()
            return found[0] is None

        try:
            wait_until(healthy, within, "redis cluster healthy")
        except ServerStartError as exc:
            raise ServerStartError(f"{exc}: {found[0]}") from None

    def masters(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.running and _role(n) == "master"]

    def master_for_slot(self, slot: int) -> RedisNode:
        for node in self.masters():
            for start, end, *_ in node.client().execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    owner_port = int(_[0][1])
                    return self._by_client_port(owner_port)
        raise LookupError(slot)

    def _by_client_port(self, port: int) -> RedisNode:
        for node in self.nodes:
            if self.client_port(node) == port:
                return node
        raise LookupError(port)

    def replica_of(self, master: RedisNode) -> RedisNode:
        master_id = self.node_id(master)
        for node in self.nodes:
            if node.running and node is not master:
                for line in self._known(node):
                    parts = line.split()
                    if "myself" in parts[2] and parts[3] == master_id:
                        return node
        raise LookupError(f"no replica of {master.name}")

    # Resharding one slot, in the three steps a migration takes (so a test can write between them).
    def begin_migration(self, slot: int, target: RedisNode) -> RedisNode:
        """Mark ``slot`` MIGRATING on its owner and IMPORTING on ``target``; returns the owner."""
        source = self.master_for_slot(slot)
        target.client().execute_command(
            "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source)
        )
        source.client().execute_command(
            "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target)
        )
        return source

    def move_keys(self, slot: int, source: RedisNode, target: RedisNode) -> int:
        """MIGRATE every key of ``slot`` now on ``source``; from then on it answers ASK for them."""
        moved = 0
        client = source.client()
        while keys := client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            client.execute_command(
                "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *keys
            )
            moved += len(keys)
        return moved

    def finish_migration(self, slot: int, target: RedisNode) -> None:
        """``slot`` belongs to ``target`` on every master: the old owner answers MOVED."""
        target_id = self.node_id(target)
        for node in sorted(self.masters(), key=lambda n: n is not target):  # the target first
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def restart(self, node: RedisNode) -> None:
        """Start a killed node again; it rejoins with its nodes.conf (as a replica, once failed
        over) and resynchronises from its master."""
        node.start()

    def heal(self) -> None:
        """Back to 3 masters with a replica each and no slot half migrated, whatever a test did."""
        for node in self.nodes:
            if not node.running:
                self.restart(node)
        for proxy in self.proxies:
            proxy.heal()
        self.wait_healthy()
        self._finish_open_migrations()

    def _finish_open_migrations(self) -> None:
        by_id = {self.node_id(node): node for node in self.masters()}
        for source in list(by_id.values()):
            for line in self._known(source):
                parts = line.split()
                if "myself" not in parts[2]:
                    continue
                for item in parts[8:]:  # "[slot->-target-id]": migrating to that node
                    if "->-" in item:
                        slot, target_id = item.strip("[]").split("->-")
                        target = by_id[target_id]
                        self.move_keys(int(slot), source, target)
                        self.finish_migration(int(slot), target)

    def cut_all(self) -> None:
        for proxy in self.proxies:
            proxy.cut()

    def heal_all(self) -> None:
        for proxy in self.proxies:
            proxy.heal()

    def flush(self) -> None:
        for node in self.masters():
            node.client().flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        for proxy in self.proxies:
            proxy.stop()


def _role(node: RedisNode) -> str:
    return str(node.client().info("replication")["role"])


# --- Sentinel ------------------------------------------------------------------------------------


class RedisSentinelGroup:
    """One master, one replica and 3 sentinels watching them as ``SERVICE``."""

    SERVICE = "mp-master"

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        ports = free_ports(5)
        self.master = RedisNode(workspace, "sentinel-data-0", ports[0], [])
        self.replica = RedisNode(
            workspace, "sentinel-data-1", ports[1], ["--replicaof", "127.0.0.1", str(ports[0])]
        )
        self.sentinels: list[RedisNode] = []
        for index, port in enumerate(ports[2:]):
            node = RedisNode(workspace, f"sentinel-{index}", port, [])
            config = node.folder / "sentinel.conf"  # sentinel rewrites it: one file per sentinel
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {node.folder}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {ports[0]} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                f"sentinel failover-timeout {self.SERVICE} 5000\n"
                f"sentinel parallel-syncs {self.SERVICE} 1\n"
            )
            node.args = [str(config), "--sentinel", "--logfile", str(node.folder / "redis.log")]
            self.sentinels.append(node)

    def sentinel_urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{node.port}" for node in self.sentinels]

    def data_nodes(self) -> list[RedisNode]:
        return [self.master, self.replica]

    def start(self) -> RedisSentinelGroup:
        for node in [self.master, self.replica, *self.sentinels]:
            node.start(wait=False)
        for node in [self.master, self.replica, *self.sentinels]:
            node.wait_up()
        self.wait_healthy()
        return self

    def current_master(self) -> RedisNode:
        _host, port = self.sentinels[0].client().execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE
        )
        return next(n for n in self.data_nodes() if n.port == int(port))

    def wait_healthy(self, within: float = 20.0) -> None:
        """Every sentinel agrees on the master, knows the other two and one synced replica."""

        def healthy() -> bool:
            masters = set()
            for sentinel in self.sentinels:
                client = sentinel.client()
                masters.add(tuple(client.execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE
                )))  # fmt: skip
                if len(client.execute_command("SENTINEL", "SENTINELS", self.SERVICE)) != 2:
                    return False
                replicas = client.execute_command("SENTINEL", "REPLICAS", self.SERVICE)
                if len(replicas) != 1 or "s_down" in _flags(replicas[0]):
                    return False
            if len(masters) != 1:
                return False
            info = self.current_master().client().info("replication")
            return info.get("connected_slaves") == 1 and str(
                info.get("slave0", {}).get("state")
            ) == "online"

        wait_until(healthy, within, "sentinel group healthy", interval=0.2)

    def failover(self) -> RedisNode:
        """``SENTINEL FAILOVER``; returns the node that was master."""
        before = self.current_master()
        self.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", self.SERVICE)
        return before

    def stop(self) -> None:
        for node in [*self.sentinels, self.master, self.replica]:
            node.kill()


def _flags(replica: Any) -> str:
    if isinstance(replica, dict):  # redis-py parses SENTINEL REPLICAS into a dict per replica
        return str(replica.get("flags", ""))
    fields = list(replica)
    for key, value in zip(fields[::2], fields[1::2], strict=False):
        if key in (b"flags", "flags"):
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


# --- TLS -----------------------------------------------------------------------------------------


class RedisTls:
    """A Redis with only a TLS port; it asks for a client certificate signed by the session CA."""

    def __init__(self, workspace: Workspace, certs: Certificates) -> None:
        self.certs = certs
        port = free_ports(1)[0]
        self.port = port
        self.node = RedisNode(workspace, "tls", 0, [
            "--tls-port", str(port), "--tls-cert-file", str(certs.server_cert),
            "--tls-key-file", str(certs.server_key), "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", "yes",
        ])  # fmt: skip

    def start(self) -> RedisTls:
        self.node.start(wait=False)
        self.node.port = self.port  # what wait_up polls: the TLS port accepts TCP
        self.node.wait_up()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=str(self.certs.ca),
            ssl_certfile=str(self.certs.client_cert), ssl_keyfile=str(self.certs.client_key),
            ssl_check_hostname=False, socket_timeout=5,
        )  # fmt: skip

    def stop(self) -> None:
        self.node.kill()


def wait_replicated(master: RedisNode, within: float = 10.0) -> None:
    """Until the master's replicas have everything it has (its replication offset)."""
    client = master.client()
    offset = client.info("replication")["master_repl_offset"]

    def caught_up() -> bool:
        info = client.info("replication")
        return all(
            int(value["offset"]) >= offset for key, value in info.items() if key.startswith("slave")
        )

    wait_until(caught_up, within, f"replicas of {master.name} caught up")
