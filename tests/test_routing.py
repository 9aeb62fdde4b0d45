"""Route rules as tables: pure functions, no broker."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from proxy.config import parse_config
from proxy.message import Message
from proxy.routing import (
    ExchangeTarget,
    Rejected,
    Routed,
    Router,
    StreamTarget,
    TopicPattern,
    topic_matches,
)


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        pytest.param("order.*", "order.created", True, id="star-one-word"),
        pytest.param("order.*", "order", False, id="star-needs-a-word"),
        pytest.param("order.*", "order.created.eu", False, id="star-only-one-word"),
        pytest.param("order.#", "order", True, id="hash-zero-words"),
        pytest.param("order.#", "order.created.eu", True, id="hash-many-words"),
        pytest.param("#", "", True, id="hash-matches-empty"),
        pytest.param("#", "a.b.c", True, id="hash-matches-all"),
        pytest.param("*", "", True, id="star-matches-empty-word"),
        pytest.param("*", "a.b", False, id="star-not-two-words"),
        pytest.param("#.eu", "order.created.eu", True, id="hash-leading"),
        pytest.param("#.eu", "eu", True, id="hash-leading-zero"),
        pytest.param("#.eu", "order.us", False, id="hash-leading-miss"),
        pytest.param("a.#.z", "a.z", True, id="hash-middle-zero"),
        pytest.param("a.#.z", "a.b.c.z", True, id="hash-middle-many"),
        pytest.param("a.#.z", "a.b.c", False, id="hash-middle-miss"),
        pytest.param("a.*.#", "a", False, id="star-then-hash-needs-one"),
        pytest.param("a.*.#", "a.b", True, id="star-then-hash"),
        pytest.param("#.#", "a", True, id="double-hash"),
        pytest.param("a.b", "a.b", True, id="literal"),
        pytest.param("a.b", "a.c", False, id="literal-miss"),
        pytest.param("a..b", "a..b", True, id="empty-word-literal"),
        pytest.param("*.*", "a.", True, id="trailing-empty-word"),
    ],
)
def test_topic_matching(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern.split("."), key.split(".")) is expected
    assert TopicPattern(pattern).matches(key) is expected


BASE = """
[[sources]]
queue = "events"
"""


def router_for(routes: str, **top: Any) -> Router:
    import tomllib

    data = tomllib.loads(BASE + routes)
    data.update(top)
    return Router.from_config(parse_config(data, environ={}))


def names(decision: Routed | Rejected) -> list[str]:
    assert isinstance(decision, Routed), decision
    return [t.name if isinstance(t, StreamTarget) else t.exchange for t in decision.targets]


ORDERS = """
[[routes]]
name = "orders"
match.routing_key = "order.*"
match.headers = { tenant = "*" }
to = [ { stream = "orders:{headers.tenant}", maxlen = 100 } ]

[[routes]]
name = "vip"
match.json = { "customer.tier" = "gold" }
match.content_type = "application/json"
to = [ { stream = "vip" } ]

[[routes]]
name = "audit"
match.queue = "events"
match.headers = { region = "eu" }
to = [ { exchange = "audit", routing_key = "eu.{routing_key}" } ]
"""


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        pytest.param(
            Message(b"{}", "order.created", headers={"tenant": "acme"}, queue="events"),
            ["orders:acme"],
            id="first-match-wins",
        ),
        pytest.param(
            Message(b"{}", "order.created", headers={"tenant": b"acme"}, queue="events"),
            ["orders:acme"],
            id="bytes-header-as-text",
        ),
        pytest.param(
            Message(
                b'{"customer": {"tier": "gold"}}',
                "invoice.paid",
                content_type="application/json; charset=utf-8",
                queue="events",
            ),
            ["vip"],
            id="json-path-and-content-type-params",
        ),
        pytest.param(
            Message(b"x", "invoice.paid", headers={"region": "eu"}, queue="events"),
            ["audit"],
            id="header-exact",
        ),
    ],
)
def test_routes_pick_destinations(message: Message, expected: list[str]) -> None:
    assert names(router_for(ORDERS).route(message)) == expected


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        pytest.param(Message(b"x", "order.created", queue="events"), "unrouted", id="no-header"),
        pytest.param(
            Message(b"x", "invoice.paid", headers={"region": "us"}, queue="events"),
            "unrouted",
            id="header-mismatch",
        ),
        pytest.param(
            Message(b"not json", "invoice.paid", content_type="application/json", queue="events"),
            "not-json",
            id="json-match-on-garbage",
        ),
        pytest.param(
            Message(b"[1, 2]", "invoice.paid", content_type="application/json", queue="events"),
            "not-json",
            id="json-array-is-not-an-object",
        ),
    ],
)
def test_routes_reject(message: Message, reason: str) -> None:
    decision = router_for(ORDERS).route(message)
    assert isinstance(decision, Rejected)
    assert decision.reason == reason


def test_continue_fans_out_across_routes_in_file_order() -> None:
    router = router_for(
        """
[[routes]]
name = "a"
continue = true
to = [ { stream = "one" } ]

[[routes]]
name = "b"
match.routing_key = "x.#"
to = [ { stream = "two" }, { exchange = "ex" } ]

