"""The config file, parsed once at the edge into frozen objects; docs/CONFIG.md is made from it.

``load_config`` reads TOML, applies ``MESSAGE_PROXY_<SECTION>__<KEY>`` environment overrides,
validates with pydantic and turns every problem into one ``ConfigError`` that names the key.
Nothing below this module sees a dict or an environment variable.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from proxy.config_errors import problems as validation_problems
from proxy.errors import ConfigError
from proxy.stream_offsets import offset_key
from proxy.templates import Template

ENV_PREFIX = "MESSAGE_PROXY_"
# Environment variables with the prefix that are not config keys.
ENV_NOT_KEYS = frozenset({"MESSAGE_PROXY_CONFIG"})

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
MAX_HOPS = 8


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _check_url(value: SecretStr, schemes: tuple[str, ...]) -> SecretStr:
    raw = value.get_secret_value()
    try:
        parts = urlsplit(raw)
        port = parts.port  # raises ValueError on a non-numeric port
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme not in schemes:
        raise ValueError(f"scheme must be one of {', '.join(schemes)}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("the URL has no host")
    if port == 0:
        raise ValueError("port 0 is not a valid broker port")
    return value


def _check_amqp_query(value: SecretStr) -> None:
    """The query keys the AMQP connection reads: checked now, not on the first connect."""
    query = parse_qs(urlsplit(value.get_secret_value()).query)
    heartbeat = query.get("heartbeat", ["10"])[-1]
    if not heartbeat.isdigit() or not 1 <= int(heartbeat) <= 600:
        # 0 would turn heartbeats off: a frozen path would then leave the worker "ready" forever.
        raise ValueError("heartbeat in the URL must be a whole number of seconds, 1 to 600")
    for key in ("cafile", "certfile", "keyfile"):
        for path in query.get(key, []):
            if not Path(path).is_file():
                raise ValueError(f"{key} in the URL is not a readable file")


def display_url(url: SecretStr) -> str:
    """The URL with its password masked: safe for logs, errors and ``check`` output."""
    parts = urlsplit(url.get_secret_value())
    if parts.password is None:
        return parts.geturl()
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def _check_amqp_url(value: SecretStr) -> SecretStr:
    _check_url(value, ("amqp", "amqps"))
    _check_amqp_query(value)
    return value


def _one_or_many(value: Any) -> str:
    return "list" if isinstance(value, list | tuple) else "single"


def _vhost_of(url: SecretStr) -> str:
    path = urlsplit(url.get_secret_value()).path
    return unquote(path[1:]) if path not in ("", "/") else "/"


def _one_vhost(urls: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
    """The nodes of one cluster serve one vhost: stream offsets and the consumed queues are
    named by it."""
    vhosts = [_vhost_of(url) for url in urls]
    for index, vhost in enumerate(vhosts):
        if vhost != vhosts[0]:
            raise ValueError(
                f"every node's URL must name the same vhost: url[0] names {vhosts[0]!r}, "
                f"url[{index}] {vhost!r}"
            )
    return urls


AmqpUrl = Annotated[SecretStr, AfterValidator(_check_amqp_url)]
# One URL or a list of them (a cluster's nodes). The tags tell pydantic which shape it was given;
# config_errors leaves them out of the key it names: `amqp.url`, `amqp.url[1]`.
AmqpUrls = Annotated[
    Annotated[AmqpUrl, Tag("single")]
    | Annotated[
        tuple[AmqpUrl, ...], Field(min_length=1), AfterValidator(_one_vhost), Tag("list")
    ],
    Discriminator(_one_or_many),
]


class AmqpSettings(Frozen):
    """The RabbitMQ connection: where the worker consumes from, and publishes to unless
    ``[amqp_out]`` names another broker."""

    url: AmqpUrls = Field(
        SecretStr(DEFAULT_AMQP_URL),
        description=(
            "The broker's URL: `amqp://user:password@host:port/vhost`, or `amqps://` for TLS "
            "(port 5671 by default). The vhost is URL-encoded: `%2F` is the default vhost `/`. "
            "Query keys: `heartbeat` (seconds, overrides `heartbeat` below), and for `amqps`: "
            "`cafile` (CA bundle to verify the broker with; the system's CAs otherwise), "
            "`capath` (a directory of CA certificates), `certfile` and `keyfile` (a client "
            "certificate for mutual TLS), `server_name` (the name the broker's certificate must "
            "carry, also sent as SNI, when it is not the host in the URL), `no_verify_ssl=1` "
            "(skip verification: testing only). "
            "The files must exist when the worker starts. "
            "For a RabbitMQ cluster, a list of URLs, one per node (same vhost in each): every "
            "worker process tries them in its own shuffled order, so replicas spread over the "
            "nodes, and goes on with the next one when its connection is lost or refused; the "
            "backoff waits only once every node was tried. From the environment a list is "
            "written as TOML: `MESSAGE_PROXY_AMQP__URL='[\"amqp://...\", \"amqp://...\"]'`. "
            "The password is a secret: it is masked in logs, errors and `check` output."
        ),
        examples=[
            "amqp://app:secret@rabbit.internal:5672/%2F",
            "amqps://app:secret@rabbit.internal:5671/prod?cafile=/etc/ssl/rabbit-ca.pem",
            [
                "amqp://app:secret@rabbit-1.internal:5672/%2F",
                "amqp://app:secret@rabbit-2.internal:5672/%2F",
                "amqp://app:secret@rabbit-3.internal:5672/%2F",
            ],
        ],
    )
    prefetch: int = Field(
        1000,
        ge=1,
        le=65535,
        description=(
            "How many unacked deliveries RabbitMQ may send ahead (`basic.qos`), shared across "
            "the sources: each source's consumer gets `prefetch / number of sources` (at least "
            "1). It bounds the worker's memory and the work redelivered after a crash; keep it "
            "at least twice `batch.max_messages` so a batch can fill while the last one is "
            "written."
        ),
        examples=[2000],
    )
    connect_timeout: float = Field(
        10.0,
        gt=0,
        description=(
            "Seconds allowed to connect, open the channel, declare and start consuming; a step "
            "slower than this is abandoned and retried with backoff."
        ),
        examples=[5],
    )
    publish_timeout: float = Field(
        10.0,
        gt=0,
        description=(
            "Seconds to wait for RabbitMQ to confirm a batch published to an exchange "
            "destination; slower is treated like a lost connection: the batch is held and "
            "published again with backoff."
        ),
        examples=[30],
    )
    # A broker that stops answering is only noticed through missed heartbeats (after about three
    # intervals); RabbitMQ's default of 60 s would leave a hung connection unnoticed for minutes,
    # and 0 (no heartbeats) for ever.
    heartbeat: int = Field(
        10,
        ge=1,
        le=600,
        description=(
            "AMQP heartbeat interval in seconds (1 to 600), proposed to the broker; a connection "
            "that stays silent for about three intervals is treated as lost and reconnected. "
            "Heartbeats cannot be turned off: 0 is a config error, in the URL too. TCP keepalive "
            "is always on as well. A `heartbeat` in the URL wins over this key."
        ),
        examples=[30],
    )
    max_inflight_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description=(
            "Bytes of message bodies the worker may hold unacked, on the consuming connection "
            "(`[amqp]`; not used by `[amqp_out]`). `prefetch` bounds messages, not bytes: at "
            "this many bytes the worker stops reading the connection (TCP back-pressure; "
            "RabbitMQ waits) until a written batch frees room. A batch also takes at most an "
            "eighth of it in bodies, since writing copies them. A single message larger than "
            "this still goes through, alone. Default 64 MiB: about 150 MiB of RSS with 8 MiB "
            "bodies."
        ),
        examples=[16 * 1024 * 1024],
    )

    def urls(self) -> tuple[SecretStr, ...]:
        """The nodes' URLs, in the order written."""
        return self.url if isinstance(self.url, tuple) else (self.url,)

    def display(self) -> str:
        """Every URL with its password masked: safe for logs, errors and ``check`` output."""
        return ", ".join(display_url(url) for url in self.urls())


