"""Route plugins used by the tests (importable as ``tests.route_plugins``)."""

from __future__ import annotations

from proxy.message import Message


def is_vip(message: Message) -> bool:
    if "crash" in message.headers:
        return 1 / 0 > 0
    return message.headers.get("vip") == "yes"


NOT_CALLABLE = 42
