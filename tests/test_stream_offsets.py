"""Stream-queue sources without a broker: the config they need, where a consumer starts, the
positions of its deliveries, and what the pipeline writes, acks and records for them."""

from __future__ import annotations

import asyncio
import tomllib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.amqp.consumer import Delivery
from proxy.config import BatchSettings, parse_config
from proxy.errors import ConfigError, PermanentError
from proxy.message import Message
from proxy.metrics import Metrics
from proxy.pipeline import DeadLetterDestination, Pipeline
from proxy.routing import Router, StreamTarget
from proxy.sinks import Publish
from proxy.sinks.memory import MemorySink
from proxy.state import HealthState
from proxy.stream_offsets import (
    PositionCounter,
    StreamPosition,
    consume_arguments,
    last_offsets,
    offset_key,
    parse_recorded,
)
from proxy.worker import check_role
from tests.faults.fakes import FakeChannel

STREAM = '{ "x-queue-type" = "stream" }'
ROUTE = '[[routes]]\nname = "r"\nto = [ { stream = "s" } ]\n'


def load(source: str, top: str = 'unrouted = "drop"') -> Any:
    text = f"{top}\n[[sources]]\nqueue = \"events\"\n{source}\n{ROUTE}"
    return parse_config(tomllib.loads(text), environ={})


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param(f"arguments = {STREAM}", "first", id="default-first"),
        pytest.param(f'arguments = {STREAM}\nstream_offset = "next"', "next", id="next"),
        pytest.param(f'arguments = {STREAM}\nstream_offset = "last"', "last", id="last"),
        pytest.param(
            f'arguments = {STREAM}\nstream_offset = "2026-01-02T03:04:05Z"',
            datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            id="rfc3339-string",
        ),
        pytest.param(
            f"arguments = {STREAM}\nstream_offset = 2026-01-02T03:04:05+02:00",
            datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2))),
            id="toml-datetime",
        ),
    ],
)
def test_stream_offset_values(source: str, expected: object) -> None:
    (parsed,) = load(source).sources
    assert parsed.is_stream and parsed.stream_offset == expected


@pytest.mark.parametrize(
    ("source", "top", "key", "words"),
    [
        pytest.param(
            'stream_offset = "first"', "", "sources[0].stream_offset", "only for a stream",
            id="offset-on-a-classic-queue",
        ),
        pytest.param(
            'offset_key = "k"', "", "sources[0].offset_key", "only for a stream",
            id="offset-key-on-a-classic-queue",
        ),
        pytest.param(
            f'arguments = {STREAM}\nstream_offset = "earliest"', 'unrouted = "drop"',
            "sources[0].stream_offset", "RFC 3339", id="unknown-word",
        ),
        pytest.param(
            f"arguments = {STREAM}\nstream_offset = 42", 'unrouted = "drop"',
            "sources[0].stream_offset", "RFC 3339", id="a-number",
        ),
        pytest.param(
            f'arguments = {STREAM}\nstream_offset = "2026-01-02T03:04:05"', 'unrouted = "drop"',
            "sources[0].stream_offset", "offset from UTC", id="no-time-zone",
        ),
        pytest.param(
            f"arguments = {STREAM}", "", "sources[0]", "cannot reject", id="no-dead-letter",
        ),
        pytest.param(
            f"arguments = {STREAM}\nsingle_active_consumer = true", 'unrouted = "drop"',
            "sources[0].single_active_consumer", "no single active consumer", id="sac",
        ),
    ],
)  # fmt: skip
def test_stream_source_config_errors_name_the_key(
    source: str, top: str, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(source, top)
    assert caught.value.key == key
    assert words in caught.value.problem


def test_a_dead_letter_destination_is_enough_for_a_stream_source() -> None:
    (source,) = load(f"arguments = {STREAM}", '[dead_letter]\nstream = "dl"').sources
    assert source.offset_key_in("/") == "message-proxy:stream-offset:%2F:events"


def test_two_stream_sources_cannot_share_an_offset_key() -> None:
    text = f"""unrouted = "drop"
[[sources]]
queue = "a"
arguments = {STREAM}
offset_key = "shared"
[[sources]]
queue = "b"
arguments = {STREAM}
offset_key = "shared"
{ROUTE}"""
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(text), environ={})
    assert caught.value.key == "sources[1].offset_key"


