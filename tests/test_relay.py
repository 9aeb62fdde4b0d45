"""The exchange relay end to end: real RabbitMQ, the worker as users run it.

Every relay here runs with ``redis`` made unimportable (a ``sitecustomize`` on its path): the
relay role must work where redis is not installed, and any import of it would crash the worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from tests.helpers import (
    AMQP_URL,
    REPO,
    WorkerProcess,
    amqp_url_via,
    async_wait_for,
    delete_keys,
    json_message,
    publish,
    queue_depth,
    run_cli,
    stream_entries,
    stream_length,
    stream_message_ids,
    unique,
)
from tests.tcp_proxy import TcpProxy

HOPS = "x-message-proxy-hops"
PROPERTY_NAMES = [n for n in spec.Basic.Properties.__slots__ if n != "headers"]

NO_REDIS = """
import sys

class _NoRedis:
    def find_spec(self, name, path=None, target=None):
        if name == "redis" or name.startswith("redis."):
            with open({log!r}, "a") as log:
                log.write(name + "\\n")
            raise ImportError("redis is not installed for the exchange relay")
        return None

sys.meta_path.insert(0, _NoRedis())
"""


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def names() -> dict[str, str]:
    return {
        "queue": unique("q"),  # the relay's source queue
        "source": unique("x-src"),  # bound to the source queue
        "target": unique("x-dst"),  # where the relay publishes
        "out": unique("q-out"),  # bound to the target exchange
        "control": unique("q-ctl"),  # a copy of what the relay consumed, as RabbitMQ has it
        "dlx": unique("x-dead"),
        "dead": unique("q-dead"),
        "stream": unique("s"),
        "dead_stream": unique("s-dead"),
    }


@pytest.fixture
async def topology(names: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for exchange in ("source", "target", "dlx"):
            await channel.declare_exchange(names[exchange], "topic", durable=True)
        for queue, exchange, key in (("out", "target", "ok.#"), ("dead", "dlx", "#")):
            q = await channel.declare_queue(names[queue], durable=True)
            await q.bind(names[exchange], key)
        await channel.declare_queue(names["control"], durable=True)  # bound where needed
        yield names
        for queue in ("queue", "out", "control", "dead"):
            await channel.queue_delete(names[queue])
        for exchange in ("source", "target", "dlx"):
            await channel.exchange_delete(names[exchange])
    await delete_keys(names["stream"], names["dead_stream"])


@pytest.fixture
def relay_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a relay process in which importing redis fails (and is recorded)."""
    site = tmp_path / "no-redis"
    site.mkdir()
    attempts = tmp_path / "redis-imports.log"
    (site / "sitecustomize.py").write_text(NO_REDIS.format(log=str(attempts)))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    yield {"PYTHONPATH": path}
    assert not attempts.exists(), f"the relay imported {attempts.read_text()!r}"


def relay_config(names: dict[str, str], routes: str, *, head: str = "", tail: str = "") -> str:
    return f"""
{head}
[batch]
max_messages = 200
max_delay_ms = 5

[[sources]]
queue = "{names["queue"]}"
bindings = [ {{ exchange = "{names["source"]}", routing_key = "#" }} ]

{routes}

[dead_letter]
exchange = "{names["dlx"]}"
routing_key = "dead.{{routing_key}}"
{tail}
"""


