"""Field tables both ways, no broker: every type RabbitMQ accepts reads back as sent, names and
strings that are not UTF-8 stay bytes, and a spliced table keeps every byte it does not own."""

from __future__ import annotations

import base64
import struct
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp import frame
from pamqp.header import ContentHeader

from proxy.amqp import frames as wire
from proxy.amqp.tables import (
    FrameError,
    decode_table,
    entries,
    field_table,
    field_value,
    splice_table,
)
from proxy.encoding import headers_json
from tests.test_properties import SETTINGS, header_values


def entry(name: bytes, kind: bytes, payload: bytes = b"") -> bytes:
    return bytes([len(name)]) + name + kind + payload


def table(*parts: bytes) -> bytes:
    body = b"".join(parts)
    return struct.pack(">I", len(body)) + body


def long(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def with_headers(properties: spec.Basic.Properties, headers: bytes, body_size: int = 0) -> bytes:
    """A content header payload with ``headers`` as its raw header table."""
    properties.headers = {"placeholder": "here"}
    placeholder = field_table(properties.headers)
    payload = wire.content_header(properties, body_size)
    assert payload.count(placeholder) == 1
    return payload.replace(placeholder, headers)


def read(raw: bytes) -> dict[Any, Any]:
    decoded, end = decode_table(raw, 0)
    assert end == len(raw)
    return decoded


STAMP = datetime(2026, 11, 28, 12, 30, 5, tzinfo=UTC)

# (type, its payload on the wire, the value it reads as): every type of RabbitMQ's table grammar.
EVERY_TYPE = [
    pytest.param(b"t", b"\x01", True, id="t-bool"),
    pytest.param(b"b", b"\xff", -1, id="b-int8"),
    pytest.param(b"B", b"\xff", 255, id="B-uint8"),
    pytest.param(b"s", b"\xff\xfe", -2, id="s-int16"),
    pytest.param(b"u", b"\xff\xff", 65535, id="u-uint16"),
    pytest.param(b"I", struct.pack(">i", -5), -5, id="I-int32"),
    pytest.param(b"i", b"\xff" * 4, 2**32 - 1, id="i-uint32"),
    pytest.param(b"l", struct.pack(">q", -(2**63)), -(2**63), id="l-int64"),
    pytest.param(b"L", struct.pack(">Q", 2**63 + 5), 2**63 + 5, id="L-uint64-above-2-63"),
    pytest.param(b"f", struct.pack(">f", 1.5), 1.5, id="f-float32"),
    pytest.param(b"d", struct.pack(">d", 0.1), 0.1, id="d-float64"),
    pytest.param(b"D", b"\x02" + struct.pack(">i", 1250), Decimal("12.50"), id="D-decimal"),
    pytest.param(b"S", long("é".encode()), "é", id="S-text"),
    pytest.param(b"S", long(b"\xff\x00"), b"\xff\x00", id="S-not-utf8-stays-bytes"),
    pytest.param(b"x", long(b"\x00\x01"), bytearray(b"\x00\x01"), id="x-byte-array"),
    pytest.param(b"A", long(b"b\x01S\x00\x00\x00\x01aV"), [1, "a", None], id="A-array"),
    pytest.param(b"T", struct.pack(">Q", int(STAMP.timestamp())), STAMP, id="T-seconds"),
    pytest.param(b"T", struct.pack(">Q", int(STAMP.timestamp()) * 1000), STAMP, id="T-millis"),
    pytest.param(b"F", table(entry(b"k", b"S", long(b"v"))), {"k": "v"}, id="F-table"),
    pytest.param(b"V", b"", None, id="V-void"),
]


@pytest.mark.parametrize(("kind", "payload", "value"), EVERY_TYPE)
def test_every_field_type_reads_as_its_value(kind: bytes, payload: bytes, value: Any) -> None:
    raw = table(entry(b"a", b"S", long(b"before")), entry(b"v", kind, payload), entry(b"z", b"t\0"))
    assert read(raw) == {"a": "before", "v": value, "z": False}
    # the walk that splicing relies on finds the same three entries, whatever the type
    assert [name for name, _, _ in entries(raw)] == [b"a", b"v", b"z"]


@pytest.mark.parametrize(("kind", "payload", "value"), EVERY_TYPE)
def test_every_value_written_reads_back_as_itself(kind: bytes, payload: bytes, value: Any) -> None:
    assert read(table(entry(b"v", field_value(value)[:1], field_value(value)[1:]))) == {"v": value}


def test_an_unsigned_64_bit_header_is_positive_where_pamqp_reads_it_negative() -> None:
    raw = table(entry(b"big", b"L", struct.pack(">Q", 2**63 + 5)))
    assert read(raw) == {"big": 2**63 + 5}
    assert field_value(2**63 + 5) == b"L" + struct.pack(">Q", 2**63 + 5)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            table(entry(b"outer", b"F", table(entry(b"k\xff", b"S", long(b"v"))))),
            {"outer": {b"k\xff": "v"}},
            id="nested-key",
        ),
        pytest.param(table(entry(b"\xfe\xff", b"b", b"\x07")), {b"\xfe\xff": 7}, id="top-key"),
        pytest.param(
            table(entry(b"a", b"A", long(b"F" + table(entry(b"\xc3", b"V"))))),
            {"a": [{b"\xc3": None}]},
            id="key-in-a-table-in-an-array",
        ),
    ],
)
def test_a_name_that_is_not_utf8_stays_bytes(raw: bytes, expected: dict[Any, Any]) -> None:
    assert read(raw) == expected


