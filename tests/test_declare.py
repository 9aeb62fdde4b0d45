"""``declare = true`` on exchange destinations: checked at start, declared on connect, and the
shipped relay config running against a RabbitMQ that has none of its exchanges."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError
from tests.helpers import (
    AMQP_URL,
    REPO,
    WorkerProcess,
    async_wait_for,
    json_message,
    publish,
    unique,
)

RELAY_EXAMPLE = REPO / "docker/config/exchange-relay.toml"
BASE = {"sources": [{"queue": "q"}]}


def config_with(destination: dict[str, Any], dead_letter: dict[str, Any] | None = None) -> Any:
    data: dict[str, Any] = {**BASE, "routes": [{"name": "r", "to": [destination]}]}
    if dead_letter is not None:
        data["dead_letter"] = dead_letter
    return parse_config(data, environ={})


@pytest.mark.parametrize(
    ("destination", "dead_letter", "key", "problem"),
    [
        pytest.param(
            {"exchange": "audit-{headers.tenant}", "declare": True}, None,
            "routes[0].to[0].declare", "has placeholders", id="placeholder",
        ),
        pytest.param(
            {"exchange": "", "declare": True}, None,
            "routes[0].to[0].declare", "default exchange", id="default-exchange",
        ),
        pytest.param(
            {"exchange": "amq.topic", "declare": True}, None,
            "routes[0].to[0].declare", "amq.* names", id="reserved",
        ),
        pytest.param(
            {"exchange": "x"}, {"stream": "dead", "declare": True},
            "dead_letter.declare", "needs 'exchange'", id="dead-letter-stream",
        ),
        pytest.param(
            {"exchange": "x"}, {"exchange": "dead.{queue}", "declare": True},
            "dead_letter.declare", "has placeholders", id="dead-letter-placeholder",
        ),
    ],
)  # fmt: skip
def test_declare_needs_a_fixed_name(
    destination: dict[str, Any], dead_letter: dict[str, Any] | None, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config_with(destination, dead_letter)
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_declared_exchanges_are_listed_once_in_file_order() -> None:
    config = parse_config(
        {
            **BASE,
            "routes": [
                {"name": "a", "to": [{"exchange": "b-x", "declare": True}, {"exchange": "n"}]},
                {"name": "b", "to": [{"exchange": "a-{{literal}}", "declare": True}]},
                {"name": "c", "to": [{"exchange": "b-x", "declare": True}]},
            ],
            "dead_letter": {"exchange": "dead", "declare": True},
        },
        environ={},
    )
    assert config.declared_exchanges() == ["b-x", "a-{literal}", "dead"]


# --- against RabbitMQ ---------------------------------------------------------------------------


@pytest.fixture
async def example_names() -> AsyncIterator[dict[str, str]]:
    """Unique stand-ins for the names the shipped relay config uses; deleted afterwards."""
    names = {
        "events-audit": unique("q-events-audit"),
        "app": unique("x-app"),
        "audit": unique("x-audit"),
        "dead-letter": unique("x-dead-letter"),
        "out": unique("q-audit"),
    }
    yield names
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in (names["events-audit"], names["out"]):
            await channel.queue_delete(queue)
        for exchange in ("app", "audit", "dead-letter"):
            await channel.exchange_delete(names[exchange])


async def exchange_exists(name: str) -> bool:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
    return True


@pytest.mark.broker
async def test_the_shipped_relay_config_runs_against_a_bare_rabbitmq(
    tmp_path: Path, example_names: dict[str, str]
) -> None:
    """None of its exchanges exist; the worker declares them, and a message goes through."""
    names = example_names
    text = RELAY_EXAMPLE.read_text()
    text = text.replace('queue = "events-audit"', f'queue = "{names["events-audit"]}"')
    for original in ("app", "audit", "dead-letter"):
        text = text.replace(f'exchange = "{original}"', f'exchange = "{names[original]}"')
    assert tomllib.loads(text)["routes"][0]["to"][0]["exchange"] == names["audit"]
    for exchange in ("app", "audit", "dead-letter"):
        assert not await exchange_exists(names[exchange])
    env = {"MESSAGE_PROXY_AMQP__URL": AMQP_URL}
    with WorkerProcess(text, tmp_path, module="workers.exchange_relay", args=(), env=env) as relay:
        for exchange in ("app", "audit", "dead-letter"):
            assert await exchange_exists(names[exchange]), exchange
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            out = await channel.declare_queue(names["out"], durable=True)
            await out.bind(names["audit"], "#")
            await publish([(json_message({"n": 1}, message_id="one"), "order.created")],
                          exchange=names["app"])  # fmt: skip

            async def relayed() -> aio_pika.abc.AbstractIncomingMessage | None:
                return await out.get(no_ack=True, fail=False)

            message = await async_wait_for(relayed, within=10, what="the relayed message")
        assert relay.stop() == 0
    assert message.message_id == "one" and message.routing_key == "order.created"
    assert message.headers["x-message-proxy-hops"] == 1
