"""The consumer's hand-written frame decoding agrees with pamqp's, byte for byte, and is lenient
exactly where pamqp would raise inside the frame reader (and wedge the queue)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp import frame
from pamqp.header import ContentHeader

from proxy.amqp import frames as wire
from proxy.amqp.tables import entries
from proxy.message import HOPS_HEADER, Message
from proxy.sinks.amqp_exchange import publish_header
from tests.test_amqp_tables import comparable
from tests.test_properties import SETTINGS, headers

FIELD_NAMES = {"message_type": "type"}  # pamqp's name -> Message's


def header_payload(properties: spec.Basic.Properties, body_size: int = 10) -> bytes:
    raw = frame.marshal(ContentHeader(0, body_size, properties), 1)
    return raw[7:-1]


def pamqp_reading(payload: bytes) -> dict[str, Any]:
    content = ContentHeader()
    content.unmarshal(payload)
    values = {
        FIELD_NAMES.get(name, name): getattr(content.properties, name)
        for name in content.properties.__slots__  # type: ignore[attr-defined]
        if name != "cluster_id"
    }
    return values


EVERY_PROPERTY = spec.Basic.Properties(
    content_type="application/json",
    content_encoding="gzip",
    headers={
        "text": "acme",
        "bytes": bytearray(b"\xff\xfe"),
        "int": 7,
        "big": 2**40,
        "negative": -3,
        "float": 1.5,
        "decimal": Decimal("1.25"),
        "bool": True,
        "none": None,
        "when": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        "table": {"nested": "yes", "n": 1},
        "array": ["a", 1, {"x": False}],
        "é": "ü",
    },
    delivery_mode=2,
    priority=9,
    correlation_id="corr",
    reply_to="replies",
    expiration="60000",
    message_id="m-1",
    timestamp=datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC),
    message_type="order.created",
    user_id="guest",
    app_id="shop",
)


@pytest.mark.parametrize(
    "properties",
    [
        spec.Basic.Properties(),
        spec.Basic.Properties(delivery_mode=1),
        spec.Basic.Properties(headers={}),
        spec.Basic.Properties(message_id="only-id", app_id="app"),
        spec.Basic.Properties(timestamp=datetime(1970, 1, 1, tzinfo=UTC)),
        EVERY_PROPERTY,
    ],
    ids=["none", "delivery-mode", "empty-headers", "two-strings", "epoch", "every-property"],
)
def test_content_header_reads_as_pamqp_reads_it(properties: spec.Basic.Properties) -> None:
    payload = header_payload(properties, body_size=123456)
    size, values = wire.decode_content_header(payload)
    assert size == 123456 == wire.body_size(payload)
    assert values.pop("raw_properties") is not None
    assert values == pamqp_reading(payload)


@SETTINGS
@given(
    table=headers,
    strings=st.lists(st.text(max_size=30) | st.none(), min_size=8, max_size=8),
    numbers=st.tuples(st.integers(0, 255) | st.none(), st.integers(0, 255) | st.none()),
)
def test_any_properties_read_as_pamqp_reads_them(
    table: dict[str, Any], strings: list[str | None], numbers: tuple[int | None, int | None]
) -> None:
    names = [
        "content_type", "content_encoding", "correlation_id", "reply_to", "expiration",
        "message_id", "message_type", "app_id",
    ]  # fmt: skip
    values = {name: value.encode()[:255].decode("utf-8", "ignore") if value else value
              for name, value in zip(names, strings, strict=True)}  # fmt: skip
    try:
        properties = spec.Basic.Properties(
            headers=table, delivery_mode=numbers[0], priority=numbers[1], **values
        )
        payload = header_payload(properties)
        expected = pamqp_reading(payload)
    except (ValueError, TypeError, OverflowError):
        return  # pamqp cannot write or read it back: not a frame RabbitMQ would deliver
    values = wire.decode_content_header(payload)[1]
    raw = values.pop("raw_properties")
    assert comparable(values) == comparable(expected)  # a NaN header is not equal to itself
    assert_passed_on_as_delivered(payload, values, raw)


def assert_passed_on_as_delivered(payload: bytes, values: dict[str, Any], raw: Any) -> None:
    """The relay's header is the delivered one byte for byte but for the hop count, which is
    set where it was (whatever its type) or appended, and reads as one more than before."""
    message = Message.of(
        {**values, "headers": values["headers"] or {}, "raw_properties": raw, "body": b"x" * 10,
         "routing_key": "", "exchange": "", "queue": "q", "redelivered": False}
    )  # fmt: skip
    passed_on = publish_header(message)
    assert without_hops(passed_on) == without_hops(payload)
    headers = wire.decode_content_header(passed_on)[1]["headers"]
    assert headers[HOPS_HEADER] == message.hops + 1
    expected = pamqp_reading(payload)
    expected["headers"] = {**(expected["headers"] or {}), HOPS_HEADER: message.hops + 1}
    assert comparable(pamqp_reading(passed_on)) == comparable(expected)


def without_hops(payload: bytes) -> tuple[int, bytes, bytes, bytes]:
    """A content header's properties as bytes, with every hop-count entry cut from its table."""
    raw = wire.decode_content_header(payload)[1]["raw_properties"]
    table = raw.headers
    kept = [table[start:end] for key, start, end in entries(table) if key != HOPS] if table else []
    return raw.flags | wire.HEADERS_FLAG, raw.before_headers, b"".join(kept), raw.after_headers


