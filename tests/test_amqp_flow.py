"""The bookkeeping behind ``[amqp] max_inflight_bytes``: pure, no broker."""

from __future__ import annotations

import pytest

from proxy.amqp.flow import HeldBodies

# Steps: ("hold", tag, size) or ("ack", tag, multiple) or ("reject", tag); after each, the
# expected (total, full).
Step = tuple[str, int, int | bool]


@pytest.mark.parametrize(
    ("limit", "steps", "expected"),
    [
        pytest.param(
            100,
            [("hold", 1, 40), ("hold", 2, 40), ("hold", 3, 40)],
            [(40, False), (80, False), (120, True)],
            id="fills-at-the-limit-and-keeps-the-one-that-crossed-it",
        ),
        pytest.param(
            100,
            [("hold", 1, 250), ("ack", 1, False)],
            [(250, True), (0, False)],
            id="one-body-larger-than-the-limit-goes-through-alone",
        ),
        pytest.param(
            100,
            [("hold", 1, 60), ("hold", 2, 60), ("hold", 3, 60), ("ack", 2, True)],
            [(60, False), (120, True), (180, True), (60, False)],
            id="multiple-ack-frees-every-older-tag",
        ),
        pytest.param(
            100,
            [("hold", 5, 50), ("hold", 6, 50), ("reject", 6, False), ("ack", 5, True)],
            [(50, False), (100, True), (50, False), (0, False)],
            id="a-reject-ahead-of-the-batch-ack",
        ),
        pytest.param(
            100,
            [("hold", 1, 100), ("ack", 7, False)],
            [(100, True), (100, True)],
            id="a-tag-never-held-frees-nothing",
        ),
        pytest.param(
            10,
            [("hold", 1, 0), ("hold", 2, 0), ("ack", 2, True)],
            [(0, False), (0, False), (0, False)],
            id="empty-bodies-never-fill-it",
        ),
    ],
)
def test_held_bodies(limit: int, steps: list[Step], expected: list[tuple[int, bool]]) -> None:
    held = HeldBodies(limit)
    seen = []
    for kind, tag, value in steps:
        if kind == "hold":
            full = held.hold(tag, int(value))
            assert full == held.full
        else:
            room = held.release(tag, multiple=bool(value) if kind == "ack" else False)
            assert room == (not held.full)
        seen.append((held.total, held.full))
    assert seen == expected


def test_a_limit_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one byte"):
        HeldBodies(0)