def test_the_exchange_relay_refuses_a_stream_source_naming_it() -> None:
    config = parse_config(
        tomllib.loads(
            f'unrouted = "drop"\n[[sources]]\nqueue = "events"\narguments = {STREAM}\n'
            '[[routes]]\nname = "r"\nto = [ { exchange = "x" } ]\n'
        ),
        environ={},
    )
    with pytest.raises(ConfigError) as caught:
        check_role(config, "exchange-relay")
    assert caught.value.key == "sources[0]"
    assert "stream queue" in caught.value.problem and "Redis" in caught.value.problem
    check_role(config, "all")


@pytest.mark.parametrize(
    ("vhost", "queue", "key"),
    [
        pytest.param("/", "events", "message-proxy:stream-offset:%2F:events", id="default"),
        pytest.param("prod:eu", "a:b", "message-proxy:stream-offset:prod%3Aeu:a:b", id="colons"),
    ],
)
def test_offset_keys_are_readable_and_unambiguous(vhost: str, queue: str, key: str) -> None:
    assert offset_key(vhost, queue) == key


@pytest.mark.parametrize(
    ("start", "recorded", "argument"),
    [
        pytest.param("first", None, "first", id="first-time"),
        pytest.param("next", 41, 42, id="resume-after-recorded"),
        pytest.param("first", -1, 0, id="recorded-minus-one-is-offset-0"),
    ],
)
def test_consume_arguments(start: str, recorded: int | None, argument: object) -> None:
    assert consume_arguments(start, recorded) == {"x-stream-offset": argument}


def test_a_recorded_offset_that_is_not_a_number_names_its_key() -> None:
    assert parse_recorded("k", b"17") == 17
    assert parse_recorded("k", None) is None
    with pytest.raises(ValueError, match="k holds 'junk'"):
        parse_recorded("k", b"junk")


def test_positions_follow_the_header_and_count_on_without_it() -> None:
    counter = PositionCounter("k", recorded=9)
    assert counter.next(None) == StreamPosition("k", 10)  # unreadable: after what was recorded
    assert counter.next({"x-stream-offset": 20}) == StreamPosition("k", 20)
    assert counter.next({}) == StreamPosition("k", 21)
    assert PositionCounter("k", None).next(None) == StreamPosition("k", None)
    gaps: list[tuple[int, int]] = []
    counter = PositionCounter("k", 9, lambda first, last: gaps.append((first, last)))
    counter.next({"x-stream-offset": 15})  # retention removed 10..14 before they were read
    counter.next({"x-stream-offset": 16})
    assert gaps == [(10, 14)]
    assert last_offsets([StreamPosition("a", 3), None, StreamPosition("a", 5)]) == {"a": 5}


# --- the pipeline, with the in-memory sink as destination and offset store ---------------------


def stream_pipeline(sink: MemorySink, data: dict[str, Any]) -> Pipeline:
    config = parse_config(
        {"sources": [{"queue": "q", "arguments": {"x-queue-type": "stream"}}], **data},
        environ={},
    )
    return Pipeline(
        Router.from_config(config),
        {StreamTarget: sink},
        batch=BatchSettings(max_messages=100, max_delay_ms=0),
        health=HealthState(),
        metrics=Metrics(CollectorRegistry(), role="test", version="0"),
        dead_letter=DeadLetterDestination(config.dead_letter) if config.dead_letter else None,
        drop_unrouted=config.unrouted == "drop",
        offsets=sink,
    )


def deliver(pipeline: Pipeline, channel: FakeChannel, offsets: list[int], **headers: str) -> None:
    for offset in offsets:
        message = Message(b"%d" % offset, queue="q", headers={"x-stream-offset": offset, **headers})
        position = StreamPosition("key", offset)
        pipeline.submit(Delivery(message, offset + 1, channel, 0, position=position))