def test_a_bad_nested_name_costs_nothing_else_of_the_message() -> None:
    """The message id, the other headers and the raw bytes survive; nothing is a defect."""
    headers = table(
        entry(b"tenant", b"S", long(b"acme")),
        entry(b"outer", b"F", table(entry(b"k\xff", b"L", struct.pack(">Q", 2**63 + 5)))),
    )
    payload = with_headers(spec.Basic.Properties(message_id="m-1"), headers, body_size=3)
    size, values = wire.decode_content_header(payload)
    assert size == 3 and values["message_id"] == "m-1"
    assert values["headers"] == {"tenant": "acme", "outer": {b"k\xff": 2**63 + 5}}
    assert values["raw_properties"].headers == headers


def test_a_name_that_is_not_utf8_is_written_to_json_like_such_a_value() -> None:
    decoded = read(
        table(
            entry(b"k\xff", b"S", long(b"\xfe")),
            entry(b"outer", b"F", table(entry(b"\xc3", b"S", long(b"text")))),
        )
    )
    tag = "base64:" + base64.b64encode(b"k\xff").decode()
    assert orjson.loads(headers_json(decoded)) == {
        tag: "base64:" + base64.b64encode(b"\xfe").decode(),
        "outer": {"base64:" + base64.b64encode(b"\xc3").decode(): "text"},
    }


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(table(entry(b"a", b"Z", b"")), id="unknown-type"),
        pytest.param(table(entry(b"a", b"S", long(b"abc")))[:-1], id="cut-short"),
        pytest.param(b"\x00\x00\x00\x09" + entry(b"a", b"b", b"\x01") + b"\x01", id="overrun"),
    ],
)
def test_bytes_that_are_no_table_are_a_frame_error(raw: bytes) -> None:
    with pytest.raises(FrameError):
        decode_table(raw, 0)


def test_tables_nested_past_the_stack_are_a_frame_error_not_a_crash() -> None:
    raw = table(entry(b"leaf", b"V"))
    for _ in range(5000):
        raw = table(entry(b"n", b"F", raw))
    with pytest.raises(FrameError, match="nested too deep"):
        decode_table(raw, 0)


