"""An in-memory sink for routing tests and dry runs: it records what it was given.

It keeps stream-queue offsets too (an ``OffsetStore``), recorded atomically with the items, as
the Redis sink does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from proxy.errors import PermanentError, TransientError
from proxy.sinks import Accepted, Outcome, Publish


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
        self.offsets: dict[str, int] = {}
        self.atomic = True  # False: record offsets only through record_offsets, like a cluster

    @property
    def broker(self) -> str:
        return self._broker

    @property
    def node(self) -> str:
        return ""

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

    async def read_offsets(self, keys: Sequence[str]) -> dict[str, int]:
        if self.failures_left:
            raise TransientError("memory sink is down")
        return {key: self.offsets[key] for key in keys if key in self.offsets}

    async def record_offsets(self, offsets: Mapping[str, int]) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise TransientError("memory sink is down")
        for key, offset in offsets.items():
            self.offsets[key] = max(offset, self.offsets.get(key, -1))

    async def publish_recording(
        self, items: Sequence[Publish], offsets: Mapping[str, int]
    ) -> tuple[list[Outcome], bool]:
        fresh = [
            item.position is None
            or item.position.offset is None
            or item.position.offset > self.offsets.get(item.position.key, -1)
            for item in items
        ]
        outcomes = await self.publish_batch([i for i, new in zip(items, fresh, strict=True) if new])
        written = iter(outcomes)
        merged = [next(written) if new else Accepted.ALREADY_WRITTEN for new in fresh]
        if not self.atomic or any(isinstance(o, PermanentError) for o in merged):
            return merged, False
        for key, offset in offsets.items():
            self.offsets[key] = max(offset, self.offsets.get(key, -1))
        return merged, True

    async def aclose(self) -> None:
        self.closed = True