def relay(config: str, tmp_path: Path, env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess(config, tmp_path, module="workers.exchange_relay", args=(), env=env)


async def bind_control(names: dict[str, str]) -> None:
    """From now on the control queue gets a copy of everything the relay consumes."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(names["control"], passive=True)
        await queue.bind(names["source"], "#")


class Collector:
    """Consumes a queue in the background and keeps every delivery as RabbitMQ sent it."""

    def __init__(self, queue: str, url: str = AMQP_URL) -> None:
        self.queue = queue
        self.url = url
        self.messages: list[DeliveredMessage] = []
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._triggers: dict[int, Callable[[], None]] = {}

    def when(self, count: int, action: Callable[[], None]) -> None:
        """Run ``action`` the moment the ``count``-th message arrives: a fault mid-flow."""
        self._triggers[count] = action

    async def __aenter__(self) -> Collector:
        self._connection = await aio_pika.connect(self.url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=2000)
        raw = await channel.get_underlay_channel()
        await raw.basic_consume(self.queue, self._on_message, no_ack=True)
        return self

    async def _on_message(self, message: DeliveredMessage) -> None:
        self.messages.append(message)
        action = self._triggers.pop(len(self.messages), None)
        if action is not None:
            action()

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    def ids(self) -> list[str]:
        return [m.header.properties.message_id or "" for m in self.messages]

    async def at_least(self, count: int, within: float = 20.0) -> list[DeliveredMessage]:
        await async_wait_for(
            lambda: len(self.messages) >= count, within=within, what=f"{count} on {self.queue}"
        )
        return self.messages


async def publish_bare(exchange: str, routing_key: str, body: bytes) -> None:
    """A message with no properties at all (aiormq's basic_publish always adds a message_id)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        assert isinstance(raw, aiormq.Channel)
        number = raw.number
        payload = (
            pamqp_frame.marshal(
                spec.Basic.Publish(exchange=exchange, routing_key=routing_key), number
            )
            + pamqp_frame.marshal(ContentHeader(0, len(body), spec.Basic.Properties()), number)
            + pamqp_frame.marshal(ContentBody(body), number)
        )
        await raw.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        await raw.basic_qos(prefetch_count=0)  # a round trip: the publish was taken


def props(message: DeliveredMessage) -> spec.Basic.Properties:
    return message.header.properties


def headers(message: DeliveredMessage) -> dict[str, Any]:
    return dict(props(message).headers or {})


def everything_but_headers(message: DeliveredMessage) -> dict[str, Any]:
    return {name: getattr(props(message), name) for name in PROPERTY_NAMES}


# --- the relay ---------------------------------------------------------------------------------


@pytest.mark.broker
async def test_every_property_and_header_arrives_unchanged(
    tmp_path: Path, topology: dict[str, str], relay_env: dict[str, str]
) -> None:
    names = topology
    routes = f"""
[[routes]]
name = "relay"
to = [ {{ exchange = "{names["target"]}", routing_key = "ok.{{routing_key}}" }} ]
"""
    full = aio_pika.Message(
        b"\x00\xff binary body",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type="application/octet-stream",
        content_encoding="gzip",
        message_id="m-full",
        correlation_id="c-1",
        timestamp=datetime(2026, 11, 28, 12, 0, 5, tzinfo=UTC),
        type="order.created",
        app_id="shop",
        user_id="guest",
        expiration=600,
        priority=7,
        reply_to="replies",
        headers={
            "tenant": "acme",
            "count": 42,
            "big": 2**40,
            "ratio": 0.25,
            "flag": True,
            "none": None,
            "price": Decimal("12.50"),
            "when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            "raw": bytearray(b"\xff\x00"),
            "nested": {"list": [1, "two", [3.5]]},
        },
    )
    relayed_before = aio_pika.Message(b"again", message_id="m-hops", headers={HOPS: 3})
    await bind_control(names)
    with relay(relay_config(names, routes), tmp_path, relay_env) as worker:
        async with Collector(names["out"]) as out, Collector(names["control"]) as control:
            await publish(
                [(full, "order.created"), (relayed_before, "again")], exchange=names["source"]
            )
            await publish_bare(names["source"], "bare", b"no properties: none may be invented")
            arrived = await out.at_least(3)
            sent = await control.at_least(3)
        assert worker.stop() == 0
    by_key = {m.delivery.routing_key: m for m in arrived}  # type: ignore[union-attr]
    assert set(by_key) == {"ok.order.created", "ok.bare", "ok.again"}
    (bare,) = [m for m in sent if m.delivery.routing_key == "bare"]  # type: ignore[union-attr]
    for original in sent:
        key = original.delivery.routing_key  # type: ignore[union-attr]
        copy = by_key[f"ok.{key}"]
        assert copy.body == original.body
        assert everything_but_headers(copy) == everything_but_headers(original)
        hops = int(headers(original).get(HOPS, 0)) + 1
        assert headers(copy) == {**headers(original), HOPS: hops}
    assert everything_but_headers(by_key["ok.bare"]) == everything_but_headers(bare)
    assert all(v in (None, "") for v in everything_but_headers(bare).values())
    assert headers(by_key["ok.bare"]) == {HOPS: 1}
    assert headers(by_key["ok.again"])[HOPS] == 4
    assert headers(by_key["ok.order.created"])["ratio"] == 0.25


@pytest.mark.broker
async def test_a_loop_stops_at_eight_hops_with_a_loop_dead_letter(
    tmp_path: Path, topology: dict[str, str], relay_env: dict[str, str]
) -> None:
    names = topology
    routes = f"""
[[routes]]
name = "boomerang"
to = [ {{ exchange = "{names["source"]}", routing_key = "{{routing_key}}" }} ]
"""
    await bind_control(names)
    with relay(relay_config(names, routes), tmp_path, relay_env) as worker:
        async with Collector(names["dead"]) as dead, Collector(names["control"]) as control:
            await publish(
                [(json_message({"n": 1}, message_id="looper"), "loop.me")],
                exchange=names["source"],
            )
            (letter,) = await dead.at_least(1)
            await asyncio.sleep(0.3)
            assert len(dead.messages) == 1
            passes = [headers(m).get(HOPS, 0) for m in control.messages]
        assert worker.stop() == 0
    assert passes == list(range(9))  # published once, then relayed back 8 times
    assert headers(letter)["x-message-proxy-error"] == "loop"
    assert "relayed 8 times" in headers(letter)["x-message-proxy-detail"]
    assert headers(letter)[HOPS] == 9
    assert props(letter).message_id == "looper"
    assert letter.delivery.routing_key == "dead.loop.me"  # type: ignore[union-attr]
    assert await queue_depth(names["queue"]) == 0


@pytest.mark.broker
async def test_unroutable_is_dead_lettered_and_the_relay_keeps_going(
    tmp_path: Path, topology: dict[str, str], relay_env: dict[str, str]
) -> None:
    names = topology
    routes = f"""
[[routes]]
name = "lost"
match.routing_key = "lost.#"
to = [ {{ exchange = "{names["target"]}", routing_key = "nobody.{{routing_key}}" }} ]

[[routes]]
name = "ok"
to = [ {{ exchange = "{names["target"]}", routing_key = "ok.{{routing_key}}" }} ]
"""
    messages = []
    for i in range(300):
        key = f"lost.{i}" if i % 30 == 0 else f"n.{i}"
        messages.append((json_message({"i": i}, message_id=str(i)), key))
    with relay(relay_config(names, routes), tmp_path, relay_env) as worker:
        async with Collector(names["out"]) as out, Collector(names["dead"]) as dead:
            await publish(messages[:150], exchange=names["source"])
            await dead.at_least(5)
            await publish(messages[150:], exchange=names["source"])  # later ones still relayed
            await out.at_least(290)
            await dead.at_least(10)
            assert worker.get("/ready")[0] == 200
            metrics = worker.metrics()
        assert worker.stop() == 0
    assert sorted(out.ids(), key=int) == [str(i) for i in range(300) if i % 30]
    assert sorted(dead.ids(), key=int) == [str(i) for i in range(0, 300, 30)]
    letter = dead.messages[0]
    assert headers(letter)["x-message-proxy-error"] == "unroutable"
    assert headers(letter)["x-message-proxy-route"] == "lost"
    assert names["target"] in headers(letter)["x-message-proxy-detail"]
    assert "NO_ROUTE" in headers(letter)["x-message-proxy-detail"]
    assert 'message_proxy_messages_dead_lettered_total{reason="unroutable"} 10.0' in metrics
    assert await queue_depth(names["queue"]) == 0


@pytest.mark.broker
async def test_dead_letters_go_to_the_configured_exchange(
    tmp_path: Path, topology: dict[str, str], relay_env: dict[str, str]
) -> None:
    names = topology
    routes = f"""
[[routes]]
name = "tenants"
match.routing_key = "t.#"
to = [ {{ exchange = "{names["target"]}", routing_key = "ok.{{headers.tenant}}" }} ]
"""
    stamp = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)
    with relay(relay_config(names, routes), tmp_path, relay_env) as worker:
        async with Collector(names["dead"]) as dead, Collector(names["out"]) as out:
            await publish(
                [
                    (json_message({}, message_id="no-route", timestamp=stamp), "u.1"),
                    (json_message({}, message_id="no-tenant", headers={"a": 1}), "t.1"),
                    (json_message({}, message_id="fine", headers={"tenant": "acme"}), "t.2"),
                ],
                exchange=names["source"],
            )
            letters = {m.header.properties.message_id: m for m in await dead.at_least(2)}
            await out.at_least(1)
        assert worker.stop() == 0
    unrouted, template = letters["no-route"], letters["no-tenant"]
    assert unrouted.delivery.routing_key == "dead.u.1"  # type: ignore[union-attr]
    assert headers(unrouted)["x-message-proxy-error"] == "unrouted"
    assert "x-message-proxy-route" not in headers(unrouted)
    assert isinstance(headers(unrouted)["x-message-proxy-failed-at"], int)
    assert props(unrouted).timestamp == stamp and props(unrouted).delivery_mode == 2
    assert unrouted.body == b"{}"
    assert headers(template)["x-message-proxy-error"] == "template"
    assert headers(template)["x-message-proxy-route"] == "tenants"
    assert headers(template)["a"] == 1
    assert out.ids() == ["fine"]


@pytest.mark.broker
@pytest.mark.slow
async def test_a_broker_restart_mid_flow_loses_nothing(
    tmp_path: Path, topology: dict[str, str], relay_env: dict[str, str]
) -> None:
    """Both the consuming and the publishing connection go through a fault proxy."""
    names = topology
    count = 12_000
    routes = f"""
[[routes]]
name = "relay"
to = [ {{ exchange = "{names["target"]}", routing_key = "ok.{{routing_key}}" }} ]
"""
    numbered = [(json_message({"n": i}, message_id=str(i)), "n") for i in range(count)]
    # The test publishes straight to RabbitMQ; only the worker goes through the proxy.
    with TcpProxy("127.0.0.1", 5672) as proxy:
        url = amqp_url_via(proxy.port)
        head = f'[amqp]\nurl = "{url}"\nprefetch = 1000\n\n[amqp_out]\nurl = "{url}"\n'
        config = relay_config(names, routes, head=head)
        async with Collector(names["out"]) as out:
            with relay(config, tmp_path, relay_env) as worker:
                quarter = count // 4
                # Faults strike as the collector sees these counts, with the rest in flight.
                out.when(quarter // 2, proxy.reset_connections)  # a broker restart
                out.when(quarter + quarter // 2, proxy.cut)  # a restart that takes a while
                await publish(numbered[: 2 * quarter], exchange=names["source"])
                await out.at_least(quarter + quarter // 2, within=30)
                await async_wait_for(lambda: worker.get("/ready")[0] == 503, within=5)
                await publish(numbered[2 * quarter :], exchange=names["source"])
                await asyncio.sleep(1.0)
                during_outage = len(out.messages)
                proxy.heal()
                healed = time.monotonic()
                await async_wait_for(
                    lambda: len(set(out.ids())) >= count, within=60, what="every message"
                )
                recovered = time.monotonic() - healed
                await async_wait_for(lambda: worker.get("/ready")[0] == 200, within=10)
                await async_wait_for(_empty(names["queue"]), within=10, what="source drained")
                metrics = worker.metrics()
                assert worker.stop() == 0
            await asyncio.sleep(0.5)  # whatever the drain published before exit
        ids = out.ids()
    duplicates = len(ids) - len(set(ids))
    print(
        f"\nrelay through two broker restarts: {count} messages, {len(set(ids))} distinct, "
        f"{duplicates} duplicates ({Counter(Counter(ids).values())} by copies); "
        f"{during_outage} relayed by the end of the outage; "
        f"all in {recovered:.1f}s after the broker came back"
    )
    assert set(ids) == {str(i) for i in range(count)}
    assert 'message_proxy_reconnects_total{broker="amqp"}' in metrics


def _empty(queue: str) -> Any:
    async def check() -> bool:
        return await queue_depth(queue) == 0

    return check


# --- fan-out across kinds (the full worker, with Redis) ----------------------------------------


@pytest.mark.broker
@pytest.mark.slow
async def test_stream_and_exchange_both_receive_every_message(
    tmp_path: Path, topology: dict[str, str]
) -> None:
    names = topology
    count = 10_000
    routes = f"""
[[routes]]
name = "both"
to = [
  {{ stream = "{names["stream"]}" }},
  {{ exchange = "{names["target"]}", routing_key = "ok.{{routing_key}}" }},
]
"""
    config = relay_config(names, routes).replace("max_messages = 200", "max_messages = 500")
    async with Collector(names["out"]) as out:
        with WorkerProcess(config, tmp_path) as worker:
            await publish(
                [(json_message({"n": i}, message_id=str(i)), "n") for i in range(count)],
                exchange=names["source"],
                confirm_every=5000,
            )
            await out.at_least(count, within=60)
            await async_wait_for(_stream_has(names["stream"], count), within=30)
            metrics = worker.metrics()
            assert worker.stop() == 0
    expected = {str(i) for i in range(count)}
    assert set(out.ids()) == expected
    assert set(await stream_message_ids(names["stream"])) == expected
    assert f'destination="{names["target"]}",route="both"}} {float(count)}' in metrics


@pytest.mark.broker
async def test_a_refusal_on_one_kind_dead_letters_naming_that_destination(
    tmp_path: Path, topology: dict[str, str]
) -> None:
    names = topology
    routes = f"""
[[routes]]
name = "both"
to = [
  {{ stream = "{names["stream"]}" }},
  {{ exchange = "{names["target"]}", routing_key = "{{routing_key}}" }},
]
"""
    config = relay_config(names, routes).split("[dead_letter]")[0] + (
        f'[dead_letter]\nstream = "{names["dead_stream"]}"\n'
    )
    with WorkerProcess(config, tmp_path) as worker:
        async with Collector(names["out"]) as out:
            await publish(
                [
                    (json_message({}, message_id="routed"), "ok.1"),
                    (json_message({}, message_id="returned"), "nobody.1"),
                ],
                exchange=names["source"],
            )
            await out.at_least(1)
            await async_wait_for(_stream_has(names["dead_stream"], 1), within=10)
        assert worker.stop() == 0
    (letter,) = await stream_entries(names["dead_stream"])
    assert letter[b"message_id"] == b"returned"
    assert letter[b"error"] == b"unroutable"
    assert letter[b"route"] == b"both"
    assert f"exchange '{names['target']}'".encode() in letter[b"detail"]
    assert out.ids() == ["routed"]
    assert await stream_length(names["stream"]) == 2  # the stream took both


def _stream_has(stream: str, count: int) -> Any:
    async def check() -> bool:
        return await stream_length(stream) >= count

    return check


# --- the role ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("routes", "dead_letter", "named"),
    [
        pytest.param(
            '[[routes]]\nname = "to-redis"\nto = [ { stream = "s" } ]',
            '[dead_letter]\nexchange = "dlx"',
            "route 'to-redis'",
            id="stream-route",
        ),
        pytest.param(
            '[[routes]]\nname = "mixed"\nto = [ { exchange = "x" }, { stream = "s" } ]',
            "",
            "route 'mixed'",
            id="mixed-route",
        ),
        pytest.param(
            '[[routes]]\nname = "fine"\nto = [ { exchange = "x" } ]',
            '[dead_letter]\nstream = "dead"',
            "dead_letter.stream",
            id="stream-dead-letter",
        ),
    ],
)
def test_the_relay_refuses_stream_destinations(
    tmp_path: Path, routes: str, dead_letter: str, named: str
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[[sources]]\nqueue = "q"\n\n{routes}\n\n{dead_letter}\n')
    result = run_cli(["--config", str(config)], module="workers.exchange_relay")
    assert result.returncode == 2, result.stderr
    assert named in result.stderr


def test_the_relay_never_imports_redis(tmp_path: Path) -> None:
    """Load the config and build every worker object the relay builds; redis stays out."""
    config = tmp_path / "relay.toml"
    config.write_text(
        '[[sources]]\nqueue = "q"\n\n[[routes]]\nname = "r"\nto = [ { exchange = "x" } ]\n'
        '\n[dead_letter]\nexchange = "dlx"\n'
    )
    script = f"""
import sys
import workers.exchange_relay
from prometheus_client import CollectorRegistry
from proxy.config import load_config
from proxy.metrics import Metrics
from proxy.state import HealthState
from proxy.worker import Worker

config = load_config({str(config)!r})
metrics = Metrics(CollectorRegistry(), role="exchange-relay", version="0")
worker = Worker(config, role="exchange-relay", metrics=metrics, health=HealthState())
print(sorted(type(s).__name__ for s in worker.sinks.values()))
print(sorted(name for name in sys.modules if name.split(".")[0] == "redis"))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['AmqpExchangeSink']", "[]"]


@pytest.mark.broker
async def test_sigterm_drains_and_exits_zero(
    tmp_path: Path, topology: dict[str, str], relay_env: dict[str, str]
) -> None:
    names = topology
    routes = f"""
[[routes]]
name = "relay"
to = [ {{ exchange = "{names["target"]}", routing_key = "ok.{{routing_key}}" }} ]
"""
    worker = relay(relay_config(names, routes), tmp_path, relay_env).start()
    try:
        await publish(
            [(json_message({"n": i}, message_id=str(i)), "n") for i in range(2000)],
            exchange=names["source"],
        )
        worker.signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        worker.kill()
    # Whatever was not relayed is still in the source queue: nothing acked without a confirm.
    relayed = await queue_depth(names["out"])
    assert relayed + await queue_depth(names["queue"]) >= 2000
    assert "stopped" in worker.logs()