def _check_tls_file(value: str | None) -> str | None:
    if value is not None and not Path(value).is_file():
        raise ValueError("not a readable file")
    return value


def _check_cluster_urls(urls: tuple[SecretStr, ...]) -> None:
    for url in urls:
        parts = urlsplit(url.get_secret_value())
        if parts.scheme == "unix":
            raise ConfigError("redis.url", "a cluster node needs a redis:// or rediss:// URL")
        if parts.path.strip("/") not in ("", "0"):
            raise ConfigError("redis.url", "Redis Cluster has only database 0")


class RedisSettings(Frozen):
    """The Redis that stream destinations (and a stream dead-letter destination) write to, and
    where stream-queue sources keep their offsets: one server, a Redis Cluster or the master
    behind Sentinel. Only read when some destination is a stream or some source a stream queue."""

    mode: Literal["standalone", "cluster", "sentinel"] = Field(
        "standalone",
        description=(
            "`standalone`: one server at `url`. `cluster`: a Redis Cluster; `url` is one seed node "
            "or a list of them, the rest of the topology is learnt from the cluster. `sentinel`: "
            "the master of `service_name`, found through `sentinels` at start and again after a "
            "failover."
        ),
        examples=["cluster"],
    )
    url: SecretStr | tuple[SecretStr, ...] = Field(
        SecretStr(DEFAULT_REDIS_URL),
        description=(
            "The server's URL: `redis://[user:password@]host:port/db`, `rediss://` for TLS (see "
            "the `tls_*` keys), or `unix:///path/to/redis.sock`. In cluster mode a list of seed "
            "nodes (database 0 only). In sentinel mode only its scheme, credentials and database "
            "are used: the sentinels name the host. The password is a secret: it is masked in "
            "logs, errors and `check` output."
        ),
        examples=[
            "redis://:secret@redis.internal:6379/0",
            ["redis://:secret@redis-1:6379", "redis://:secret@redis-2:6379"],
        ],
        json_schema_extra={"x-example-with": [None, {"mode": "cluster"}]},
    )
    timeout: float = Field(
        5.0,
        gt=0,
        description=(
            "Seconds allowed to connect and for one batch's round trip; slower is treated like "
            "a lost connection: the batch is held and written again with backoff."
        ),
        examples=[2],
    )
    sentinels: tuple[SecretStr, ...] = Field(
        (),
        description="`mode = \"sentinel\"`: the sentinels' `redis://` or `rediss://` URLs.",
        examples=[["redis://sentinel-1:26379", "redis://sentinel-2:26379"]],
        json_schema_extra={"x-example-with": {"mode": "sentinel", "service_name": "mymaster"}},
    )
    service_name: str | None = Field(
        None,
        min_length=1,
        description="`mode = \"sentinel\"`: the master's name, as the sentinels monitor it.",
        examples=["mymaster"],
        json_schema_extra={"x-example-with": {"mode": "sentinel", "sentinels": ["redis://sentinel-1:26379"]}},
    )
    min_replicas: int | None = Field(
        None,
        ge=0,
        description=(
            "Replicas that must have a batch before it counts as written and is acked: each "
            "pipeline ends with `WAIT min_replicas replica_timeout` on every node written to. "
            "Fewer is transient (held, retried; with dedupe nothing is written twice). Default 1 "
            "in cluster and sentinel modes (a master killed right after answering loses nothing "
            "acked), 0 standalone."
        ),
        examples=[1],
    )
    replica_timeout: float = Field(
        1.0,
        gt=0,
        description="Seconds WAIT waits for `min_replicas` replicas before the batch is held.",
        examples=[0.5],
    )
    tls_ca_file: str | None = Field(
        None,
        description="`rediss://`: the CA bundle (PEM) to verify servers with (else the system's).",
        examples=["/etc/ssl/redis-ca.pem"],
        json_schema_extra={"x-example-with": {"url": "rediss://redis.internal:6380/0"}},
    )
    tls_cert_file: str | None = Field(
        None,
        description="`rediss://`: a client certificate (PEM), for servers that ask for one.",
        examples=["/etc/ssl/worker.pem"],
        json_schema_extra={"x-example-with": {"url": "rediss://redis.internal:6380/0"}},
    )
    tls_key_file: str | None = Field(
        None,
        description="`rediss://`: the client certificate's private key (PEM).",
        examples=["/etc/ssl/worker-key.pem"],
        json_schema_extra={"x-example-with": {"url": "rediss://redis.internal:6380/0"}},
    )
    tls_server_name: str | None = Field(
        None,
        min_length=1,
        description=(
            "`rediss://`: the name the server's certificate must carry (also sent as SNI), when "
            "it is not the host connected to: an IP address, the addresses a cluster announces "
            "or a sentinel names."
        ),
        examples=["redis.internal"],
        json_schema_extra={"x-example-with": {"url": "rediss://redis.internal:6380/0"}},
    )
    tls_verify: bool = Field(
        True,
        description=(
            "`rediss://`: verify the server's certificate and name; false encrypts without "
            "verifying (testing only)."
        ),
        examples=[True],
    )

    _files = field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")(
        lambda value: _check_tls_file(value)
    )

    @field_validator("url", mode="before")
    @classmethod
    def _url_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            return tuple(value)
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr | tuple[SecretStr, ...]) -> SecretStr | tuple[SecretStr, ...]:
        urls = value if isinstance(value, tuple) else (value,)
        if not urls:
            raise ValueError("needs at least one URL")
        for url in urls:
            _check_url(url, ("redis", "rediss", "unix"))
        return value

    @field_validator("sentinels")
    @classmethod
    def _sentinels(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for url in value:
            _check_url(url, ("redis", "rediss"))
        return value

    def check_modes(self) -> None:
        """Keys that only make sense together; ``ConfigError`` names the key at fault."""
        urls = self.urls()

        def fail(key: str, problem: str) -> None:
            raise ConfigError(f"redis.{key}", problem)

        if self.mode != "cluster" and len(urls) > 1:
            fail("url", 'a list of URLs needs mode = "cluster"')
        if self.mode == "cluster":
            _check_cluster_urls(urls)
        if self.mode == "sentinel":
            if not self.sentinels:
                fail("sentinels", 'mode = "sentinel" needs at least one sentinel')
            if self.service_name is None:
                fail("service_name", 'mode = "sentinel" needs the service name')
        else:
            for key in ("sentinels", "service_name"):
                if getattr(self, key):
                    fail(key, 'only used with mode = "sentinel"')
        uses_tls = any(
            urlsplit(url.get_secret_value()).scheme == "rediss" for url in (*urls, *self.sentinels)
        )
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name"):
            if getattr(self, key) is not None and not uses_tls:
                fail(key, "set, but no Redis URL is rediss://")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            fail("tls_key_file", "needs tls_cert_file")

    def urls(self) -> tuple[SecretStr, ...]:
        return self.url if isinstance(self.url, tuple) else (self.url,)

    def replicas_required(self) -> int:
        """``min_replicas``, or its default: 1 where there are replicas to wait for."""
        if self.min_replicas is not None:
            return self.min_replicas
        return 0 if self.mode == "standalone" else 1


class HealthSettings(Frozen):
    """The HTTP sidecar: `/health` (liveness), `/ready` (readiness) and `/metrics`."""

    host: str = Field(
        "0.0.0.0",
        description="Address the sidecar listens on; `127.0.0.1` keeps it off the network.",
        examples=["127.0.0.1"],
    )
    port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="TCP port of the sidecar; 0 picks a free port (useful in tests).",
        examples=[9100],
    )


