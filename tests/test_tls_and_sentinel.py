"""TLS against real listeners (Redis with ``--tls-port``, a RabbitMQ node with an ``ssl``
listener), each with certificates the session makes; Redis Sentinel failover; TCP keepalive."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from typing import Any

import pytest
from pydantic import SecretStr

from proxy.amqp.connection import AmqpConnection
from proxy.amqp.endpoint import Endpoint
from proxy.config import RedisSettings
from proxy.errors import AmqpError, TransientError
from proxy.message import Message
from proxy.routing import StreamTarget
from proxy.sinks import Accepted, Publish
from proxy.sinks.redis_stream import RedisStreamSink
from tests.helpers import unique
from tests.servers.certs import Certificates
from tests.servers.rabbit_servers import RabbitCluster
from tests.servers.redis_servers import RedisSentinelGroup, RedisTls

pytestmark = pytest.mark.broker


def batch(name: str, ids: list[str], *, dedupe: bool = False) -> list[Publish]:
    target = StreamTarget("r", "tmpl", name, None, dedupe)
    return [Publish(Message(i.encode(), message_id=i), target) for i in ids]


# --- Redis over TLS ------------------------------------------------------------------------------


def tls_settings(server: RedisTls, certs: Certificates, **keys: Any) -> RedisSettings:
    defaults: dict[str, Any] = {
        "tls_ca_file": str(certs.ca),
        "tls_cert_file": str(certs.client_cert),
        "tls_key_file": str(certs.client_key),
        "tls_server_name": "localhost",  # the certificate names localhost, not 127.0.0.1
    }
    return RedisSettings(
        url=SecretStr(f"rediss://127.0.0.1:{server.port}/0"), timeout=2.0, **(defaults | keys)
    )


async def test_rediss_with_the_ca_a_client_certificate_and_the_server_name(
    redis_tls: RedisTls, certificates: Certificates
) -> None:
    sink = RedisStreamSink(tls_settings(redis_tls, certificates))
    name = unique("tls")
    try:
        assert await sink.publish_batch(batch(name, ["1", "2"])) == [None, None]
    finally:
        await sink.aclose()
    assert redis_tls.client().xlen(name) == 2


@pytest.mark.parametrize(
    ("keys", "why"),
    [
        pytest.param({"tls_server_name": None}, "certificate", id="ip-without-server-name"),
        pytest.param({"tls_server_name": "other.example"}, "certificate", id="wrong-server-name"),
        pytest.param({"tls_ca_file": "other"}, "certificate", id="untrusted-ca"),
        pytest.param({"tls_cert_file": None, "tls_key_file": None}, None, id="no-client-cert"),
    ],
)
async def test_rediss_refuses(
    redis_tls: RedisTls, certificates: Certificates, keys: dict[str, Any], why: str | None
) -> None:
    if keys.get("tls_ca_file") == "other":
        keys = {"tls_ca_file": str(certificates.other_ca)}
    sink = RedisStreamSink(tls_settings(redis_tls, certificates, **keys))
    try:
        with pytest.raises(TransientError, match=why):
            await sink.ping()
    finally:
        await sink.aclose()


async def test_every_redis_socket_has_tcp_keepalive() -> None:
    sink = RedisStreamSink(RedisSettings())
    try:
        await sink.ping()
        pool = sink.client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            sock = connection._writer.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        finally:
            await pool.release(connection)
    finally:
        await sink.aclose()


# --- Sentinel ------------------------------------------------------------------------------------


def sentinel_settings(group: RedisSentinelGroup, **keys: Any) -> RedisSettings:
    return RedisSettings(
        mode="sentinel",
        sentinels=tuple(SecretStr(u) for u in group.sentinel_urls()),
        service_name=group.SERVICE,
        timeout=2.0,
        **keys,
    )


async def write_until_accepted(sink: RedisStreamSink, items: list[Publish], within: float) -> Any:
    deadline = time.monotonic() + within
    while True:
        try:
            return await sink.publish_batch(items)
        except TransientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_sentinel_finds_the_master_again_after_a_failover(
    healthy_redis_sentinel: RedisSentinelGroup,
) -> None:
    group = healthy_redis_sentinel
    sink = RedisStreamSink(sentinel_settings(group), dedupe_window=60)
    name = unique("sen")
    try:
        assert await sink.publish_batch(batch(name, ["1"], dedupe=True)) == [None]
        old = group.failover()
        await asyncio.to_thread(
            lambda: _wait(lambda: group.current_master() is not old, 15, "a new master")
        )
        again = await write_until_accepted(sink, batch(name, ["1", "2"], dedupe=True), 20)
        assert again == [Accepted.DUPLICATE, None]
        assert group.current_master().client().xlen(name) == 2
    finally:
        await sink.aclose()


async def test_sentinel_defaults_to_waiting_for_one_replica(
    healthy_redis_sentinel: RedisSentinelGroup,
) -> None:
    assert sentinel_settings(healthy_redis_sentinel).replicas_required() == 1
    sink = RedisStreamSink(sentinel_settings(healthy_redis_sentinel, min_replicas=2,
                                             replica_timeout=0.2))  # fmt: skip
    try:
        with pytest.raises(TransientError, match="1 of 2 replicas"):
            await sink.publish_batch(batch(unique("sen"), ["1"]))
    finally:
        await sink.aclose()


def _wait(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


# --- amqps against a RabbitMQ TLS listener -------------------------------------------------------


def amqps_url(cluster: RabbitCluster, certs: Certificates, **query: str) -> str:
    keys = {
        "cafile": str(certs.ca),
        "certfile": str(certs.client_cert),
        "keyfile": str(certs.client_key),
        "server_name": "localhost",
    } | query
    text = "&".join(f"{k}={v}" for k, v in keys.items() if v)
    return f"amqps://guest:guest@127.0.0.1:{cluster.tls_node.tls_port}/?{text}"


async def open_amqps(url: str) -> AmqpConnection:
    async with asyncio.timeout(10):
        return await AmqpConnection.open(
            Endpoint.from_url(url, heartbeat=10), connection_name="tls-test"
        )


async def test_amqps_with_the_ca_a_client_certificate_and_the_server_name(
    rabbit_cluster: RabbitCluster, certificates: Certificates
) -> None:
    connection = await open_amqps(amqps_url(rabbit_cluster, certificates))
    await connection.close()


@pytest.mark.parametrize(
    ("query", "error"),
    [
        pytest.param({"server_name": ""}, "IP address mismatch", id="ip-no-server-name"),
        pytest.param({"cafile": ""}, "certificate verify failed", id="without-the-ca"),
        pytest.param({"certfile": "", "keyfile": ""}, "CERTIFICATE_REQUIRED", id="no-client-cert"),
    ],
)
async def test_amqps_refuses(
    rabbit_cluster: RabbitCluster, certificates: Certificates, query: dict[str, str], error: str
) -> None:
    with pytest.raises((ssl.SSLError, AmqpError), match=error):
        connection = await open_amqps(amqps_url(rabbit_cluster, certificates, **query))
        await connection.close()
