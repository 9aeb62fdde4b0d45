"""A pipeline with no broker behind it: a fake AMQP channel and a one-call way to build it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.amqp.consumer import Delivery
from proxy.config import BatchSettings, parse_config
from proxy.message import Message
from proxy.metrics import Metrics
from proxy.pipeline import DeadLetterDestination, Pipeline
from proxy.routing import Router, StreamTarget
from proxy.sinks import Sink
from proxy.state import HealthState


class FakeChannel:
    is_closed = False

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.rejected: list[int] = []

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        self.acked.append(delivery_tag)

    def reject(self, delivery_tag: int, *, requeue: bool = False) -> None:
        self.rejected.append(delivery_tag)


def pipeline_for(
    data: dict[str, Any],
    sink: Sink,
    *,
    health: HealthState | None = None,
    registry: CollectorRegistry | None = None,
) -> Pipeline:
    """A pipeline for the config ``data`` (source: queue "q"); every stream goes to ``sink``."""
    config = parse_config({"sources": [{"queue": "q"}], **data}, environ={})
    return Pipeline(
        Router.from_config(config),
        {StreamTarget: sink},
        batch=BatchSettings(max_messages=100, max_delay_ms=0),
        health=health or HealthState(),
        metrics=Metrics(registry or CollectorRegistry(), role="test", version="0"),
        dead_letter=DeadLetterDestination(config.dead_letter) if config.dead_letter else None,
    )


def submit(pipeline: Pipeline, messages: Iterable[Message]) -> Any:
    """Hand ``messages`` to the pipeline, tags from 1, on a fake channel it returns."""
    channel = FakeChannel()
    for tag, message in enumerate(messages, start=1):
        pipeline.submit(Delivery(message, tag, channel, 0))
    return channel


async def flush(pipeline: Pipeline, within: float = 5.0) -> None:
    """Run the pipeline until what was submitted is settled."""
    runner = asyncio.create_task(pipeline.run())
    try:
        await asyncio.wait_for(pipeline.drain(), within)
    finally:
        runner.cancel()
