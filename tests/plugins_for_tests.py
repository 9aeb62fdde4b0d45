"""Route plugins (``match.plugin``) for the live-worker tests; workers import them by name.

``tests.plugins_for_tests:sleep_when_asked`` matches every message, but first blocks the calling
thread (the worker's event loop) for as many seconds as the ``x-test-block-loop`` header says: a
stalled loop, as a runaway plugin would cause, for the liveness tests.
"""

from __future__ import annotations

import time

from proxy.message import Message, header_text

BLOCK_HEADER = "x-test-block-loop"


def sleep_when_asked(message: Message) -> bool:
    seconds = message.headers.get(BLOCK_HEADER)
    if seconds is not None:
        time.sleep(float(header_text(seconds) or 0))  # synchronous on purpose: blocks the loop
    return True