async def run_until_settled(pipeline: Pipeline) -> None:
    runner = asyncio.create_task(pipeline.run())
    try:
        await asyncio.wait_for(pipeline.drain(), 5)
    finally:
        runner.cancel()


ALL_TO_S: dict[str, Any] = {
    "routes": [{"name": "r", "to": [{"stream": "s"}]}],
    "dead_letter": {"stream": "dl"},
}


async def test_offsets_are_recorded_with_the_batch_and_replays_are_not_written_again() -> None:
    sink = MemorySink("redis")
    pipeline = stream_pipeline(sink, ALL_TO_S)
    channel = FakeChannel()
    deliver(pipeline, channel, [0, 1, 2, 3])
    await run_until_settled(pipeline)
    assert sink.offsets == {"key": 3}
    # A reconnect that replays 2..3 before 4..5, and 5 twice in one batch.
    deliver(pipeline, channel, [2, 3, 4, 5, 5])
    await run_until_settled(pipeline)
    assert [p.message.body for p in sink.published] == [b"0", b"1", b"2", b"3", b"4", b"5"]
    assert sink.offsets == {"key": 5}
    assert channel.rejected == [] and channel.acked == [4, 6]  # every delivery acked


async def test_another_workers_writes_are_not_written_again() -> None:
    sink = MemorySink("redis")
    sink.offsets["key"] = 2  # another worker on the same stream got there first
    pipeline = stream_pipeline(sink, ALL_TO_S)
    channel = FakeChannel()
    deliver(pipeline, channel, [1, 2, 3])
    await run_until_settled(pipeline)
    assert [p.message.body for p in sink.published] == [b"3"]
    assert sink.offsets == {"key": 3}


async def test_a_store_that_cannot_record_atomically_records_after_everything_accepted() -> None:
    sink = MemorySink("redis")
    sink.atomic = False
    pipeline = stream_pipeline(sink, ALL_TO_S)
    channel = FakeChannel()
    deliver(pipeline, channel, [0, 1])
    await run_until_settled(pipeline)
    assert sink.offsets == {"key": 1} and len(sink.published) == 2


async def test_a_refused_entry_is_dead_lettered_before_the_offset_is_recorded() -> None:
    order: list[str] = []

    def refuse(item: Publish) -> PermanentError | None:
        order.append("dead letter" if item.dead_letter else f"entry {item.message.body!r}")
        if item.dead_letter is None and item.message.body == b"1":
            return PermanentError("rejected", "WRONGTYPE")
        return None

    sink = MemorySink("redis", refuse=refuse)
    record = sink.record_offsets

    async def record_offsets(offsets: Any) -> None:
        order.append("offsets")
        await record(offsets)

    sink.record_offsets = record_offsets  # type: ignore[method-assign]
    pipeline = stream_pipeline(sink, ALL_TO_S)
    deliver(pipeline, FakeChannel(), [0, 1, 2])
    await run_until_settled(pipeline)
    assert order == ["entry b'0'", "entry b'1'", "entry b'2'", "dead letter", "offsets"]
    assert sink.offsets == {"key": 2}


async def test_a_stream_delivery_is_never_rejected_even_with_nowhere_to_dead_letter_it() -> None:
    sink = MemorySink("redis")
    routes = [{"name": "r", "to": [{"stream": "s:{headers.tenant}"}]}]
    pipeline = stream_pipeline(sink, {"routes": routes, "unrouted": "drop"})
    channel = FakeChannel()
    deliver(pipeline, channel, [0])  # no tenant header: the template has no value
    deliver(pipeline, channel, [1], tenant="acme")
    await run_until_settled(pipeline)
    assert channel.rejected == [] and channel.acked == [2]
    assert [p.target.name for p in sink.published if isinstance(p.target, StreamTarget)] == [
        "s:acme"
    ]
    assert sink.offsets == {"key": 1}
