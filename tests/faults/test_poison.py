"""Poison messages at the head of the queue, already redelivered once, among 10,000 good ones:
each costs itself (dead-lettered), never the worker or the messages behind it. Behind them, a
message whose timestamp is in nanoseconds, which once wedged the queue before the worker saw it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.faults.plugins import POISON_HEADER
from tests.faults.raw_amqp import RawTimestamp, publish_raw
from tests.faults.rig import Rig, message, message_ids
from tests.helpers import AMQP_URL, publish, stream_entries

pytestmark = [pytest.mark.broker, pytest.mark.slow]

GOOD = 10_000
# A Unix time in nanoseconds: pamqp alone cannot decode it, and the connection drops on it.
NANOSECONDS = 1_764_000_000_123_456_789


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"n": value}
    return value


POISONS: dict[str, tuple[dict[str, Any], str]] = {
    # message id: (headers, the dead-letter reason expected)
    "poison-raise": ({POISON_HEADER: "raise"}, "plugin-error"),
    "poison-exit": ({POISON_HEADER: "exit"}, "plugin-error"),
    "poison-recurse": ({POISON_HEADER: "recurse"}, "plugin-error"),
    "poison-headers": ({"deep": _nested(300)}, "rejected"),  # cannot be encoded as JSON
}


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path, dedupe=True, batch=500, plugin="tests.faults.plugins:crash_on_poison")
    try:
        yield rig
    finally:
        await rig.close()


async def _redeliver_head(queue: str, count: int) -> None:
    """Take the first ``count`` messages without acking and let them go back: redelivered."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue)
        for _ in range(count):
            taken = await source.get(no_ack=False, fail=True)
            assert taken is not None
    # Closing the connection requeues them at the head, flagged redelivered.


async def test_poison_at_the_head_redelivered_among_10000_good(rig: Rig) -> None:
    await rig.declare()
    await publish(
        [
            aio_pika.Message(b'{"poison": true}', message_id=name, headers=headers)
            for name, (headers, _reason) in POISONS.items()
        ],
        routing_key=rig.queue,
    )
    await _redeliver_head(rig.queue, len(POISONS))
    await publish_raw(
        rig.queue, [b"{}"], message_id="ns-timestamp", timestamp=RawTimestamp.of(NANOSECONDS)
    )
    ids = message_ids(GOOD)
    await publish(map(message, ids), routing_key=rig.queue, confirm_every=2000)
    started = time.monotonic()
    await rig.start_worker()
    counts = await rig.wait_for_all(ids)
    took = time.monotonic() - started
    result = rig.record(f"{len(POISONS)} poison at head + {GOOD} good", ids, counts, took)
    dead = {e[b"message_id"].decode(): e for e in await stream_entries(rig.dead)}
    assert set(dead) == set(POISONS), rig.logs()
    for name, (_headers, reason) in POISONS.items():
        assert dead[name][b"error"] == reason.encode(), dead[name]
    assert not set(POISONS) & set(counts)
    (late,) = [e for e in await stream_entries(rig.stream) if e[b"message_id"] == b"ns-timestamp"]
    assert late[b"timestamp"] == str(NANOSECONDS // 10**9).encode()
    await rig.check(result)
