"""Dead letters read back for a replay, as tables: what a stream entry or a dead-letter queue's
message gives back, what is lost on the way, the filters and the times they take."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from proxy.deadletters import (
    Filter,
    from_queue_message,
    from_stream_entry,
    make_filter,
    parse_moment,
)
from proxy.encoding import DeadLetterInfo, dead_letter_fields, dead_letter_headers
from proxy.message import HOPS_HEADER, Message
from proxy.sinks.redis_stream import _too_large_entry

NOW = 1_800_000_000.0
INFO = DeadLetterInfo("unrouted", "no route matched", "orders", 1_700_000_000_123)


def entry(fields: dict[str, bytes | str]) -> dict[bytes, bytes]:
    """An entry as redis-py reads it back: every name and value bytes."""
    return {
        name.encode(): value if isinstance(value, bytes) else value.encode()
        for name, value in fields.items()
    }


@pytest.mark.parametrize(
    ("text", "millis"),
    [
        pytest.param("2h", (NOW - 7200) * 1000, id="hours-back"),
        pytest.param("30m", (NOW - 1800) * 1000, id="minutes-back"),
        pytest.param("1.5d", (NOW - 129600) * 1000, id="fraction-of-days"),
        pytest.param("500ms", NOW * 1000 - 500, id="milliseconds"),
        pytest.param("1w", (NOW - 604800) * 1000, id="a-week"),
        pytest.param("2026-01-01T00:00:00Z", 1_767_225_600_000, id="rfc3339-utc"),
        pytest.param("2026-01-01T01:00:00+01:00", 1_767_225_600_000, id="rfc3339-offset"),
    ],
)
def test_a_moment_is_rfc3339_or_back_from_now(text: str, millis: float) -> None:
    assert parse_moment(text, NOW) == round(millis)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("yesterday", "neither an RFC 3339 time", id="words"),
        pytest.param("2026-01-01T00:00:00", "offset from UTC", id="no-offset"),
        pytest.param("-2h", "neither", id="negative"),
    ],
)
def test_a_moment_that_is_neither_is_refused(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_moment(text, NOW)


def test_a_stream_entry_gives_back_what_it_holds() -> None:
    message = Message(
        b'{"id": 1}',
        routing_key="order.created",
        exchange="app",
        queue="events",
        headers={"tenant": "acme", "raw": b"\xff\x00", HOPS_HEADER: 3, "n": 7, "ok": True},
        content_type="application/json",
        content_encoding="utf-8",
        message_id="m-1",
        correlation_id="c-1",
        type="order",
        app_id="shop",
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        priority=5,
        delivery_mode=1,
        reply_to="replies",
    )
    letter = from_stream_entry(entry(dead_letter_fields(message, INFO)))
    back = letter.message
    assert (back.body, back.routing_key, back.exchange, back.queue) == (
        b'{"id": 1}',
        "order.created",
        "app",
        "events",
    )
    assert (back.content_type, back.content_encoding, back.message_id) == (
        "application/json",
        "utf-8",
        "m-1",
    )
    assert (back.correlation_id, back.type, back.app_id) == ("c-1", "order", "shop")
    assert back.timestamp == datetime(2026, 1, 1, tzinfo=UTC)
    # bytes that are not UTF-8 come back as bytes; the hop count is taken off
    assert dict(back.headers) == {"tenant": "acme", "raw": b"\xff\x00", "n": 7, "ok": True}
    # not in the entry, so not restored: published persistent, without the rest
    assert back.delivery_mode == 2
    assert (back.priority, back.reply_to) == (None, None)
    assert (letter.reason, letter.route, letter.failed_at_ms) == (
        "unrouted",
        "orders",
        INFO.failed_at_ms,
    )
    assert letter.unreplayable is None


@pytest.mark.parametrize(
    ("body", "limit", "replayable"),
    [
        pytest.param(b"x" * 5000, 1000, False, id="head-only"),
        pytest.param(b"x" * 500, 100, True, id="whole-body-fits-the-head"),
    ],
)
def test_a_truncated_body_is_never_replayed(body: bytes, limit: int, replayable: bool) -> None:
    info = DeadLetterInfo("too-large", f"body is {len(body)} bytes, the limit is {limit}", None, 1)
    letter = from_stream_entry(entry(_too_large_entry(Message(body), info)))
    assert (letter.unreplayable is None) == replayable
    if not replayable:
        assert letter.unreplayable == f"body truncated: 1024 of {len(body)} bytes kept"


def test_an_entry_without_optional_fields() -> None:
    letter = from_stream_entry({b"body": b"", b"routing_key": b"k", b"exchange": b""})
    assert letter.message.headers == {}
    assert (letter.reason, letter.route, letter.failed_at_ms) == (None, None, None)


def test_a_queue_message_dead_lettered_by_the_worker_goes_back_where_it_came_from() -> None:
    original = Message(b"b", routing_key="order.created", exchange="app", queue="events")
    headers = {
        "tenant": "acme",
        HOPS_HEADER: 2,
        **dead_letter_headers(INFO, original),
    }
    delivered = Message(
        b"b",
        routing_key="order.created",
        exchange="dead-letters",
        queue="dlq",
        headers=headers,
        message_id="m-1",
        priority=4,
        delivery_mode=1,
    )
    letter = from_queue_message(delivered)
    back = letter.message
    assert (back.exchange, back.routing_key, back.queue) == ("app", "order.created", "events")
    assert dict(back.headers) == {"tenant": "acme"}  # the relay's own headers taken off
    assert (back.message_id, back.priority, back.delivery_mode) == ("m-1", 4, 1)  # whole
    assert (letter.reason, letter.route, letter.failed_at_ms) == (
        "unrouted",
        "orders",
        INFO.failed_at_ms,
    )


def test_a_queue_message_dead_lettered_by_rabbitmq_goes_back_by_its_x_death() -> None:
    died = datetime(2026, 1, 1, tzinfo=UTC)
    death = {
        "count": 1,
        "exchange": "app",
        "queue": "events",
        "reason": "expired",
        "routing-keys": ["order.created"],
        "time": died,
    }
    delivered = Message(
        b"b",
        routing_key="order.created",
        exchange="events-dlx",
        queue="dlq",
        headers={"x-death": [death], "x-first-death-reason": "expired"},
    )
    letter = from_queue_message(delivered)
    back = letter.message
    assert (back.exchange, back.routing_key, back.queue) == ("app", "order.created", "events")
    assert back.headers["x-death"] == [death]  # RabbitMQ's history is kept
    assert (letter.reason, letter.route) == ("expired", None)
    assert letter.failed_at_ms == round(died.timestamp() * 1000)


def test_a_plain_queue_message_goes_back_where_it_was_delivered_from() -> None:
    letter = from_queue_message(Message(b"b", routing_key="k", exchange="x", queue="dlq"))
    assert (letter.message.exchange, letter.message.routing_key) == ("x", "k")
    assert (letter.reason, letter.failed_at_ms) == (None, None)


@pytest.mark.parametrize(
    ("selection", "reason", "route", "at", "matches"),
    [
        pytest.param(Filter(), "unrouted", None, None, True, id="no-filter"),
        pytest.param(Filter(frozenset({"unrouted"})), "unrouted", None, 1, True, id="reason"),
        pytest.param(Filter(frozenset({"template"})), "unrouted", None, 1, False, id="reason-not"),
        pytest.param(Filter(routes=frozenset({"a"})), "x", "a", 1, True, id="route"),
        pytest.param(Filter(routes=frozenset({"a"})), "x", None, 1, False, id="no-route"),
        pytest.param(Filter(since_ms=10), "x", None, 10, True, id="since-inclusive"),
        pytest.param(Filter(since_ms=10), "x", None, 9, False, id="before-since"),
        pytest.param(Filter(until_ms=10), "x", None, 10, True, id="until-inclusive"),
        pytest.param(Filter(until_ms=10), "x", None, 11, False, id="after-until"),
        pytest.param(Filter(since_ms=10), "x", None, None, False, id="time-filter-needs-a-time"),
    ],
)
def test_filters(
    selection: Filter, reason: str, route: str | None, at: int | None, matches: bool
) -> None:
    letter = from_stream_entry(
        entry(
            {"body": b"", "error": reason}
            | ({"route": route} if route else {})
            | ({"failed_at": str(at)} if at is not None else {})
        )
    )
    assert selection.matches(letter) is matches


def test_make_filter_reads_both_times() -> None:
    made = make_filter(["a"], ["r"], "2h", "2026-01-01T00:00:00Z", now=NOW)
    assert made == Filter(
        frozenset({"a"}), frozenset({"r"}), round((NOW - 7200) * 1000), 1_767_225_600_000
    )
