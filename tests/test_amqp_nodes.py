"""Which node a worker connects to next: the shuffled order and when the backoff waits. Pure."""

from __future__ import annotations

import random

import pytest
from pydantic import SecretStr

from proxy.amqp.endpoint import Endpoint
from proxy.amqp.nodes import STABLE_AFTER_S, Node, NodeRotation, nodes_of
from proxy.config import AmqpSettings


def nodes(count: int) -> list[Node]:
    return [
        Node(Endpoint.from_url(f"amqp://u:p@n{i}:5672/", heartbeat=10), f"amqp://u:***@n{i}:5672/")
        for i in range(1, count + 1)
    ]


def keep_order(_: list[Node]) -> None:
    pass


@pytest.mark.parametrize(
    ("count", "events", "tried", "backoffs"),
    [
        pytest.param(1, "fff", "n1 n1 n1 n1", [True, True, True], id="one-node-backs-off-always"),
        pytest.param(3, "fff", "n1 n2 n3 n1", [False, False, True], id="a-round-then-backoff"),
        pytest.param(3, "ffffff", "n1 n2 n3 n1 n2 n3 n1", [False, False, True] * 2,
                     id="rounds-repeat"),
        pytest.param(3, "cf", "n1 n1 n2", [False], id="a-lost-node-moves-on-at-once"),
        pytest.param(3, "ffcfff", "n1 n2 n3 n3 n1 n2 n3", [False, False, False, False, True],
                     id="a-connection-that-worked-starts-a-new-round"),
        pytest.param(2, "fcfcf", "n1 n2 n2 n1 n1 n2", [False, False, False],
                     id="moves-between-two"),
        pytest.param(3, "dfdfdf", "n1 n1 n2 n2 n3 n3 n1", [False, False, True],
                     id="dropped-at-once-is-a-failure-not-a-new-round"),
        pytest.param(3, "cfdfdf", "n1 n1 n2 n2 n3 n3 n1", [False, False, True],
                     id="the-round-after-a-good-connection"),
    ],
)  # fmt: skip
def test_each_node_once_before_the_backoff(
    count: int, events: str, tried: str, backoffs: list[bool]
) -> None:
    """``f``: the current node failed (lost or refused); ``c``: it connected, and stayed up;
    ``d``: it connected and was dropped at once."""
    now = [0.0]
    rotation = NodeRotation(nodes(count), shuffle=keep_order, clock=lambda: now[0])
    seen = [rotation.current.endpoint.host]
    waits = []
    for event in events:
        if event in "cd":
            rotation.connected()
            now[0] += STABLE_AFTER_S if event == "c" else STABLE_AFTER_S / 10
        else:
            waits.append(rotation.failed())
            now[0] += 0.01
        seen.append(rotation.current.endpoint.host)
    assert seen == tried.split()
    assert waits == backoffs


def test_every_process_shuffles_its_own_order() -> None:
    orders = {
        tuple(n.address for n in NodeRotation(nodes(3), shuffle=random.Random(seed).shuffle).order)
        for seed in range(40)
    }
    assert len(orders) == 6  # every order of 3 nodes comes up: replicas spread over the nodes
    assert all(sorted(order) == ["n1:5672", "n2:5672", "n3:5672"] for order in orders)


def test_an_empty_rotation_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        NodeRotation([])


@pytest.mark.parametrize(
    ("url", "address"),
    [
        pytest.param("amqp://u:p@rabbit-1:5673/%2F", "rabbit-1:5673", id="host-port"),
        pytest.param("amqps://u:p@rabbit-1/%2F", "rabbit-1:5671", id="tls-default-port"),
        pytest.param("amqp://u:p@[::1]:5672/", "[::1]:5672", id="ipv6"),
    ],
)
def test_a_node_is_named_by_host_and_port_only(url: str, address: str) -> None:
    (node,) = nodes_of(AmqpSettings(url=SecretStr(url)))
    assert node.address == address
    assert "p@" not in node.shown and ":***@" in node.shown
