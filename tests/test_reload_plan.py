"""What a reload would change, and what it refuses: the plan as a table, no broker."""

from __future__ import annotations

import tomllib

import pytest

from proxy.config import Config, parse_config
from proxy.reload import RESTART_PROBLEM, describe, plan_reload

BASE = """
[[sources]]
queue = "q1"

[[sources]]
queue = "q2"

[[routes]]
name = "all"
to = [ { stream = "s" } ]
"""


def config(text: str = BASE, extra: str = "") -> Config:
    return parse_config(tomllib.loads(extra + text), environ={})


BOTH = frozenset({"stream", "exchange"})


@pytest.mark.parametrize(
    ("extra", "text", "problems", "changed", "summary"),
    [
        pytest.param("", BASE, [], [], "", id="same-file"),
        pytest.param(
            "", BASE.replace('stream = "s"', 'stream = "t"'), [], ["routes"], "routes", id="routes"
        ),
        pytest.param(
            'unrouted = "drop"\nlog_level = "debug"\n',
            BASE,
            [],
            ["unrouted", "log_level"],
            "unrouted, log_level",
            id="top-level-keys",
        ),
        pytest.param(
            "",
            BASE + '[dead_letter]\nstream = "dl"\n',
            [],
            ["dead_letter"],
            "dead_letter",
            id="dead-letter-added",
        ),
        pytest.param(
            "",
            BASE + "[batch]\nmax_messages = 10\n",
            [],
            ["batch"],
            "batch",
            id="batch",
        ),
        pytest.param(
            "",
            BASE.replace('queue = "q2"', 'queue = "q3"'),
            [],
            ["sources"],
            "sources (+q3, -q2)",
            id="source-replaced",
        ),
        pytest.param(
            "",
            BASE.replace('queue = "q2"', 'queue = "q2"\narguments = { "x-max-length" = 10 }'),
            [],
            ["sources"],
            "sources (~q2)",
            id="source-changed-is-restarted",
        ),
        pytest.param(
            "",
            BASE.replace('queue = "q1"', 'queue = "q0"')
            .replace('queue = "q2"', 'queue = "q1"')
            .replace('queue = "q0"', 'queue = "q2"'),
            [],
            ["sources"],
            "sources (order)",
            id="sources-reordered",
        ),
        pytest.param(
            "[amqp]\nprefetch = 10\nheartbeat = 5\n",
            BASE,
            [("amqp.prefetch", RESTART_PROBLEM), ("amqp.heartbeat", RESTART_PROBLEM)],
            [],
            "",
            id="amqp-keys-need-a-restart",
        ),
        pytest.param(
            '[redis]\nurl = "redis://other:6379/0"\n[health]\nport = 9\n',
            BASE,
            [("redis.url", RESTART_PROBLEM), ("health.port", RESTART_PROBLEM)],
            [],
            "",
            id="redis-and-health-need-a-restart",
        ),
        pytest.param(
            'pid_file = "/tmp/x.pid"\n[amqp_out]\nurl = "amqp://u:p@other:5672/%2F"\n',
            BASE,
            [("amqp_out", RESTART_PROBLEM), ("pid_file", RESTART_PROBLEM)],
            [],
            "",
            id="a-table-added-needs-a-restart",
        ),
    ],
)
def test_plan(
    extra: str, text: str, problems: list[tuple[str, str]], changed: list[str], summary: str
) -> None:
    plan = plan_reload(config(), config(text, extra), destination_kinds=BOTH)
    assert list(plan.problems) == problems
    assert list(plan.changed) == changed
    assert describe(plan) == summary
    assert plan.unchanged == (not problems and not changed)


def test_a_source_removed_and_added_is_stopped_then_started() -> None:
    new = config(BASE.replace('queue = "q2"', 'queue = "q2"\ndeclare = false'))
    plan = plan_reload(config(), new, destination_kinds=BOTH)
    assert plan.removed == ("q2",)
    assert [s.queue for s in plan.added] == ["q2"]
    assert plan.added[0].declare is False


def test_the_password_of_a_changed_url_is_not_in_the_problem() -> None:
    old = config(extra='[amqp]\nurl = "amqp://u:old-secret@h:5672/%2F"\n')
    new = config(extra='[amqp]\nurl = "amqp://u:new-secret@h:5672/%2F"\n')
    plan = plan_reload(old, new, destination_kinds=BOTH)
    assert plan.problems == (("amqp.url", RESTART_PROBLEM),)
    assert "secret" not in repr(plan)


@pytest.mark.parametrize(
    ("text", "kinds", "key"),
    [
        pytest.param(
            BASE.replace('{ stream = "s" }', '{ exchange = "x" }'),
            {"stream"},
            "routes[0].to[0]",
            id="exchange-without-a-publisher",
        ),
        pytest.param(BASE, {"exchange"}, "routes[0].to[0]", id="stream-without-redis"),
        pytest.param(
            BASE.replace('{ stream = "s" }', '{ exchange = "x" }')
            + '[dead_letter]\nstream = "dl"\n',
            {"exchange"},
            "dead_letter.stream",
            id="dead-letter-stream-without-redis",
        ),
    ],
)
def test_a_destination_kind_the_worker_has_no_connection_for_is_refused(
    text: str, kinds: set[str], key: str
) -> None:
    plan = plan_reload(config(), config(text), destination_kinds=kinds)
    assert [k for k, _ in plan.problems] == [key]
    assert "restart the worker" in plan.problems[0][1]
