"""What every peer shares: its command line and how it runs its event loop."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Coroutine
from typing import Any

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--stream", default="")
    parser.add_argument("--prefetch", type=int, default=1000)
    parser.add_argument("--ack-every", type=int, default=500)
    parser.add_argument(
        "--no-uvloop", action="store_true", help="plain asyncio (default: uvloop, as message-proxy)"
    )
    return parser.parse_args()


def run(main: Coroutine[Any, Any, None], *, uvloop: bool) -> None:
    """Run until SIGTERM/SIGINT, on the same event loop as message-proxy uses."""
    if uvloop:
        import uvloop as _uvloop

        factory = _uvloop.new_event_loop
    else:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(main)
        except KeyboardInterrupt:
            pass
