"""Properties of the pure parts over arbitrary input: route matching and entry encoding.

Whatever the headers, body or routing key, routing answers destinations or a dead-letter reason and
encoding answers stream fields; no exception escapes either.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from proxy.amqp.frames import lenient_timestamp
from proxy.config import Config, parse_config
from proxy.encoding import DeadLetterInfo, dead_letter_fields, entry_fields, entry_resp
from proxy.errors import ConfigError
from proxy.message import HOPS_HEADER, Message, header_text
from proxy.routing import ExchangeTarget, Rejected, Routed, Router, StreamTarget, topic_matches
from proxy.sinks.redis_stream import packed_xadds
from proxy.sinks.resp import pack_commands

REASONS = {"unrouted", "template", "not-json", "too-large", "plugin-error", "loop"}

# derandomize: the same examples on every CI run, so a red build always means a changed behaviour.
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- strategies ---------------------------------------------------------------------------------

WORDS = ["a", "b", "order", "created", "", "é"]
routing_keys = st.one_of(
    st.lists(st.sampled_from(WORDS), max_size=6).map(".".join),
    st.text(max_size=30),
)
patterns = st.lists(st.sampled_from([*WORDS, "*", "#"]), min_size=1, max_size=6).map(".".join)

# Timestamps as the AMQP decoder gives them: aware UTC, from a 64-bit count of (milli-, micro- or
# nano-) seconds since 1970.
timestamps = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2554, 1, 1), timezones=st.just(UTC)
)
# What an AMQP field table can hold once aiormq has decoded it.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.decimals(allow_nan=False, allow_infinity=False, places=4),
    st.text(max_size=20),
    st.binary(max_size=20),
    timestamps,
)
header_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
header_names = st.one_of(
    st.sampled_from(["tenant", "vip", "crash", HOPS_HEADER]), st.text(max_size=10)
)
headers = st.dictionaries(header_names, header_values, max_size=5) | st.builds(
    lambda rest, hops: {**rest, HOPS_HEADER: hops},
    st.dictionaries(header_names, header_values, max_size=3),
    scalars | st.sampled_from([float("inf"), Decimal("-Infinity"), 7, 8, "9"]),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["type", "a", "b", "user", "id"]), children, max_size=3)
    ),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(["type", "a", "user", "x"]), json_values).map(orjson.dumps),
    json_values.map(orjson.dumps),
)
optional_text = st.none() | st.text(max_size=20)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    return Message(
        body=draw(bodies),
        routing_key=draw(routing_keys),
        exchange=draw(st.sampled_from(["", "app", "audit"])),
        queue=draw(st.sampled_from(["q", "other"])),
        headers=draw(headers),
        content_type=draw(st.none() | st.sampled_from(["application/json", "text/plain; x=1"])),
        content_encoding=draw(optional_text),
        message_id=draw(optional_text),
        correlation_id=draw(optional_text),
        timestamp=draw(st.none() | timestamps),
        type=draw(optional_text),
        app_id=draw(optional_text),
        redelivered=draw(st.booleans()),
    )


# --- topic matching -----------------------------------------------------------------------------


def reference_match(pattern: Sequence[str], words: Sequence[str]) -> bool:
    """AMQP topic matching by its definition, recursively."""
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(reference_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and reference_match(rest, words[1:])


@SETTINGS
@given(pattern=patterns, key=routing_keys)
def test_topic_matching_agrees_with_the_definition(pattern: str, key: str) -> None:
    expected = reference_match(pattern.split("."), key.split("."))
    assert topic_matches(pattern.split("."), key.split(".")) is expected


# --- routing ------------------------------------------------------------------------------------

FIXED_ROUTES: list[dict[str, Any]] = [
    {
        "name": "orders",
        "match": {"routing_key": "order.*", "headers": {"tenant": "*"}},
        "to": [{"stream": "orders:{headers.tenant}", "dedupe": True, "maxlen": 10}],
    },
    {
        "name": "typed",
        "match": {"json": {"type": "created", "user.id": 1}},
        "continue": True,
        "to": [{"stream": "typed:{json.type}:{json.user}"}],
    },
    {
        "name": "json",
        "match": {"content_type": "application/json"},
        "continue": True,
        "to": [{"exchange": "x-{routing_key.0}", "routing_key": "{routing_key.1}.{message_id}"}],
    },
    {
        "name": "vip",
        "match": {"headers": {"vip": "yes"}, "queue": "q", "plugin": "tests.route_plugins:is_vip"},
        "to": [{"stream": "vip:{message_id}"}],
    },
    {"name": "audit", "match": {"routing_key": "#.created.#"}, "to": [{"stream": "{exchange}"}]},
]


def config_for(routes: list[dict[str, Any]]) -> Config:
    return parse_config(
        {"sources": [{"queue": "q"}], "routes": routes, "max_message_bytes": 1000}, environ={}
    )


FIXED_CONFIG = config_for(FIXED_ROUTES)
FIXED_ROUTER = Router.from_config(FIXED_CONFIG)
ROUTING_KEY_ONLY = config_for(FIXED_ROUTES[-1:])  # decisions that may be cached


def assert_is_a_decision(decision: object) -> None:
    if isinstance(decision, Rejected):
        assert decision.reason in REASONS, decision
        assert isinstance(decision.detail, str)
        return
    assert isinstance(decision, Routed), decision
    assert decision.targets
    for target in decision.targets:
        if isinstance(target, StreamTarget):
            assert isinstance(target.name, str)
            assert target.name
        else:
            assert isinstance(target, ExchangeTarget)
            assert isinstance(target.exchange, str)
            assert isinstance(target.routing_key, str)


@SETTINGS
@given(message=messages())
def test_routing_any_message_gives_destinations_or_a_reason(message: Message) -> None:
    assert_is_a_decision(FIXED_ROUTER.route(message))


@SETTINGS
@given(sequence=st.lists(messages(), min_size=1, max_size=8))
def test_a_decision_does_not_depend_on_the_messages_routed_before(
    sequence: list[Message],
) -> None:
    shared = Router.from_config(ROUTING_KEY_ONLY)
    for message in sequence:
        assert _same(shared.route(message), Router.from_config(ROUTING_KEY_ONLY).route(message))
        assert _same(FIXED_ROUTER.route(message), Router.from_config(FIXED_CONFIG).route(message))


def _same(a: object, b: object) -> bool:
    if isinstance(a, Rejected) and isinstance(b, Rejected):
        return (a.reason, a.route) == (b.reason, b.route)
    return a == b


templates = st.lists(
    st.sampled_from(
        [
            *("x", ":", "{routing_key}", "{routing_key.2}", "{exchange}", "{queue}"),
            *("{message_id}", "{headers.tenant}", "{headers.vip}", "{json.type}"),
            *("{json.user.id}", "{{", "}}"),
        ]
    ),
    min_size=1,
    max_size=4,
).map("".join)
matches = st.fixed_dictionaries(
    {},
    optional={
        "routing_key": patterns,
        "headers": st.dictionaries(
            st.sampled_from(["tenant", "vip"]), st.sampled_from(["*", "yes", "acme"]), max_size=2
        ),
        "content_type": st.sampled_from(["application/json", "TEXT/plain"]),
        "json": st.dictionaries(
            st.sampled_from(["type", "user.id", "a.b"]),
            st.one_of(st.none(), st.booleans(), st.integers(0, 2), st.sampled_from(["created"])),
            max_size=2,
        ),
        "queue": st.sampled_from(["q", "other"]),
    },
)
destinations = st.one_of(
    st.builds(lambda s, d: {"stream": s, "dedupe": d}, templates, st.booleans()),
    st.builds(lambda x, k: {"exchange": x, "routing_key": k}, templates, templates),
)
route_lists = st.lists(
    st.fixed_dictionaries(
        {
            "match": matches,
            "continue": st.booleans(),
            "to": st.lists(destinations, min_size=1, max_size=2),
        }
    ),
    min_size=1,
    max_size=4,
)


@SETTINGS
@given(routes=route_lists, sequence=st.lists(messages(), min_size=1, max_size=5))
def test_any_routes_over_any_messages_give_destinations_or_a_reason(
    routes: list[dict[str, Any]], sequence: list[Message]
) -> None:
    for index, route in enumerate(routes):
        route["name"] = f"r{index}"
    try:
        router = Router.from_config(config_for(routes))
    except ConfigError:
        assume(False)
        return
    for message in sequence:
        assert_is_a_decision(router.route(message))


@SETTINGS
@given(body=st.binary(min_size=1001, max_size=1100), message=messages())
def test_a_body_over_the_limit_is_too_large_whatever_else(body: bytes, message: Message) -> None:
    big = Message(body=body, routing_key=message.routing_key, headers=message.headers)
    decision = FIXED_ROUTER.route(big)
    assert isinstance(decision, Rejected)
    assert decision.reason == "too-large"


# --- entry encoding -----------------------------------------------------------------------------


def _decoded_header(value: Any) -> Any:
    """What a header value must look like once encoded to JSON and read back."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _decoded_header(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decoded_header(v) for v in value]
    return value


