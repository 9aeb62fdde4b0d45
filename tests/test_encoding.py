"""Stream entry fields (docs/REFERENCE.md) and templates, as tables."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest

from proxy.encoding import DeadLetterInfo, dead_letter_fields, entry_fields, headers_json
from proxy.errors import TemplateError
from proxy.message import Message
from proxy.templates import Template


def test_minimal_message_has_the_four_required_fields() -> None:
    fields = entry_fields(Message(b"\x00\xff raw", "a.b", "ex", "q"))
    assert fields == {"body": b"\x00\xff raw", "routing_key": "a.b", "exchange": "ex", "queue": "q"}


def test_every_property_that_is_set_is_written() -> None:
    message = Message(
        b"{}",
        "k",
        "",
        "q",
        headers={"tenant": "acme"},
        content_type="application/json",
        content_encoding="gzip",
        message_id="m-1",
        correlation_id="c-1",
        type="order.created",
        app_id="shop",
        timestamp=datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC),
        delivery_mode=2,
        priority=3,
        reply_to="r",
    )
    fields = entry_fields(message)
    assert fields["content_type"] == "application/json"
    assert fields["content_encoding"] == "gzip"
    assert fields["message_id"] == "m-1"
    assert fields["correlation_id"] == "c-1"
    assert fields["type"] == "order.created"
    assert fields["app_id"] == "shop"
    assert fields["timestamp"] == "1795860000"
    assert orjson.loads(fields["headers"]) == {"tenant": "acme"}
    assert set(fields) == {
        "body",
        "routing_key",
        "exchange",
        "queue",
        "content_type",
        "content_encoding",
        "message_id",
        "correlation_id",
        "type",
        "app_id",
        "timestamp",
        "headers",
    }


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"s": "text"}, {"s": "text"}, id="str"),
        pytest.param({"b": b"utf8 \xc3\xa9"}, {"b": "utf8 é"}, id="utf8-bytes-as-text"),
        pytest.param({"b": b"\xff\x00"}, {"b": "base64:/wA="}, id="binary-bytes-base64"),
        pytest.param({"b": bytearray(b"\xfe")}, {"b": "base64:/g=="}, id="bytearray"),
        pytest.param(
            {"t": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)},
            {"t": "2026-01-02T03:04:05Z"},
            id="aware-timestamp-rfc3339",
        ),
        pytest.param(
            {"t": datetime(2026, 1, 2, 3, 4, 5)},
            {"t": "2026-01-02T03:04:05Z"},
            id="naive-timestamp-is-utc",
        ),
        pytest.param(
            {"n": 1, "f": 1.5, "ok": True, "none": None},
            {"n": 1, "f": 1.5, "ok": True, "none": None},
            id="scalars",
        ),
        pytest.param({"d": Decimal("1.25")}, {"d": 1.25}, id="decimal"),
        pytest.param(
            {"nested": {"list": [b"\xff", "x", 1]}},
            {"nested": {"list": ["base64:/w==", "x", 1]}},
            id="nested",
        ),
    ],
)
def test_headers_json(headers: dict[str, Any], expected: dict[str, Any]) -> None:
    assert orjson.loads(headers_json(headers)) == expected


def test_dead_letter_fields_add_reason_detail_route_and_time() -> None:
    info = DeadLetterInfo(
        "template", "message has no header\n'tenant'", "orders", 1_700_000_000_123
    )
    fields = dead_letter_fields(Message(b"x", "k", "ex", "q"), info)
    assert fields["error"] == "template"
    assert fields["detail"] == "message has no header 'tenant'"  # one line
    assert fields["route"] == "orders"
    assert fields["failed_at"] == "1700000000123"
    assert fields["body"] == b"x"


def test_dead_letter_without_route_has_no_route_field() -> None:
    info = DeadLetterInfo("unrouted", "no route matched", None, 1)
    assert "route" not in dead_letter_fields(Message(b""), info)


MESSAGE = Message(
    b'{"user": {"id": 42, "name": "ann"}, "tags": ["a"]}',
    "order.created.eu",
    "app",
    "events",
    headers={"tenant": "acme", "n": 7, "raw": b"\xff"},
    message_id="m-9",
)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        pytest.param("plain", "plain", id="constant"),
        pytest.param("{routing_key}", "order.created.eu", id="routing-key"),
        pytest.param("{routing_key.0}:{routing_key.2}", "order:eu", id="routing-words"),
        pytest.param("{exchange}/{queue}", "app/events", id="exchange-queue"),
        pytest.param("id-{message_id}", "id-m-9", id="message-id"),
        pytest.param("t:{headers.tenant}:{headers.n}", "t:acme:7", id="headers"),
        pytest.param("u:{json.user.id}:{json.user.name}", "u:42:ann", id="json"),
        pytest.param("{json.tags}", '["a"]', id="json-non-scalar"),
        pytest.param("{{literal}}-{queue}", "{literal}-events", id="escaped-braces"),
        pytest.param("{ queue }", "events", id="spaces-inside"),
    ],
)
def test_template_expansion(template: str, expected: str) -> None:
    assert Template.parse(template).expand(MESSAGE) == expected


@pytest.mark.parametrize(
    "template",
    ["{headers.missing}", "{routing_key.9}", "{json.user.missing}", "{headers.raw}"],
)
def test_template_missing_value(template: str) -> None:
    with pytest.raises(TemplateError):
        Template.parse(template).expand(MESSAGE)


@pytest.mark.parametrize(
    "template",
    ["{nope}", "{headers}", "{json}", "{json.a..b}", "{routing_key.x}", "{", "}", "{queue.x}"],
)
def test_bad_templates_are_refused_at_parse_time(template: str) -> None:
    with pytest.raises(ValueError):
        Template.parse(template)
