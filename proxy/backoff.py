"""Exponential backoff: 100 ms doubling to a 30 s cap, for retried batches and connections."""

from __future__ import annotations

INITIAL_DELAY_S = 0.1
MAX_DELAY_S = 30.0


class Backoff:
    def __init__(self, initial: float = INITIAL_DELAY_S, cap: float = MAX_DELAY_S) -> None:
        self.initial = initial
        self.cap = cap
        self.attempts = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.initial * 2.0**self.attempts)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0