@SETTINGS
@given(message=messages())
def test_entry_fields_keep_the_body_and_encode_every_header(message: Message) -> None:
    fields = entry_fields(message)
    assert fields["body"] == message.body
    assert all(isinstance(v, bytes | str) for v in fields.values())
    assert fields["routing_key"] == message.routing_key
    for name in ("message_id", "correlation_id", "type", "app_id", "content_encoding"):
        assert fields.get(name) == getattr(message, name)
    if not message.headers:
        assert "headers" not in fields
        return
    decoded = orjson.loads(fields["headers"])
    assert isinstance(decoded, dict)
    assert set(decoded) == set(message.headers)
    for name, value in message.headers.items():
        if isinstance(value, str | bytes | bool | int | list | dict) or value is None:
            if _plain(value):
                assert decoded[name] == _decoded_header(value)


@SETTINGS
@given(message=messages())
def test_entry_resp_is_entry_fields_as_redis_py_packs_them(message: Message) -> None:
    try:
        fields = entry_fields(message)
    except Exception as exc:  # headers that cannot be encoded: both refuse them alike
        with pytest.raises(type(exc)):
            entry_resp(message)
        return
    target = StreamTarget("r", "s", "s", 100)
    packed = pack_commands(packed_xadds([(0, target, None, entry_resp(message))]))  # type: ignore[list-item]
    flat = [part for pair in fields.items() for part in pair]
    reference = Connection().pack_command("XADD", "s", "MAXLEN", "~", 100, "*", *flat)
    assert packed == b"".join(reference)


