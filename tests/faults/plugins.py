"""Route plugins for the fault suite (``match.plugin = "tests.faults.plugins:crash_on_poison"``)."""

from __future__ import annotations

import sys

from proxy.message import Message, header_text

POISON_HEADER = "x-poison"


def crash_on_poison(message: Message) -> bool:
    """Matches every message, but crashes on a poison one the way its header asks."""
    how = header_text(message.headers.get(POISON_HEADER, b""))
    if how == "raise":
        raise RuntimeError("poison message")
    if how == "exit":
        sys.exit(3)  # user code calling sys.exit: SystemExit is not an Exception
    if how == "recurse":
        return crash_on_poison(message)
    return True
