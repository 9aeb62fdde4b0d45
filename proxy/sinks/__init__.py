"""Destinations. One small Protocol; one module per kind of sink.

A sink takes a batch of ``Publish`` items and returns one outcome per item, in order: ``None`` when
the destination accepted it, a ``PermanentError`` when it refused that one item for good. When the
destination cannot be reached at all it raises ``TransientError`` and the caller retries the batch.
A sink that de-duplicates may also answer with an ``Accepted`` note, for the metrics: the item was
accepted (and is acked) but was not written, or was written without de-duplication.
Sinks translate their client library's exceptions into these; nothing else crosses this boundary.

A sink that can also keep stream-queue offsets (Redis) is an ``OffsetStore`` as well.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import NamedTuple, Protocol, runtime_checkable

from proxy.encoding import DeadLetterInfo
from proxy.errors import PermanentError
from proxy.message import Message
from proxy.routing import Target
from proxy.stream_offsets import StreamPosition


class Accepted(Enum):
    """An accepted item with a note; the value is the metric label where there is one."""

    DUPLICATE = "duplicate"  # written before, within the dedupe window: not written again
    NO_MESSAGE_ID = "no-message-id"  # dedupe asked for, but no id to dedupe by: written as is
    # From a stream queue, at or below its source's recorded offset: an earlier batch (or
    # another worker reading the same stream) wrote it; not written again.
    ALREADY_WRITTEN = "already-written"


Outcome = PermanentError | Accepted | None


class Publish(NamedTuple):
    """One message to one destination (a tuple: one is made per message and destination)."""

    message: Message
    target: Target
    dead_letter: DeadLetterInfo | None = None
    position: StreamPosition | None = None  # where its delivery sits in a stream queue


class Sink(Protocol):
    """A destination broker."""

    @property
    def broker(self) -> str:
        """Name used for readiness and the ``broker_up`` metric: ``redis``, ``amqp_out``..."""
        ...

    @property
    def node(self) -> str:
        """``host:port`` of the one node it is connected to, shown in ``/ready`` and the
        ``broker_node_info`` metric; "" while down, or where writes go to more than one node."""
        ...

    async def connect(self) -> None:
        """Open connections; raises ``TransientError`` when the broker cannot be reached."""
        ...

    async def ping(self) -> None:
        """Check the broker answers (reconnecting if needed); raises ``TransientError``."""
        ...

    async def publish_batch(self, items: Sequence[Publish]) -> list[Outcome]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class OffsetStore(Sink, Protocol):
    """A sink that also keeps the stream-queue sources' offsets: the offset of the last delivery
    written, per offset key. Offsets only move forward: recording one at or below what is kept
    changes nothing."""

    async def read_offsets(self, keys: Sequence[str]) -> dict[str, int]:
        """The recorded offset of each key that has one; raises ``TransientError``."""
        ...

    async def record_offsets(self, offsets: Mapping[str, int]) -> None:
        """Record ``offsets`` on their own, once every destination of the batch accepted."""
        ...

    async def publish_recording(
        self, items: Sequence[Publish], offsets: Mapping[str, int]
    ) -> tuple[list[Outcome], bool]:
        """``publish_batch`` and recording ``offsets`` in one atomic step: exactly once.

        An item whose ``position`` is at or below its key's recorded offset is not written
        (``Accepted.ALREADY_WRITTEN``). Returns the outcomes and whether the offsets were
        recorded: not when an item was refused (its dead letter is still to be written), nor by
        a store that cannot record them atomically with these items (keys in several cluster
        slots); the caller then uses ``record_offsets`` once everything was accepted, which
        makes that batch at least once.
        """
        ...
