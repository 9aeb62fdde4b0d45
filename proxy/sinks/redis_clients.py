"""Redis clients as ``[redis]`` asks for them: one server, the master behind Sentinel, or the nodes
of a Redis Cluster; every socket with TCP keepalive, TLS where the URL is ``rediss://``.

The clients never retry on their own: the pipeline's backoff decides when to try again, and a
client that retried inside a batch's time budget would only hide the outage from readiness.
"""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from pydantic import SecretStr
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel, SentinelManagedSSLConnection
from redis.backoff import NoBackoff
from redis.retry import Retry

from proxy.config import RedisSettings


def _host_port(url: SecretStr) -> tuple[str, int]:
    parts = urlsplit(url.get_secret_value())
    return parts.hostname or "127.0.0.1", parts.port or 6379


def _credentials(url: SecretStr) -> dict[str, Any]:
    parts = urlsplit(url.get_secret_value())
    found: dict[str, Any] = {}
    if parts.username:
        found["username"] = unquote(parts.username)
    if parts.password is not None:
        found["password"] = unquote(parts.password)
    return found


def _is_tls(url: SecretStr) -> bool:
    return urlsplit(url.get_secret_value()).scheme == "rediss"


def socket_options(settings: RedisSettings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        "socket_keepalive": True,  # a peer gone without a FIN is noticed, even when idle
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }


def tls_options(settings: RedisSettings) -> dict[str, Any]:
    """redis-py's TLS arguments for ``[redis] tls_*``."""
    return {
        "ssl_ca_certs": settings.tls_ca_file,
        "ssl_certfile": settings.tls_cert_file,
        "ssl_keyfile": settings.tls_key_file,
        "ssl_cert_reqs": "required" if settings.tls_verify else "none",
        "ssl_check_hostname": settings.tls_verify,
    }


def with_server_name(base: type[Connection], server_name: str | None) -> type[Connection]:
    """``base`` checking the certificate (and sending SNI) for ``server_name`` instead of the host
    it connects to: a cluster announces addresses, a sentinel names an IP."""
    if server_name is None:
        return base

    class NamedTlsConnection(base):  # type: ignore[valid-type,misc]
        def _connection_arguments(self) -> Any:
            arguments = dict(super()._connection_arguments())
            arguments["server_hostname"] = server_name
            return arguments

    return NamedTlsConnection


def standalone_client(settings: RedisSettings) -> aioredis.Redis:
    url = settings.urls()[0]
    options = socket_options(settings)
    if _is_tls(url):
        options |= tls_options(settings)
    client = aioredis.Redis.from_url(url.get_secret_value(), **options)
    if _is_tls(url):  # the URL's scheme picks the class in from_url, whatever is passed
        pool = client.connection_pool
        pool.connection_class = with_server_name(SSLConnection, settings.tls_server_name)
    return client


def sentinel_client(settings: RedisSettings) -> aioredis.Redis:
    """The master of ``service_name``: found through the sentinels at connect, and again when a
    connection is lost or the server answers READONLY (it became a replica)."""
    master_url = settings.urls()[0]
    sentinel_options = socket_options(settings)
    first = settings.sentinels[0]
    sentinel_options |= _credentials(first)
    if _is_tls(first):
        sentinel_options |= tls_options(settings) | {"ssl": True}
        if settings.tls_server_name is not None:
            sentinel_options["connection_class"] = with_server_name(
                SSLConnection, settings.tls_server_name
            )
            del sentinel_options["ssl"]
    master_options = socket_options(settings) | _credentials(master_url)
    database = urlsplit(master_url.get_secret_value()).path.strip("/")
    if database:
        master_options["db"] = int(database)
    if _is_tls(master_url):
        master_options |= tls_options(settings)
        master_options["connection_class"] = with_server_name(
            SentinelManagedSSLConnection, settings.tls_server_name
        )
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [_host_port(url) for url in settings.sentinels], sentinel_kwargs=sentinel_options
    )
    master: aioredis.Redis = sentinel.master_for(settings.service_name or "", **master_options)
    return master


def cluster_client(settings: RedisSettings) -> RedisCluster:
    """A cluster client used for its topology (slot map, nodes and their connections); the sink
    writes on the nodes' connections itself."""
    urls = settings.urls()
    options = socket_options(settings) | _credentials(urls[0])
    tls = _is_tls(urls[0])
    if tls:
        options |= tls_options(settings) | {"ssl": True}
    options.pop("retry")
    client = RedisCluster(
        startup_nodes=[ClusterNode(*_host_port(url)) for url in urls],
        require_full_coverage=False,  # a slot without a master holds its entries, not the rest
        retry=AsyncRetry(NoBackoff(), 0),
        **options,
    )
    if tls and settings.tls_server_name is not None:
        named = with_server_name(SSLConnection, settings.tls_server_name)
        client.nodes_manager.connection_kwargs["connection_class"] = named
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_class = named
    return client



def client_for(settings: RedisSettings) -> aioredis.Redis | RedisCluster:
    """The client ``[redis] mode`` asks for, for a command-line tool's own commands."""
    if settings.mode == "cluster":
        return cluster_client(settings)
    if settings.mode == "sentinel":
        return sentinel_client(settings)
    return standalone_client(settings)


async def aclose_client(client: aioredis.Redis | RedisCluster) -> None:
    """Close ``client`` and, behind Sentinel, the sentinels' clients it does not own."""
    with contextlib.suppress(Exception):
        await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in manager.sentinels if manager is not None else ():
        with contextlib.suppress(Exception):
            await sentinel.aclose()