class BatchSettings(Frozen):
    """How deliveries are grouped: one batch is written at a time, with one round trip per
    destination broker, and acked with one `basic.ack`."""

    max_messages: int = Field(
        500,
        ge=1,
        le=100_000,
        description=(
            "The most deliveries in one batch (which also holds at most an eighth of `[amqp] "
            "max_inflight_bytes` of bodies). Batches form by themselves: a batch is written "
            "as soon as the worker has taken what the socket held and no other batch is being "
            "written; what arrives meanwhile makes the next one, up to this many."
        ),
        examples=[1000],
    )
    max_delay_ms: float = Field(
        0,
        ge=0,
        le=60_000,
        description=(
            "A minimum linger: a batch that is not full waits until its oldest delivery has "
            "waited this many milliseconds, for fewer, larger writes under a light load, at the "
            "cost of that much latency. 0 (the default) writes at once: the lowest latency, and "
            "under load each batch holds what arrived while the previous one was written."
        ),
        examples=[5],
    )


class Binding(Frozen):
    """One binding of a source queue to an exchange, made at start when the source has
    `declare = true`."""

    exchange: str = Field(
        min_length=1,
        description="The exchange to bind the queue to; declared durable if it does not exist.",
        examples=["app"],
    )
    routing_key: str = Field(
        "#",
        description=(
            "The binding key: for a topic exchange a pattern (`*` one word, `#` zero or more "
            "words); for a direct exchange the exact key; ignored by fanout and headers "
            "exchanges."
        ),
        examples=["order.#"],
    )
    exchange_type: Literal["topic", "direct", "fanout", "headers"] = Field(
        "topic",
        description=(
            "The type the exchange is declared with; it must match the type of an exchange that "
            "already exists (RabbitMQ refuses a declaration that differs)."
        ),
        examples=["fanout"],
    )