@SETTINGS
@given(
    value=st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), header_values, max_size=5)
)
def test_any_table_reads_back_as_written(value: dict[Any, Any]) -> None:
    try:
        raw = field_table(value)
    except ValueError:
        return  # a decimal that no AMQP decimal holds: refused when written, never sent
    assert comparable(read(raw)) == comparable(_as_read(value))
    # a content header carrying it reads as pamqp reads the same frame, where pamqp can
    try:
        payload = frame.marshal(ContentHeader(0, 0, spec.Basic.Properties(headers={})), 1)[7:-1]
        payload = payload[:-4] + raw
        theirs = ContentHeader()
        theirs.unmarshal(payload)
    except (ValueError, TypeError, OverflowError):
        return  # pamqp cannot read it (a name that is not UTF-8, a huge time)
    ours = wire.decode_content_header(payload)[1]["headers"]
    assert comparable(ours) == comparable(theirs.properties.headers)


def comparable(value: Any) -> Any:
    """NaN equal to itself, and pamqp's signed reading of ``L`` aside."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [comparable(item) for item in value]
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2**63:
        return value - 2**64
    return value


def _as_read(value: Any) -> Any:
    """What a written value reads back as: text names stay text, UTF-8 bytes values as text."""
    if isinstance(value, dict):
        return {_as_read_name(k): _as_read(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_read(item) for item in value]
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value
    if isinstance(value, datetime):  # whole seconds, or milliseconds past 2106
        if value.timestamp() < 2**32:
            return datetime.fromtimestamp(int(value.timestamp()), UTC)
        return datetime.fromtimestamp(int(value.timestamp() * 1000) / 1000, UTC)
    return value


def _as_read_name(name: str | bytes) -> str | bytes:
    if isinstance(name, bytes):
        try:
            return name.decode()
        except UnicodeDecodeError:
            return name
    return name


# --- splicing -----------------------------------------------------------------------------------

HOPS = b"x-message-proxy-hops"
A, B = entry(b"a", b"f", struct.pack(">f", 0.5)), entry(b"b", b"B", b"\x07")


@pytest.mark.parametrize(
    ("before", "updates", "after"),
    [
        pytest.param(b"", {"x-message-proxy-hops": b"b\x01"}, table(entry(HOPS, b"b\x01")),
                     id="none"),
        pytest.param(
            table(A, B), {"x-message-proxy-hops": b"b\x01"}, table(A, B, entry(HOPS, b"b\x01")),
            id="appended",
        ),
        pytest.param(
            table(A, entry(HOPS, b"S", long(b"1")), B), {"x-message-proxy-hops": b"b\x02"},
            table(A, entry(HOPS, b"b\x02"), B), id="in-place-whatever-its-type",
        ),
        pytest.param(
            table(entry(HOPS, b"b\x06"), A, entry(HOPS, b"b\x06"), B),
            {"x-message-proxy-hops": b"b\x07"},
            table(entry(HOPS, b"b\x07"), A, B), id="a-repeat-dropped",
        ),
        pytest.param(
            table(A, entry(b"x-message-proxy-error", b"S", long(b"old")), B),
            {"x-message-proxy-hops": b"b\x01", "x-message-proxy-error": b"S" + long(b"new")},
            table(A, entry(b"x-message-proxy-error", b"S", long(b"new")), B, entry(HOPS, b"b\x01")),
            id="some-in-place-some-appended",
        ),
    ],
)  # fmt: skip
def test_a_splice_sets_its_entries_and_keeps_every_other_byte(
    before: bytes, updates: dict[str, bytes], after: bytes
) -> None:
    assert splice_table(before, updates) == after


def test_a_splice_told_nothing_is_present_only_appends() -> None:
    assert splice_table(table(A), {"n": b"V"}, present=False) == table(A, entry(b"n", b"V"))


@pytest.mark.parametrize(("kind", "payload", "value"), EVERY_TYPE)
def test_a_splice_keeps_every_type_byte_for_byte(kind: bytes, payload: bytes, value: Any) -> None:
    before = table(entry(b"v", kind, payload), entry(HOPS, b"b\x03"), entry(b"w", kind, payload))
    after = splice_table(before, {"x-message-proxy-hops": b"b\x04"})
    assert after == before.replace(entry(HOPS, b"b\x03"), entry(HOPS, b"b\x04"))
    assert read(after) == {"v": value, "x-message-proxy-hops": 4, "w": value}
