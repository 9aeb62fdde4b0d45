"""An in-memory sink for routing tests and dry runs: it records what it was given."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from proxy.errors import PermanentError, TransientError
from proxy.sinks import Outcome, Publish


class MemorySink:
    def __init__(
        self,
        broker: str = "memory",
        *,
        refuse: Callable[[Publish], PermanentError | None] | None = None,
    ) -> None:
        self._broker = broker
        self._refuse = refuse
        self.published: list[Publish] = []
        self.failures_left = 0  # raise TransientError this many times before accepting
        self.closed = False

    @property
    def broker(self) -> str:
        return self._broker

    async def connect(self) -> None:
        self.closed = False

    async def ping(self) -> None:
        if self.failures_left:
            raise TransientError("memory sink is down")

    async def publish_batch(self, items: Sequence[Publish]) -> list[Outcome]:
        if self.failures_left:
            self.failures_left -= 1
            raise TransientError("memory sink is down")
        outcomes: list[Outcome] = []
        for item in items:
            refusal = self._refuse(item) if self._refuse is not None else None
            if refusal is None:
                self.published.append(item)
            outcomes.append(refusal)
        return outcomes

    async def aclose(self) -> None:
        self.closed = True