class Source(Frozen):
    """One RabbitMQ queue the worker consumes, with manual acks."""

    queue: str = Field(
        min_length=1,
        description="The queue to consume from; also what `match.queue` and `{queue}` see.",
        examples=["events"],
    )
    declare: bool = Field(
        True,
        description=(
            "Declare the queue (durable, with `arguments`) and its `bindings` at start. With "
            "`false` the queue must already exist, and `arguments`, `bindings` and "
            "`single_active_consumer` are not applied."
        ),
        examples=[False],
    )
    arguments: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Queue arguments for the declaration, e.g. `x-queue-type`, `x-dead-letter-exchange`, "
            "`x-max-length`. They must match an existing queue's, or RabbitMQ refuses the "
            "declaration (`PRECONDITION_FAILED`)."
        ),
        examples=[{"x-queue-type": "quorum", "x-dead-letter-exchange": "events-dlx"}],
    )
    bindings: tuple[Binding, ...] = Field(
        (),
        description="Exchanges to bind the queue to when it is declared.",
        examples=[[{"exchange": "app", "routing_key": "order.#"}]],
    )
    single_active_consumer: bool = Field(
        False,
        description=(
            "Declare the queue with `x-single-active-consumer`: of several workers on the queue "
            "one consumes and the others stand by, which keeps the queue's order across "
            "replicas. Only applies when the worker declares the queue."
        ),
        examples=[True],
    )

    stream_offset: Literal["first", "last", "next"] | datetime = Field(
        "first",
        description=(
            "Stream queues only (`arguments` with `x-queue-type = \"stream\"`): where the "
            "source starts the first time, while Redis holds no offset for it: `\"first\"` (the "
            "oldest message the stream still keeps), `\"last\"` (the last chunk written), "
            "`\"next\"` (only messages published from then on), or an RFC 3339 time with its "
            "offset, as a TOML date-time or a string (the first chunk written at or after it). "
            "After that the worker always resumes right after the last offset it wrote. See "
            "docs/STREAM-SOURCES.md."
        ),
        examples=["next", "2026-01-01T00:00:00Z"],
        json_schema_extra={"x-example-with": {"arguments": {"x-queue-type": "stream"}}},
    )
    offset_key: str | None = Field(
        None,
        min_length=1,
        description=(
            "Stream queues only: the Redis key that keeps the offset of the last message "
            "written from this source. Default `message-proxy:stream-offset:<vhost>:<queue>`, "
            "the vhost URL-encoded (`%2F` for `/`). Give two deployments that read the same "
            "stream into the same Redis with different routes keys of their own; delete the key "
            "to start again from `stream_offset`."
        ),
        examples=["message-proxy:stream-offset:%2F:events-stream:audit"],
        json_schema_extra={"x-example-with": {"arguments": {"x-queue-type": "stream"}}},
    )

    @field_validator("single_active_consumer")
    @classmethod
    def _single_active_consumer(cls, value: bool, info: ValidationInfo) -> bool:
        if value and _is_stream(info.data.get("arguments")):
            raise ValueError(
                "a stream queue has no single active consumer over AMQP 0-9-1 (RabbitMQ refuses "
                "the declaration); every consumer of a stream reads all of it"
            )
        return value

    @field_validator("stream_offset", mode="before")
    @classmethod
    def _stream_offset(cls, value: Any, info: ValidationInfo) -> Any:
        if "arguments" in info.data and not _is_stream(info.data["arguments"]):
            raise ValueError(_ONLY_FOR_STREAMS)
        if value in ("first", "last", "next"):
            return value
        moment = value
        if isinstance(value, str):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                moment = None
        if not isinstance(moment, datetime):
            raise ValueError(
                "must be \"first\", \"last\", \"next\" or an RFC 3339 time such as "
                "2026-01-01T00:00:00Z"
            )
        if moment.tzinfo is None:
            raise ValueError("the time needs its offset from UTC, e.g. 2026-01-01T00:00:00Z")
        return moment

    @field_validator("offset_key")
    @classmethod
    def _offset_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        arguments = info.data.get("arguments")
        if value is not None and arguments is not None and not _is_stream(arguments):
            raise ValueError(_ONLY_FOR_STREAMS)
        return value

    @property
    def is_stream(self) -> bool:
        """A stream queue: read with offsets, never rejected (RabbitMQ cannot)."""
        return _is_stream(self.arguments)

    def offset_key_in(self, vhost: str) -> str:
        return self.offset_key or offset_key(vhost, self.queue)

    def queue_arguments(self) -> dict[str, Any]:
        arguments = dict(self.arguments)
        if self.single_active_consumer:
            arguments["x-single-active-consumer"] = True
        return arguments


