"""After an outage the held batch goes as soon as the broker answers again, not when the backoff,
by then up to 30 s, runs out; a delivery the source could not read is dead-lettered, not retried.
Fast: an in-memory sink, no broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from proxy.amqp.consumer import Delivery
from proxy.errors import TransientError
from proxy.message import Message
from proxy.sinks import Outcome, Publish
from proxy.sinks.memory import MemorySink
from proxy.state import HealthState
from tests.faults.fakes import FakeChannel, flush, pipeline_for, submit


class OutageSink:
    broker = "redis"
    node = ""

    def __init__(self) -> None:
        self.down = True
        self.attempts: list[float] = []

    async def connect(self) -> None: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...

    async def publish_batch(self, items: Sequence[Publish]) -> list[Outcome]:
        self.attempts.append(time.monotonic())
        if self.down:
            raise TransientError("redis: connection refused")
        return [None] * len(items)


async def test_a_held_batch_goes_once_the_watcher_sees_the_broker_up() -> None:
    health = HealthState()
    sink = OutageSink()
    routes = [{"name": "r", "to": [{"stream": "s"}]}]
    pipeline = pipeline_for({"routes": routes}, sink, health=health)
    channel = submit(pipeline, [Message(b"x", queue="q")])
    runner = asyncio.create_task(pipeline.run())
    try:
        # Tries at 0 s, then retries at 0.1, 0.3, 0.7 and 1.5 s; the next would come at 3.1 s.
        await asyncio.sleep(1.6)
        assert len(sink.attempts) == 5
        assert not health.snapshot().brokers["redis"].up
        sink.down = False
        healed = time.monotonic()
        health.set_broker("redis", True)  # what the sink watcher does when a ping succeeds
        await asyncio.wait_for(pipeline.drain(), 1.0)
    finally:
        runner.cancel()
    assert channel.acked == [1]
    assert sink.attempts[-1] - healed < 0.3


async def test_a_delivery_whose_properties_cannot_be_read_is_dead_lettered_as_rejected() -> None:
    sink = MemorySink()
    data = {"routes": [{"name": "r", "to": [{"stream": "s"}]}], "dead_letter": {"stream": "dl"}}
    pipeline = pipeline_for(data, sink)
    channel = FakeChannel()
    pipeline.submit(Delivery(Message(b"fine", queue="q"), 1, channel, 0))
    pipeline.submit(Delivery(Message(b"odd", queue="q"), 2, channel, 0, defect="bad header"))
    await flush(pipeline)
    assert channel.acked == [2] and channel.rejected == []
    written = {item.target.template: item for item in sink.published}
    assert written["s"].message.body == b"fine"
    dead = written["dl"]
    assert dead.message.body == b"odd"
    assert dead.dead_letter is not None
    assert (dead.dead_letter.reason, dead.dead_letter.detail) == ("rejected", "bad header")
