"""``bounded``: a wait that ends on time even when the awaited code swallows its cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.timeouts import bounded


async def test_finished_in_time_returns_the_result() -> None:
    async def quick() -> int:
        await asyncio.sleep(0)
        return 7

    assert await bounded(quick(), 1.0) == (True, 7)


async def test_exception_in_time_propagates() -> None:
    async def broken() -> None:
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        await bounded(broken(), 1.0)


async def test_cancellation_swallowed_does_not_hang_the_caller() -> None:
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            swallowed.set()
            await asyncio.sleep(0.3)  # what asyncio.timeout would wait for in full

    started = time.monotonic()
    assert await bounded(stubborn(), 0.1) == (False, None)
    assert time.monotonic() - started < 0.25
    await asyncio.wait_for(swallowed.wait(), 1)
    await asyncio.sleep(0.35)  # let the abandoned task finish before the loop closes