_ONLY_FOR_STREAMS = 'only for a stream queue (arguments with x-queue-type = "stream")'


def _is_stream(arguments: Any) -> bool:
    return isinstance(arguments, Mapping) and arguments.get("x-queue-type") == "stream"


def _template(value: str, *, allow_empty: bool = False) -> str:
    if not value and not allow_empty:
        raise ValueError("must not be empty")
    Template.parse(value)  # raises ValueError naming the unknown placeholder
    return value


TEMPLATE_HELP = (
    "A template: placeholders such as `{routing_key}`, `{routing_key.1}`, `{headers.tenant}` "
    "take the message's values."
)


class StreamDestination(Frozen):
    """A Redis stream: one `XADD` per message, the body and the message's routing facts and
    properties as the entry's fields."""

    stream: str = Field(
        description=f"The stream's key. {TEMPLATE_HELP}",
        examples=["orders:{routing_key.1}"],
    )
    maxlen: int | None = Field(
        None,
        ge=1,
        description=(
            "Trim the stream to about this many entries on every write (`MAXLEN ~`: Redis trims "
            "whole nodes, so a little more may remain). Without it the stream grows until "
            "something else trims it."
        ),
        examples=[100000],
    )
    dedupe: bool = Field(
        False,
        description=(
            "Write each `message_id` at most once to this stream within `[dedupe] window`, "
            "however often RabbitMQ redelivers it. Messages without a `message_id` are written "
            "as usual (counted by `dedupe_skipped_total`)."
        ),
        examples=[True],
    )

    @field_validator("stream")
    @classmethod
    def _stream(cls, value: str) -> str:
        return _template(value)


DECLARE_DESCRIPTION = (
    "Declare the exchange as a durable topic exchange when the worker connects (again on every"
    " reconnect), so that it need not exist beforehand. The name must be fixed: no placeholders,"
    " not the default exchange and not one of RabbitMQ's own `amq.*` exchanges."
)


def declared_name(exchange: str) -> str:
    """The exchange a ``declare = true`` destination declares; ``ValueError`` when it cannot."""
    template = Template.parse(exchange)
    if not template.is_constant:
        raise ValueError(
            f"declare = true needs a fixed exchange name; {exchange!r} has placeholders"
        )
    name = "".join(part for part in template.parts if isinstance(part, str))
    if not name:
        raise ValueError("declare = true cannot declare the default exchange ''")
    if name.startswith("amq."):
        raise ValueError(f"declare = true cannot declare {name!r}: amq.* names are RabbitMQ's")
    return name


class ExchangeDestination(Frozen):
    """An AMQP exchange: published mandatory and publisher-confirmed, body and properties
    unchanged."""

    exchange: str = Field(
        description=(
            f"The exchange to publish to; `\"\"` is the default exchange, which routes by "
            f"queue name. {TEMPLATE_HELP}"
        ),
        examples=["audit"],
    )
    routing_key: str = Field(
        "{routing_key}",
        description=f"The routing key to publish with. {TEMPLATE_HELP}",
        examples=["audit.{queue}"],
    )
    declare: bool = Field(
        False,
        description=DECLARE_DESCRIPTION,
        examples=[True],
    )

    @field_validator("exchange")
    @classmethod
    def _exchange(cls, value: str) -> str:
        # "" is the default exchange: legal, it routes by queue name.
        return _template(value, allow_empty=True)

    @field_validator("routing_key")
    @classmethod
    def _routing_key(cls, value: str) -> str:
        return _template(value, allow_empty=True)

    @field_validator("declare")
    @classmethod
    def _declare(cls, value: bool, info: ValidationInfo) -> bool:
        if value and "exchange" in info.data:  # a bad name has its own error already
            declared_name(info.data["exchange"])
        return value


def _destination_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        if "stream" in value:
            return "stream"
        if "exchange" in value:
            return "exchange"
        return None
    if isinstance(value, StreamDestination):
        return "stream"
    if isinstance(value, ExchangeDestination):
        return "exchange"
    return None


Destination = Annotated[
    Annotated[StreamDestination, Tag("stream")] | Annotated[ExchangeDestination, Tag("exchange")],
    Discriminator(
        _destination_kind,
        custom_error_type="destination_kind",
        custom_error_message="a destination needs either a 'stream' or an 'exchange' key",
    ),
]