def _plain(value: Any) -> bool:
    """No floats, decimals or datetimes inside: those compare only approximately."""
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return not isinstance(value, float | Decimal) and not hasattr(value, "isoformat")


@SETTINGS
@given(message=messages(), detail=st.text(max_size=800), route=optional_text)
def test_dead_letter_fields_add_a_one_line_detail(
    message: Message, detail: str, route: str | None
) -> None:
    fields = dead_letter_fields(message, DeadLetterInfo("template", detail, route, 1234))
    assert fields["body"] == message.body
    assert fields["error"] == "template"
    assert fields["failed_at"] == "1234"
    assert isinstance(fields["detail"], str)
    assert "\n" not in fields["detail"]
    assert len(fields["detail"]) <= 500
    assert fields.get("route") == route


@SETTINGS
@given(value=header_values)
def test_header_text_never_raises(value: Any) -> None:
    text = header_text(value)
    assert text is None or isinstance(text, str)


@SETTINGS
@given(raw=st.integers(min_value=0, max_value=2**64 - 1))
def test_any_64_bit_timestamp_decodes_to_a_utc_time(raw: int) -> None:
    consumed, value = lenient_timestamp(raw.to_bytes(8, "big"))
    assert consumed == 8
    assert value.tzinfo is not None
    # Seconds, milliseconds (pamqp's own reading reaches past 5139), microseconds or nanoseconds:
    # whatever the unit, a time a datetime can hold.
    assert datetime(1970, 1, 1, tzinfo=UTC) <= value <= datetime.max.replace(tzinfo=UTC)
    if raw <= 0xFFFFFFFF:  # seconds: exactly what pamqp itself reads
        assert value.timestamp() == raw
