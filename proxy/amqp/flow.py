"""Back-pressure by bytes: the message bodies a consumer holds unacked, and when that is too much.

Prefetch bounds how many deliveries RabbitMQ sends ahead, not their size: with the default 1000
and bodies of 8 MiB, a held batch could grow to 8 GiB. The connection keeps each unacked body's
size here, by delivery tag, and stops reading its socket (TCP back-pressure: RabbitMQ's writes
then wait) while the total is at the limit; settling frees room and reading resumes. The
delivery that crosses the limit is kept, so a single message larger than the limit still goes
through, alone.

Pure bookkeeping, no I/O. Tags grow on a channel, so sizes are kept in tag order and a
``multiple`` ack frees from the oldest up.
"""

from __future__ import annotations

from collections import deque


class HeldBodies:
    """Sizes of the bodies delivered and not settled yet, against ``limit`` bytes."""

    __slots__ = ("_sizes", "limit", "total")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the limit must be at least one byte")
        self.limit = limit
        self.total = 0
        self._sizes: deque[tuple[int, int]] = deque()  # (delivery tag, body bytes), oldest first

    @property
    def full(self) -> bool:
        return self.total >= self.limit

    def hold(self, tag: int, size: int) -> bool:
        """A delivery arrived; returns whether the bodies held now fill the limit."""
        self._sizes.append((tag, size))
        self.total += size
        return self.total >= self.limit

    def release(self, tag: int, *, multiple: bool) -> bool:
        """A delivery was settled (with every older one when ``multiple``, as ``basic.ack``
        means it); returns whether there is room again."""
        sizes = self._sizes
        if multiple:
            while sizes and sizes[0][0] <= tag:
                self.total -= sizes.popleft()[1]
        elif sizes and sizes[0][0] == tag:
            self.total -= sizes.popleft()[1]
        else:  # a reject ahead of the batch's ack: rare, so a scan is fine
            for position, (held_tag, size) in enumerate(sizes):
                if held_tag == tag:
                    del sizes[position]
                    self.total -= size
                    break
        return self.total < self.limit