class Match(Frozen):
    """What a message must look like for its route to take it. Every key given must hold (AND);
    a route without `match` takes every message."""

    routing_key: str | None = Field(
        None,
        description=(
            "An AMQP topic pattern over the routing key: words are separated by `.`, `*` "
            "matches exactly one word, `#` zero or more."
        ),
        examples=["order.*"],
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Header name -> value. `\"*\"` means the header is present; any other value must "
            "equal the header's text (numbers and booleans compare as their text, e.g. "
            "`\"42\"`, `\"true\"`)."
        ),
        examples=[{"tenant": "*", "x-region": "eu"}],
    )
    content_type: str | None = Field(
        None,
        description=(
            "The message's `content_type` property, compared without parameters and case "
            "(`application/json; charset=utf-8` matches `application/json`)."
        ),
        examples=["application/json"],
    )
    json_fields: dict[str, Any] = Field(
        default_factory=dict,
        alias="json",
        description=(
            "Dotted path into the body -> exact value (strings, numbers, booleans; `1` does not "
            "match `true`). The body must be a JSON object: any other body is dead-lettered "
            "with reason `not-json`, so give such routes a `routing_key` or `content_type` "
            "match too, to keep other messages away from them."
        ),
        examples=[{"type": "order.created", "customer.tier": "gold"}],
    )
    queue: str | None = Field(
        None,
        description="The name of the source queue the message came from.",
        examples=["events"],
    )
    plugin: str | None = Field(
        None,
        description=(
            "`module:function`: an importable callable that takes the message and returns true "
            "to match. Imported at start (an import error is a config error); an exception it "
            "raises dead-letters that message with reason `plugin-error`. It runs after the "
            "other checks, on the worker's event loop: keep it fast and free of I/O."
        ),
        examples=["mypkg.rules:is_vip"],
    )

    @field_validator("plugin")
    @classmethod
    def _plugin(cls, value: str | None) -> str | None:
        if value is not None:
            from proxy.plugins import load_plugin  # imports user code: only when configured

            load_plugin(value)
        return value


class Route(Frozen):
    """One route rule. Routes are tried in file order; the first that matches takes the message,
    unless it says `continue = true`."""

    name: str = Field(
        min_length=1,
        description=(
            "Unique name of the route: the `route` label of `messages_published_total` and the "
            "`route` field of dead-letter entries."
        ),
        examples=["orders"],
    )
    match: Match = Field(
        Match(),
        description="The conditions; leave it out to take every message.",
        examples=[{"routing_key": "order.*", "headers": {"tenant": "*"}}],
    )
    continue_: bool = Field(
        False,
        alias="continue",
        description=(
            "After this route matched, try the routes below it too: the message goes to the "
            "destinations of every matching route (fan-out across routes)."
        ),
        examples=[True],
    )
    to: tuple[Destination, ...] = Field(
        min_length=1,
        description=(
            "Where the message goes: one or more destinations, each a Redis stream "
            "(`{ stream = ... }`) or an AMQP exchange (`{ exchange = ... }`). The message is "
            "acked only once every one of them accepted it."
        ),
        examples=[[{"stream": "orders:{routing_key.1}"}, {"exchange": "audit"}]],
    )


class DeadLetter(Frozen):
    """Where messages that cannot be delivered go, with the reason: a Redis stream or an AMQP
    exchange (set exactly one of `stream` and `exchange`). Without this table such a message is
    rejected without requeue, so the queue's own dead-letter exchange, if it has one, applies.
    A dead-letter destination that refuses or is down holds the batch until it accepts."""

    stream: str | None = Field(
        None,
        description=(
            "The dead-letter stream: entries carry the message's fields plus `error`, `detail`, "
            f"`route` and `failed_at`. {TEMPLATE_HELP}"
        ),
        examples=["message-proxy:dead-letter"],
    )
    maxlen: int | None = Field(
        None,
        ge=1,
        description="Trim the dead-letter stream to about this many entries (`MAXLEN ~`).",
        examples=[1000000],
        json_schema_extra={"x-example-with": {"stream": "message-proxy:dead-letter"}},
    )
    exchange: str | None = Field(
        None,
        description=(
            "The dead-letter exchange: the message is published unchanged plus the headers "
            "`x-message-proxy-error`, `x-message-proxy-detail`, `x-message-proxy-route`, "
            "`x-message-proxy-failed-at`, and where it came from: `x-message-proxy-exchange`, "
            f"`x-message-proxy-routing-key`, `x-message-proxy-queue`. {TEMPLATE_HELP}"
        ),
        examples=["dead-letter"],
    )
    routing_key: str = Field(
        "{routing_key}",
        description=f"With `exchange`: the routing key to publish with. {TEMPLATE_HELP}",
        examples=["{queue}"],
        json_schema_extra={"x-example-with": {"exchange": "dead-letter"}},
    )
    declare: bool = Field(
        False,
        description=DECLARE_DESCRIPTION + " Only with `exchange`.",
        examples=[True],
        json_schema_extra={"x-example-with": {"exchange": "dead-letter"}},
    )

    @model_validator(mode="after")
    def _one_kind(self) -> DeadLetter:
        if self.stream is None and self.exchange is None:
            raise ValueError("needs either a 'stream' or an 'exchange' key")
        if self.stream is not None and self.exchange is not None:
            raise ValueError("has both 'stream' and 'exchange'; keep one of them")
        if self.exchange is not None and self.maxlen is not None:
            raise ValueError("'maxlen' trims a dead-letter stream; an exchange has none")
        if self.stream is not None and "routing_key" in self.model_fields_set:
            raise ValueError("'routing_key' goes with a dead-letter exchange, not a stream")
        for value in (self.stream, self.exchange, self.routing_key):
            if value:
                _template(value)
        return self

    @field_validator("declare")
    @classmethod
    def _declare(cls, value: bool, info: ValidationInfo) -> bool:
        if not value:
            return value
        if info.data.get("exchange") is None:
            raise ValueError("declare = true needs 'exchange': a stream is not declared")
        declared_name(info.data["exchange"])
        return value

    def destination(self) -> StreamDestination | ExchangeDestination:
        if self.stream is not None:
            return StreamDestination(stream=self.stream, maxlen=self.maxlen)
        return ExchangeDestination(
            exchange=self.exchange or "", routing_key=self.routing_key, declare=self.declare
        )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "exclusiveMinimum": 0},
        {"type": "string", "pattern": _DURATION.pattern, "title": "duration string"},
    ]
}


