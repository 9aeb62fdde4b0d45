"""What the event loop knows about itself, published for the sidecar thread.

The loop writes; the sidecar only reads. Every write replaces one immutable ``Snapshot`` (a single
reference assignment, atomic under the GIL), so the reader never sees a half-updated state and never
has to call into the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

Clock = Callable[[], float]

LIVENESS_THRESHOLD_S = 5.0


@dataclass(frozen=True, slots=True)
class BrokerState:
    up: bool
    since: float  # monotonic time of the last change
    detail: str = ""  # why it is down, never a secret
    node: str = ""  # host:port of the node connected to (when down: last tried); "" if not one


@dataclass(frozen=True, slots=True)
class Snapshot:
    started_at: float
    heartbeat_at: float
    brokers: Mapping[str, BrokerState] = field(default_factory=lambda: MappingProxyType({}))
    consumers: int = 0
    expected_consumers: int = 0
    last_flush_at: float | None = None
    stopping: bool = False
    # What else holds the flow, by component (``dead_letter``: its destination refuses).
    held: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def is_alive(self, now: float, threshold: float = LIVENESS_THRESHOLD_S) -> bool:
        return now - self.heartbeat_at < threshold

    def problems(self) -> dict[str, str]:
        """Everything that keeps the worker from being ready, by component; empty when ready."""
        down = {
            name: (state.detail or "down") for name, state in self.brokers.items() if not state.up
        }
        if not self.brokers:
            down["amqp"] = "not connected yet"
        down.update(self.held)
        if self.consumers < self.expected_consumers:
            down["consumer"] = f"{self.consumers} of {self.expected_consumers} queues consumed"
        if self.stopping:
            down["worker"] = "shutting down"
        return down

    def nodes(self) -> dict[str, str]:
        """The node (host:port) each connected broker is on, for those that name one."""
        return {name: state.node for name, state in self.brokers.items() if state.up and state.node}

    def is_ready(self) -> bool:
        return not self.problems()


class HealthState:
    """The single writer of ``Snapshot``s; owned by the event loop."""

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        now = clock()
        self._snapshot = Snapshot(started_at=now, heartbeat_at=now)

    @property
    def clock(self) -> Clock:
        return self._clock

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def beat(self) -> None:
        self._snapshot = replace(self._snapshot, heartbeat_at=self._clock())

    def expect_consumers(self, count: int) -> None:
        self._snapshot = replace(self._snapshot, expected_consumers=count)

    def set_consumers(self, count: int) -> None:
        self._snapshot = replace(self._snapshot, consumers=count)

    def set_broker(self, name: str, up: bool, detail: str = "", *, node: str = "") -> bool:
        """Record a broker's state (and the node it is on); returns True when it went up or
        down. A move to another node while up is recorded too, and returns False."""
        current = self._snapshot.brokers.get(name)
        if (
            current is not None
            and current.up == up
            and current.detail == detail
            and current.node == node
        ):
            return False
        brokers = dict(self._snapshot.brokers)
        since = current.since if current is not None and current.up == up else self._clock()
        brokers[name] = BrokerState(up=up, since=since, detail=detail, node=node)
        self._snapshot = replace(self._snapshot, brokers=MappingProxyType(brokers))
        return current is None or current.up != up

    def set_held(self, component: str, detail: str | None) -> bool:
        """Record why ``component`` holds the flow (None: it no longer does); True on a change."""
        held = dict(self._snapshot.held)
        if held.get(component) == detail:
            return False
        if detail is None:
            del held[component]
        else:
            held[component] = detail
        self._snapshot = replace(self._snapshot, held=MappingProxyType(held))
        return True

    def flushed(self) -> None:
        self._snapshot = replace(self._snapshot, last_flush_at=self._clock())

    def stopping(self) -> None:
        self._snapshot = replace(self._snapshot, stopping=True)
