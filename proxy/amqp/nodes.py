"""Which RabbitMQ node to connect to next: the configured URLs in a per-process shuffled order.

Every worker process shuffles the list once, so the replicas of a deployment spread over the
nodes instead of all landing on the first. A connection lost or refused moves on to the next node
at once; only when every node failed in a row does the caller wait its backoff, and a connection
that worked starts the count again. One URL behaves as before: every failure backs off.

A connection "worked" once it stayed up ``STABLE_AFTER_S``: one that every node accepts and then
drops at once counts as a failure, so such a cluster costs a backoff per round instead of a
reconnect loop with no pause at all.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.amqp.connection import AmqpConnection
from proxy.amqp.endpoint import Endpoint
from proxy.config import AmqpSettings, display_url
from proxy.errors import AmqpError

STABLE_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class Node:
    endpoint: Endpoint
    shown: str  # the URL with its password masked, for log lines

    @property
    def address(self) -> str:
        return self.endpoint.address


def nodes_of(settings: AmqpSettings) -> tuple[Node, ...]:
    """One ``Node`` per configured URL, in the order written."""
    return tuple(
        Node(
            Endpoint.from_url(url.get_secret_value(), heartbeat=settings.heartbeat),
            display_url(url),
        )
        for url in settings.urls()
    )


class NodeRotation:
    """The nodes in this process's order, and the one to try now."""

    def __init__(
        self,
        nodes: Sequence[Node],
        *,
        shuffle: Callable[[list[Node]], None] = random.shuffle,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not nodes:
            raise ValueError("a rotation needs at least one node")
        order = list(nodes)
        shuffle(order)
        self._order = tuple(order)
        self._index = 0
        self._failures = 0  # in a row, since the last connection that worked
        self._clock = clock
        self._up_since: float | None = None

    @property
    def order(self) -> tuple[Node, ...]:
        return self._order

    @property
    def current(self) -> Node:
        return self._order[self._index]

    def connected(self) -> None:
        """Connected to the current node: if it stays up ``STABLE_AFTER_S``, its loss starts a
        new round."""
        self._up_since = self._clock()

    def failed(self) -> bool:
        """The current node was lost or refused: move on to the next. True when that completes a
        round in which every node failed: the caller waits its backoff before the next try."""
        up_since, self._up_since = self._up_since, None
        if up_since is not None and self._clock() - up_since >= STABLE_AFTER_S:
            self._failures = 0
        self._index = (self._index + 1) % len(self._order)
        self._failures += 1
        if self._failures < len(self._order):
            return False
        self._failures = 0
        return True


async def open_first(settings: AmqpSettings, *, connection_name: str) -> AmqpConnection:
    """A connection to the first node, in the order written, that accepts one within
    ``connect_timeout``: for the command-line tools, which connect once. Raises the last
    node's failure when none does."""
    failure: BaseException | None = None
    for node in nodes_of(settings):
        try:
            async with asyncio.timeout(settings.connect_timeout):
                return await AmqpConnection.open(node.endpoint, connection_name=connection_name)
        except Exception as exc:  # refused, reset, TLS, timeout: the next node
            failure = exc
    raise failure if failure is not None else AmqpError("no node to connect to")