[[routes]]
name = "never"
to = [ { stream = "three" } ]
"""
    )
    decision = router.route(Message(b"", "x.y", queue="events"))
    assert isinstance(decision, Routed)
    assert [(t.route, type(t).__name__) for t in decision.targets] == [
        ("a", "StreamTarget"),
        ("b", "StreamTarget"),
        ("b", "ExchangeTarget"),
    ]
    exchange = decision.targets[2]
    assert isinstance(exchange, ExchangeTarget)
    assert (exchange.exchange, exchange.routing_key, exchange.template) == ("ex", "x.y", "ex")
    assert names(router.route(Message(b"", "other", queue="events"))) == ["one", "three"]


def test_route_without_match_matches_everything() -> None:
    router = router_for('[[routes]]\nname = "all"\nto = [ { stream = "s:{queue}" } ]')
    assert names(router.route(Message(b"", "", queue="events"))) == ["s:events"]


@pytest.mark.parametrize(
    ("json_match", "body", "matches"),
    [
        pytest.param('{ "n" = 1 }', b'{"n": 1}', True, id="int"),
        pytest.param('{ "n" = 1 }', b'{"n": true}', False, id="bool-is-not-int"),
        pytest.param('{ "ok" = true }', b'{"ok": true}', True, id="bool"),
        pytest.param('{ "a.b.c" = "x" }', b'{"a": {"b": {"c": "x"}}}', True, id="deep"),
        pytest.param('{ "a.b" = "x" }', b'{"a": "b"}', False, id="path-through-scalar"),
        pytest.param('{ "a" = "x" }', b"{}", False, id="missing"),
        pytest.param('{ "a" = [1, 2] }', b'{"a": [1, 2]}', True, id="array-value"),
    ],
)
def test_json_matching(json_match: str, body: bytes, matches: bool) -> None:
    router = router_for(
        f'[[routes]]\nname = "j"\nmatch.json = {json_match}\nto = [{{ stream = "s" }}]'
    )
    decision = router.route(Message(body, "k", queue="events"))
    assert isinstance(decision, Routed) is matches


def test_cheap_checks_run_before_the_body_is_parsed() -> None:
    # A binary body is not dead-lettered as not-json by a route whose routing key does not match.
    router = router_for(
        """
[[routes]]
name = "json-only"
match.routing_key = "json.#"
match.json = { "a" = 1 }
to = [ { stream = "j" } ]

[[routes]]
name = "rest"
to = [ { stream = "rest" } ]
"""
    )
    assert names(router.route(Message(b"\xff\x00", "bin.blob", queue="events"))) == ["rest"]


@pytest.mark.parametrize(
    ("template", "message", "reason"),
    [
        pytest.param("s:{headers.tenant}", Message(b"", "k"), "template", id="missing-header"),
        pytest.param("s:{message_id}", Message(b"", "k"), "template", id="missing-message-id"),
        pytest.param("s:{routing_key.3}", Message(b"", "a.b"), "template", id="missing-word"),
        pytest.param("s:{json.user.id}", Message(b"{}", "k"), "template", id="missing-json-path"),
        pytest.param("s:{json.user}", Message(b"nope", "k"), "not-json", id="json-placeholder"),
        pytest.param(
            "{headers.empty}",
            Message(b"", "k", headers={"empty": ""}),
            "template",
            id="empty-stream-name",
        ),
    ],
)
def test_missing_template_values_reject(template: str, message: Message, reason: str) -> None:
    router = router_for(f'[[routes]]\nname = "t"\nto = [{{ stream = "{template}" }}]')
    decision = router.route(message)
    assert isinstance(decision, Rejected)
    assert (decision.reason, decision.route) == (reason, "t")


def test_plugin_predicate_and_plugin_error() -> None:
    router = router_for(
        """
[[routes]]
name = "vip"
match.plugin = "tests.route_plugins:is_vip"
to = [ { stream = "vip" } ]

[[routes]]
name = "rest"
to = [ { stream = "rest" } ]
"""
    )
    assert names(router.route(Message(b"", "k", headers={"vip": "yes"}))) == ["vip"]
    assert names(router.route(Message(b"", "k"))) == ["rest"]
    crashed = router.route(Message(b"", "k", headers={"crash": "1"}))
    assert isinstance(crashed, Rejected)
    assert crashed.reason == "plugin-error"
    assert "ZeroDivisionError" in crashed.detail


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        pytest.param(Message(b"x" * 11), "too-large", id="too-large"),
        pytest.param(Message(b"", headers={"x-message-proxy-hops": 8}), "loop", id="loop"),
    ],
)
def test_limits_reject_before_routing(message: Message, reason: str) -> None:
    router = router_for('[[routes]]\nname = "all"\nto = [{ stream = "s" }]', max_message_bytes=10)
    decision = router.route(message)
    assert isinstance(decision, Rejected)
    assert decision.reason == reason


def test_seven_hops_still_routes() -> None:
    router = router_for('[[routes]]\nname = "all"\nto = [{ stream = "s" }]')
    message = Message(b"", headers={"x-message-proxy-hops": 7})
    assert names(router.route(message)) == ["s"]


def test_message_timestamp_is_kept() -> None:
    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert Message(b"", timestamp=stamp).timestamp == stamp
