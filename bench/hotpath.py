"""CPU per message of each stage of the stream bridge's hot path, in process, no broker.

The drains say how fast the whole thing goes on a shared machine; this says where a message's
Python time goes, stage by stage, with far less noise (best of several timed loops over the
same 2,000 realistic messages). It also times the slower form of the two stages this suite
made cheaper, and a hand-packed RESP encoder against redis-py's, to size what a change to the
Redis sink would save.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiormq.abc import DeliveredMessage
from pamqp import body as amqp_body
from pamqp import frame, header
from pamqp.commands import Basic

from bench.publisher import template_body

BATCH = 500


def _deliveries(count: int) -> tuple[list[bytes], list[DeliveredMessage]]:
    payload = template_body()
    raw, delivered = [], []
    stamp = datetime.now(UTC).replace(microsecond=0)
    for index in range(count):
        props = Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=f"m-{index:07d}",
            timestamp=stamp,
            headers={"tenant": "acme", "source": "bench", "schema": "v1"},
        )
        deliver = Basic.Deliver(
            consumer_tag="ctag", delivery_tag=index + 1, routing_key="orders", exchange=""
        )
        content = header.ContentHeader(0, len(payload), props)
        raw.append(
            frame.marshal(deliver, 1)
            + frame.marshal(content, 1)
            + frame.marshal(amqp_body.ContentBody(payload), 1)
        )
        delivered.append(
            DeliveredMessage(delivery=deliver, header=content, body=payload, channel=None)  # type: ignore[arg-type]
        )
    return raw, delivered


def _unmarshal_three(data: bytes) -> None:
    offset = 0
    for _ in range(3):
        used, _channel, _value = frame.unmarshal(data[offset:])
        offset += used


def _decoded(data: bytes) -> Any:
    """What the source's client does with one delivery's bytes, up to the ``Message``."""
    from proxy.amqp import frames as wire
    from proxy.message import EMPTY_HEADERS, Message

    head = wire.FRAME_HEAD.unpack_from
    _kind, _channel, size = head(data, 0)
    _tag, _delivery_tag, values = wire.decode_deliver(data[7 : 7 + size])
    start = 8 + size
    _kind, _channel, size = head(data, start)
    _body_size, properties = wire.decode_content_header(data[start + 7 : start + 7 + size])
    values.update(properties)
    start += 8 + size
    _kind, _channel, size = head(data, start)
    values["body"] = data[start + 7 : start + 7 + size]
    values["queue"] = "orders"
    if values["headers"] is None:
        values["headers"] = EMPTY_HEADERS
    return Message.of(values)


def _each(run: Callable[[Any], object], items: list[Any]) -> None:
    for item in items:
        run(item)


def _best(run: Callable[[], object], count: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best / count * 1e6


def measure(count: int = 1_000, repeat: int = 25) -> dict[str, float]:
    """Microseconds per message for each stage (best of ``repeat`` loops over ``count``)."""
    import aio_pika
    from prometheus_client import CollectorRegistry, Histogram
    from redis.asyncio.connection import Connection

    from proxy.amqp.consumer import Delivery
    from proxy.config import parse_config
    from proxy.encoding import entry_fields, entry_resp
    from proxy.message import Message
    from proxy.metrics import LATENCY_BUCKETS, Metrics
    from proxy.routing import Router, StreamTarget
    from proxy.sinks.redis_stream import packed_xadds
    from proxy.sinks.resp import pack_commands

    raw, delivered = _deliveries(count)
    config = parse_config(
        {
            "sources": [{"queue": "orders"}],
            "routes": [{"name": "bench", "to": [{"stream": "orders", "maxlen": 10_000_000}]}],
        },
        environ={},
    )
    router = Router.from_config(config)
    messages = [_decoded(data) for data in raw]
    values = [dict(m.__dict__) for m in messages]
    fields = [entry_fields(m) for m in messages]
    prefix: list[Any] = ["XADD", "orders", "MAXLEN", "~", 10_000_000, "*"]
    commands = [[*prefix, *(x for pair in f.items() for x in pair)] for f in fields]
    connection = Connection()
    histogram = Metrics(CollectorRegistry(), role="bench", version="0").end_to_end_latency
    histogram_before = Histogram("latency", "", buckets=LATENCY_BUCKETS, registry=None)
    now = time.time()

    def observed_per_batch() -> None:
        for start in range(0, count, BATCH):
            histogram.observe_many(
                [now - m.timestamp.timestamp() for m in messages[start : start + BATCH]]
            )

    def packed_by_redis_py() -> None:
        for start in range(0, count, BATCH):
            connection.pack_commands(commands[start : start + BATCH])

    target = StreamTarget("bench", "orders", "orders", 10_000_000)
    plain: Any = [(index, target, None, entry_resp(m)) for index, m in enumerate(messages)]

    def packed_by_hand() -> None:
        for start in range(0, count, BATCH):
            pack_commands(packed_xadds(plain[start : start + BATCH]))

    stages: dict[str, Callable[[], object]] = {
        "AMQP: unmarshal the three frames (pamqp; aio-pika and aiormq consumers)": lambda: _each(
            _unmarshal_three, raw
        ),
        "aio-pika IncomingMessage (the ceiling and the naive bridge)": lambda: [
            aio_pika.IncomingMessage(d) for d in delivered
        ],
        "decode the three frames into a Message (message-proxy's client)": lambda: _each(
            _decoded, raw
        ),
        "Message.of before: frozen dataclass __init__": lambda: [Message(**v) for v in values],
        "Delivery": lambda: [Delivery(m, 1, None, 0.0) for m in messages],  # type: ignore[arg-type]
        "route (cached by routing key)": lambda: [router.route(m) for m in messages],
        "route before: uncached": lambda: [router._decide(m) for m in messages],
        "entry_fields (stream entry)": lambda: [entry_fields(m) for m in messages],
        "end-to-end latency histogram, counted per batch": observed_per_batch,
        "latency histogram before: prometheus_client observe per message": lambda: _each(
            lambda m: histogram_before.observe(now - m.timestamp.timestamp()), messages
        ),
        "redis-py: pack one XADD per message (pipeline of 500)": packed_by_redis_py,
        "the Redis sink's RESP for the same XADDs (entry_resp not included)": packed_by_hand,
        "entry_resp (the same entry fields, in RESP)": lambda: [entry_resp(m) for m in messages],
    }
    return {name: _best(run, count, repeat) for name, run in stages.items()}


if __name__ == "__main__":
    for name, micros in measure().items():
        print(f"{micros:7.2f} us  {name}")