HOPS = HOPS_HEADER.encode()


@pytest.mark.parametrize(
    ("consumer_tag", "delivery_tag", "redelivered", "exchange", "routing_key"),
    [
        ("ctag", 1, False, "", "q"),
        ("amq.ctag-xyz", 2**63 - 1, True, "app", "order.created.eu"),
        ("é", 42, False, "x" * 127, ""),
    ],
)
def test_deliver_reads_tags_and_routing_facts(
    consumer_tag: str, delivery_tag: int, redelivered: bool, exchange: str, routing_key: str
) -> None:
    method = spec.Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)
    payload = frame.marshal(method, 1)[7:-1]
    assert wire.method_id(payload) == wire.BASIC_DELIVER
    assert wire.decode_deliver(payload) == (
        consumer_tag,
        delivery_tag,
        {"exchange": exchange, "routing_key": routing_key, "redelivered": redelivered},
    )


@pytest.mark.parametrize("multiple", [True, False])
def test_ack_and_reject_frames_are_pamqps(multiple: bool) -> None:
    assert wire.ack_frame(1, 99, multiple=multiple) == frame.marshal(
        spec.Basic.Ack(99, multiple), 1
    )
    assert wire.reject_frame(1, 99, requeue=multiple) == frame.marshal(
        spec.Basic.Reject(99, multiple), 1
    )


def test_a_short_string_that_is_not_utf8_reads_with_replacement_characters() -> None:
    payload = header_payload(spec.Basic.Properties(message_id="ab"))
    broken = payload.replace(b"\x02ab", b"\x02a\xff")
    values = wire.decode_content_header(broken)[1]
    assert values["message_id"] == "a\ufffd"
    raw = values["raw_properties"]
    message = Message(b"", message_id=values["message_id"], raw_properties=raw)
    assert b"\x02a\xff" in publish_header(message)  # relayed as it came


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1_700_000_000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),  # seconds
        (1_700_000_000_000_000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),  # µs
        (1_700_000_000_000_000_000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),  # ns
    ],
)
def test_timestamps_in_any_unit_read_as_a_time(raw: int, expected: datetime) -> None:
    payload = header_payload(spec.Basic.Properties(timestamp=datetime(2000, 1, 1, tzinfo=UTC)))
    stamp = int(datetime(2000, 1, 1, tzinfo=UTC).timestamp()).to_bytes(8, "big")
    patched = payload.replace(stamp, raw.to_bytes(8, "big"))
    assert wire.decode_content_header(patched)[1]["timestamp"] == expected


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p[:-3],  # cut short
        lambda p: p.replace(b"\x06tenantS", b"\x06tenantZ"),
        lambda p: p[:12] + b"\x00\x01" + p[14:],  # a second flags word
    ],
    ids=["truncated", "unknown-field-type", "continued-flags"],
)
def test_a_damaged_header_is_a_frame_error_with_the_body_size_still_known(damage: Any) -> None:
    payload = header_payload(
        spec.Basic.Properties(headers={"tenant": "acme"}, message_id="m"), body_size=77
    )
    broken = damage(payload)
    with pytest.raises(wire.FrameError):
        wire.decode_content_header(broken)
    assert wire.body_size(broken) == 77


def test_a_header_long_string_that_is_not_utf8_reads_as_bytes_as_pamqp_reads_it() -> None:
    payload = header_payload(spec.Basic.Properties(headers={"k": "ab"}))
    broken = payload.replace(b"\x00\x00\x00\x02ab", b"\x00\x00\x00\x02a\xff")
    assert wire.decode_content_header(broken)[1]["headers"] == {"k": b"a\xff"}
    assert pamqp_reading(broken)["headers"] == {"k": b"a\xff"}


@pytest.mark.parametrize(
    "properties",
    [
        spec.Basic.Properties(),
        spec.Basic.Properties(headers={}),
        spec.Basic.Properties(headers={HOPS_HEADER: 3, "a": "b"}, app_id="x"),
        spec.Basic.Properties(headers={HOPS_HEADER: "not a number"}),
        EVERY_PROPERTY,
    ],
    ids=["none", "empty-headers", "hops-already", "hops-unreadable", "every-property"],
)
def test_a_relayed_header_is_the_delivered_one_plus_the_hop_count(
    properties: spec.Basic.Properties,
) -> None:
    payload = header_payload(properties)
    values = wire.decode_content_header(payload)[1]
    assert_passed_on_as_delivered(payload, values, values.pop("raw_properties"))
