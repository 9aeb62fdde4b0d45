"""Destinations. One small Protocol; one module per kind of sink.

A sink takes a batch of ``Publish`` items and returns one outcome per item, in order: ``None`` when
the destination accepted it, a ``PermanentError`` when it refused that one item for good. When the
destination cannot be reached at all it raises ``TransientError`` and the caller retries the batch.
A sink that de-duplicates may also answer with an ``Accepted`` note, for the metrics: the item was
accepted (and is acked) but was not written, or was written without de-duplication.
Sinks translate their client library's exceptions into these; nothing else crosses this boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from proxy.encoding import DeadLetterInfo
from proxy.errors import PermanentError
from proxy.message import Message
from proxy.routing import Target


class Accepted(Enum):
    """An accepted item with a note; the value is the metric label where there is one."""

    DUPLICATE = "duplicate"  # written before, within the dedupe window: not written again
    NO_MESSAGE_ID = "no-message-id"  # dedupe asked for, but no id to dedupe by: written as is


Outcome = PermanentError | Accepted | None


@dataclass(frozen=True, slots=True)
class Publish:
    message: Message
    target: Target
    dead_letter: DeadLetterInfo | None = None


class Sink(Protocol):
    """A destination broker."""

    @property
    def broker(self) -> str:
        """Name used for readiness and the ``broker_up`` metric: ``redis``, ``amqp_out``..."""
        ...

    async def connect(self) -> None:
        """Open connections; raises ``TransientError`` when the broker cannot be reached."""
        ...

    async def ping(self) -> None:
        """Check the broker answers (reconnecting if needed); raises ``TransientError``."""
        ...

    async def publish_batch(self, items: Sequence[Publish]) -> list[Outcome]: ...

    async def aclose(self) -> None: ...
