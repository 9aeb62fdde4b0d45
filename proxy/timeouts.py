"""Waits that end on time even when the awaited code swallows its cancellation.

``asyncio.timeout`` works by cancelling the awaited code and trusting it to stop. Client library
code does not always (an RPC wrapper that re-raises a stored exception instead, a path that
``uncancel``s), and a shutdown that hangs on one is a worker that never exits. Here the work runs
as its own task; when time is up it is cancelled and abandoned, not waited on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def bounded(awaitable: Awaitable[T], within: float) -> tuple[bool, T | None]:
    """(True, result) when ``awaitable`` finished within ``within`` seconds, else (False, None).

    Its exception, if it raised in time, propagates.
    """
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=within)
    if not done:
        task.cancel()
        return False, None
    return True, task.result()