class DedupeSettings(Frozen):
    """How long stream destinations with `dedupe = true` remember a `message_id`."""

    window: Annotated[float, WithJsonSchema(DURATION_SCHEMA)] = Field(
        86400.0,
        gt=0,
        description=(
            "A duration: a number of seconds, or a string like `\"24h\"`, `\"30m\"`, `\"90s\"`, "
            "`\"500ms\"`, `\"7d\"`. A redelivery later than this is written again. Redis keeps "
            "about 100 bytes per remembered id: budget the message rate times the window."
        ),
        examples=["24h"],
    )

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> Any:
        if isinstance(value, str):
            found = _DURATION.match(value)
            if found is None:
                raise ValueError("a duration like '24h', '30m', '90s' or a number of seconds")
            return float(found[1]) * _DURATION_UNITS[found[2]]
        return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Config(Frozen):
    """A worker's configuration file (TOML). `[[sources]]` and `[[routes]]` are required;
    everything else has a default."""

    unrouted: Literal["dead-letter", "drop"] = Field(
        "dead-letter",
        description=(
            "What happens to a message no route takes: `\"dead-letter\"` (reason `unrouted`) or "
            "`\"drop\"` (acked and counted by `messages_unrouted_total`, never written)."
        ),
        examples=["drop"],
    )
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        WithJsonSchema({"enum": [*LOG_LEVELS, *(level.lower() for level in LOG_LEVELS)]}),
    ] = Field(
        "INFO",
        description="The least severe log level written, in any case (`info` is `INFO`).",
        examples=["DEBUG"],
    )
    shutdown_timeout: float = Field(
        10.0,
        gt=0,
        description=(
            "Seconds a worker stopped by SIGTERM or SIGINT spends writing and acking what it "
            "already received; what is still unacked after it is redelivered by RabbitMQ. Keep "
            "it below your orchestrator's grace period (`stop_grace_period`, "
            "`terminationGracePeriodSeconds`)."
        ),
        examples=[25],
    )
    pid_file: str | None = Field(
        None,
        min_length=1,
        description=(
            "A file the worker writes its process id to at start (and removes at a clean "
            "stop), so that `message-proxy reload --config FILE` finds the worker to send "
            "SIGHUP to. Without it, `reload` needs `--pid`. Read once at start."
        ),
        examples=["/run/message-proxy/worker.pid"],
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description=(
            "A message whose body is larger is not routed: it is dead-lettered with reason "
            "`too-large` (a stream dead letter keeps only the first 1024 bytes of the body and "
            "the full size in `body_size`)."
        ),
        examples=[1048576],
    )
    amqp: AmqpSettings = Field(
        AmqpSettings(),
        description="The RabbitMQ the worker consumes from (and publishes to by default).",
        examples=[{"url": "amqp://app:secret@rabbit.internal:5672/%2F", "prefetch": 2000}],
    )
    amqp_out: AmqpSettings | None = Field(
        None,
        description=(
            "Another RabbitMQ for the exchange destinations (and an exchange dead-letter "
            "destination), e.g. to relay between clusters; the same keys as `[amqp]`. Without "
            "it, exchange destinations are on the `[amqp]` broker."
        ),
        examples=[{"url": "amqps://relay:secret@rabbit.other-site:5671/%2F"}],
    )
    redis: RedisSettings = Field(
        RedisSettings(),
        description=(
            "The Redis that stream destinations write to and stream-queue sources keep their "
            "offsets in."
        ),
        examples=[{"url": "redis://:secret@redis.internal:6379/0", "timeout": 2}],
    )
    health: HealthSettings = Field(
        HealthSettings(),
        description="Where the HTTP sidecar (health, readiness, metrics) listens.",
        examples=[{"port": 9100}],
    )
    batch: BatchSettings = Field(
        BatchSettings(),
        description="When a batch of deliveries is written.",
        examples=[{"max_messages": 1000, "max_delay_ms": 5}],
    )
    dedupe: DedupeSettings = Field(
        DedupeSettings(),
        description="The window of `dedupe = true` stream destinations.",
        examples=[{"window": "24h"}],
    )
    sources: tuple[Source, ...] = Field(
        min_length=1,
        description="The queues to consume, one `[[sources]]` table each; at least one.",
        examples=[[{"queue": "events", "bindings": [{"exchange": "app", "routing_key": "#"}]}]],
    )
    routes: tuple[Route, ...] = Field(
        min_length=1,
        description="The route rules, one `[[routes]]` table each, tried in file order.",
        examples=[[{"name": "orders", "match": {"routing_key": "order.*"},
                    "to": [{"stream": "orders:{routing_key.1}", "maxlen": 100000}]}]],
    )
    dead_letter: DeadLetter | None = Field(
        None,
        description=(
            "Where undeliverable messages go; without it they are rejected without requeue."
        ),
        examples=[{"stream": "message-proxy:dead-letter", "maxlen": 1000000}],
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    def stream_routes(self) -> list[str]:
        return [r.name for r in self.routes if any(isinstance(d, StreamDestination) for d in r.to)]

    def exchange_routes(self) -> list[str]:
        return [
            r.name for r in self.routes if any(isinstance(d, ExchangeDestination) for d in r.to)
        ]

    def uses_streams(self) -> bool:
        dead_letter_stream = self.dead_letter is not None and self.dead_letter.stream is not None
        return bool(self.stream_routes()) or dead_letter_stream

    def declared_exchanges(self) -> list[str]:
        """Exchange destinations with ``declare = true``, in file order, each once."""
        names = [
            declared_name(d.exchange)
            for route in self.routes
            for d in route.to
            if isinstance(d, ExchangeDestination) and d.declare
        ]
        if self.dead_letter is not None and self.dead_letter.declare:
            names.append(declared_name(self.dead_letter.exchange or ""))
        return list(dict.fromkeys(names))

    def stream_sources(self) -> list[Source]:
        return [source for source in self.sources if source.is_stream]

    def needs_redis(self) -> bool:
        """Stream destinations write to Redis; stream sources keep their offsets there."""
        return self.uses_streams() or bool(self.stream_sources())

    def first_stream_key(self) -> str:
        """The key of the first thing that needs Redis, for messages about it."""
        for index, route in enumerate(self.routes):
            for position, destination in enumerate(route.to):
                if isinstance(destination, StreamDestination):
                    return f"routes[{index}].to[{position}]"
        if self.dead_letter is not None and self.dead_letter.stream is not None:
            return "dead_letter.stream"
        streams = [index for index, source in enumerate(self.sources) if source.is_stream]
        return f"sources[{streams[0]}]" if streams else "dead_letter.stream"

    def first_exchange_key(self) -> str:
        """The key of the first exchange destination, for messages about it."""
        for index, route in enumerate(self.routes):
            for position, destination in enumerate(route.to):
                if isinstance(destination, ExchangeDestination):
                    return f"routes[{index}].to[{position}]"
        return "dead_letter.exchange"

    def uses_exchanges(self) -> bool:
        dead_letter_exchange = (
            self.dead_letter is not None and self.dead_letter.exchange is not None
        )
        return bool(self.exchange_routes()) or dead_letter_exchange


# --- loading ---------------------------------------------------------------------------------


def _env_value(raw: str) -> Any:
    """A value that parses as TOML (8001, true, [..]) is that value; anything else is a string."""
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env_overrides(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Returns the merged data and, for each overridden key path, the variable that set it."""
    merged = {
        key: (dict(value) if isinstance(value, dict) else value) for key, value in data.items()
    }
    origins: dict[tuple[str, ...], str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS:
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            raise ConfigError(name, "malformed override; use MESSAGE_PROXY_<SECTION>__<KEY>")
        table = merged
        for depth, part in enumerate(path[:-1]):
            child = table.setdefault(part, {})
            if not isinstance(child, dict):
                key = ".".join(path[: depth + 1])
                variable = ENV_PREFIX + "__".join(path[: depth + 1]).upper()
                raise ConfigError(
                    key,
                    f"{name} cannot set a key inside {key}, which is not a table "
                    f"(an array can only be replaced whole, with {variable})",
                )
            table = child
        table[path[-1]] = _env_value(environ[name])
        origins[path] = name
    return merged, origins


def _check_unique_route_names(config: Config) -> None:
    seen: dict[str, int] = {}
    duplicates: list[tuple[str, str]] = []
    for index, route in enumerate(config.routes):
        if route.name in seen:
            duplicates.append(
                (
                    f"routes[{index}].name",
                    f"duplicate route name {route.name!r} (also routes[{seen[route.name]}])",
                )
            )
        seen.setdefault(route.name, index)
    if duplicates:
        raise ConfigError.of(duplicates)


def amqp_vhost(settings: AmqpSettings) -> str:
    """The vhost of the AMQP URLs (one for every node), as the connection reads it."""
    return _vhost_of(settings.urls()[0])


def _check_stream_sources(config: Config) -> None:
    problems: list[tuple[str, str]] = []
    keys: dict[str, int] = {}
    vhost = amqp_vhost(config.amqp)
    for index, source in enumerate(config.sources):
        if not source.is_stream:
            continue
        if config.dead_letter is None and config.unrouted != "drop":
            problems.append(
                (
                    f"sources[{index}]",
                    f"queue {source.queue!r} is a stream queue, which cannot reject a message "
                    "(RabbitMQ closes the connection): add a [dead_letter] destination or set "
                    'unrouted = "drop"',
                )
            )
        key = source.offset_key_in(vhost)
        if key in keys:
            problems.append(
                (
                    f"sources[{index}].offset_key",
                    f"offset key {key!r} is also sources[{keys[key]}]'s: each stream source "
                    "needs its own",
                )
            )
        keys.setdefault(key, index)
    if problems:
        raise ConfigError.of(problems)


def parse_config(data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    merged, origins = apply_env_overrides(dict(data), os.environ if environ is None else environ)
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError.of(validation_problems(exc, Config, data, origins)) from None
    _check_unique_route_names(config)
    config.redis.check_modes()
    _check_stream_sources(config)
    return config


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{file} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(file), f"not valid TOML: {exc}") from None
    return parse_config(data, environ)


def config_path(cli_value: str | None, environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    path = cli_value or env.get("MESSAGE_PROXY_CONFIG")
    if not path:
        raise ConfigError(
            "--config", "no config file given (--config FILE or MESSAGE_PROXY_CONFIG)"
        )
    return path
