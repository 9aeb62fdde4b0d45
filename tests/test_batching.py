"""When the pipeline cuts a batch: natural batching, the bounds, the optional minimum linger.

The decision as a table (``flush_delay``), then the flush loop itself with the in-memory sink,
whose writes are held open to play a batch in flight, and a fake clock. No broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from proxy.amqp.consumer import Delivery
from proxy.config import BatchSettings, parse_config
from proxy.message import Message
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline, flush_delay
from proxy.routing import Router, StreamTarget
from proxy.sinks import Outcome, Publish
from proxy.sinks.memory import MemorySink
from proxy.state import HealthState
from tests.faults.fakes import FakeChannel


@pytest.mark.parametrize(
    ("pending", "oldest", "now", "max_messages", "linger", "expected"),
    [
        pytest.param(1, 10.0, 10.0, 500, 0.0, 0.0, id="no linger: at once"),
        pytest.param(499, 10.0, 10.0, 500, 0.0, 0.0, id="no linger, not full: at once"),
        pytest.param(500, 10.0, 10.0, 500, 0.005, 0.0, id="full: at once despite a linger"),
        pytest.param(900, 10.0, 10.0, 500, 0.005, 0.0, id="more than full: at once"),
        pytest.param(1, 10.0, 10.0, 500, 0.005, 0.005, id="linger: the oldest just arrived"),
        pytest.param(3, 10.0, 10.003, 500, 0.005, 0.002, id="linger: the rest of it"),
        pytest.param(3, 10.0, 10.005, 500, 0.005, 0.0, id="linger: over"),
        pytest.param(3, 10.0, 11.0, 500, 0.005, 0.0, id="linger: long over, never negative"),
    ],
)
def test_flush_delay(
    pending: int, oldest: float, now: float, max_messages: int, linger: float, expected: float
) -> None:
    delay = flush_delay(pending, oldest, now, max_messages=max_messages, min_linger=linger)
    assert delay == pytest.approx(expected)


class HeldSink(MemorySink):
    """Records each batch's size; every write waits until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__("memory")
        self.batches: list[int] = []
        self.release = asyncio.Event()

    async def publish_batch(self, items: Sequence[Publish]) -> list[Outcome]:
        self.batches.append(len(items))
        await self.release.wait()
        return await super().publish_batch(items)


def _pipeline(sink: HeldSink, batch: BatchSettings, now: list[float]) -> Pipeline:
    config = parse_config(
        {"sources": [{"queue": "q"}], "routes": [{"name": "all", "to": [{"stream": "s"}]}]},
        environ={},
    )
    return Pipeline(
        Router.from_config(config),
        {StreamTarget: sink},
        batch=batch,
        health=HealthState(),
        metrics=Metrics(CollectorRegistry(), role="test", version="0"),
        clock=lambda: now[0],
    )


async def _turns(count: int = 5) -> None:
    """Let the event loop run ``count`` rounds of ready callbacks, with no time passing."""
    for _ in range(count):
        await asyncio.sleep(0)


# Each step is one read's worth of deliveries handed over at once (the consumer calls
# ``submit`` for every delivery of a read before the loop runs anything else), then the loop
# runs a few turns; the first write is held open until every step is in.
@pytest.mark.parametrize(
    ("max_messages", "reads", "expected"),
    [
        pytest.param(500, [1], [1], id="idle: one delivery goes out at once"),
        pytest.param(500, [7], [7], id="idle: one read, one batch"),
        pytest.param(500, [1, 5, 4], [1, 9], id="while a batch is in flight, the next accumulates"),
        pytest.param(500, [3, 1, 1, 1, 1], [3, 4], id="single arrivals during a write: one batch"),
        pytest.param(4, [1, 10], [1, 4, 4, 2], id="max_messages bounds the accumulated batch"),
        pytest.param(4, [9], [4, 4, 1], id="max_messages bounds one large read"),
    ],
)
async def test_natural_batching(max_messages: int, reads: list[int], expected: list[int]) -> None:
    sink, now = HeldSink(), [100.0]
    pipeline = _pipeline(sink, BatchSettings(max_messages=max_messages), now)
    channel = FakeChannel()
    runner = asyncio.create_task(pipeline.run())
    tag = 0
    try:
        for count in reads:
            for _ in range(count):
                tag += 1
                pipeline.submit(Delivery(Message(b"x"), tag, channel, now[0]))
            await _turns()
        assert sink.batches[:1] == expected[:1]  # written at once: no time has passed
        sink.release.set()
        await asyncio.wait_for(pipeline.drain(), 5)
    finally:
        runner.cancel()
    assert sink.batches == expected
    assert len(sink.published) == tag
    assert channel.acked[-1] == tag


@pytest.mark.parametrize(
    ("max_messages", "submitted", "waits"),
    [
        pytest.param(500, 3, True, id="not full: waits out the linger"),
        pytest.param(3, 3, False, id="full: goes out at once"),
    ],
)
async def test_a_minimum_linger_holds_a_batch_that_is_not_full(
    max_messages: int, submitted: int, waits: bool
) -> None:
    sink, now = HeldSink(), [100.0]
    sink.release.set()
    linger = BatchSettings(max_messages=max_messages, max_delay_ms=100)
    pipeline = _pipeline(sink, linger, now)
    channel = FakeChannel()
    runner = asyncio.create_task(pipeline.run())
    try:
        for tag in range(1, submitted + 1):
            pipeline.submit(Delivery(Message(b"x"), tag, channel, now[0]))
        await _turns()
        assert sink.batches == ([] if waits else [submitted])
        await asyncio.sleep(0.3)  # real time: the linger's timer runs on the event loop
        assert sink.batches == [submitted]
    finally:
        runner.cancel()
    assert channel.acked == [submitted]
