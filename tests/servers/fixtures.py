"""Session-scoped pytest fixtures for the test servers: started by the first test that asks,
stopped when the session ends.

A server that cannot be started here (binary missing, boot timed out) skips the tests that need it,
with the reason; ``TEST_SERVERS=require`` (what CI sets) fails them instead, so that a broken start
cannot pass as a skip. (Not a ``MESSAGE_PROXY_`` name: workers started by the tests inherit the
environment and would read it as a config key.) A failed start is remembered: the next test skips
at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import NoReturn, Protocol, Self, TypeVar

import pytest

from tests.servers.base import ServerStartError, Workspace
from tests.servers.certs import Certificates
from tests.servers.rabbit_servers import RabbitCluster
from tests.servers.redis_servers import RedisCluster, RedisSentinelGroup, RedisTls

T = TypeVar("T")
START_ATTEMPTS = 3
_FAILED: dict[str, str] = {}


class _Server(Protocol):
    def start(self) -> Self: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=_Server)


def _start(what: str, start: Callable[[], T]) -> T:
    reason = _FAILED.get(what)
    if reason is None:
        try:
            return start()
        except ServerStartError as exc:
            reason = _FAILED[what] = f"{what} could not be started here: {exc}"
    return _unavailable(reason)


def _start_server(what: str, build: Callable[[], S]) -> S:
    """A server built and started, built again with other ports where it fails: ports are free
    when a server picks them, but another process on the machine (another test session) may bind
    one before the server does."""
    reason = _FAILED.get(what)
    if reason is None:
        for _ in range(START_ATTEMPTS):
            server = build()
            try:
                return server.start()
            except ServerStartError as exc:
                reason = f"{what} could not be started here: {exc}"
                server.stop()
        _FAILED[what] = reason
    return _unavailable(reason)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("TEST_SERVERS") == "require":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def server_workspace() -> Iterator[Workspace]:
    workspace = Workspace()
    try:
        yield workspace
    finally:
        workspace.close()


@pytest.fixture(scope="session")
def certificates(server_workspace: Workspace) -> Certificates:
    return _start("certificates", lambda: Certificates.make(server_workspace.folder("certs")))


@pytest.fixture(scope="session")
def redis_cluster(server_workspace: Workspace) -> Iterator[RedisCluster]:
    cluster = _start_server("a Redis Cluster", lambda: RedisCluster(server_workspace))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def healthy_redis_cluster(redis_cluster: RedisCluster) -> RedisCluster:
    """The session's cluster, back to 3 masters with a synced replica each."""
    redis_cluster.heal()
    return redis_cluster


@pytest.fixture(scope="session")
def redis_sentinel(server_workspace: Workspace) -> Iterator[RedisSentinelGroup]:
    group = _start_server("a Redis Sentinel group", lambda: RedisSentinelGroup(server_workspace))
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
def healthy_redis_sentinel(redis_sentinel: RedisSentinelGroup) -> RedisSentinelGroup:
    redis_sentinel.wait_healthy()
    return redis_sentinel


@pytest.fixture(scope="session")
def redis_tls(server_workspace: Workspace, certificates: Certificates) -> Iterator[RedisTls]:
    server = _start_server("a Redis TLS listener", lambda: RedisTls(server_workspace, certificates))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rabbit_cluster(
    server_workspace: Workspace, certificates: Certificates
) -> Iterator[RabbitCluster]:
    """3 clustered RabbitMQ nodes; node 1 (``tls_node``) also listens for ``amqps``."""
    cluster = _start_server(
        "a 3-node RabbitMQ cluster", lambda: RabbitCluster(server_workspace, certificates)
    )
    try:
        yield cluster
    finally:
        cluster.stop()
