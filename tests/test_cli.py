"""``message-proxy check`` and ``route``, and the role entry points' refusals: no broker needed."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.helpers import run_cli

CONFIG = """
[amqp]
url = "amqp://bridge:hunter2-secret@rabbit:5672/%2F"

[redis]
url = "redis://:redis-secret@cache:6379/0"

[[sources]]
queue = "events"
bindings = [ { exchange = "app", routing_key = "order.#" } ]

[[routes]]
name = "orders"
match.routing_key = "order.*"
match.headers = { tenant = "*" }
continue = true
to = [ { stream = "orders:{headers.tenant}", maxlen = 1000 } ]

[[routes]]
name = "audit"
match.json = { "type" = "order.created" }
to = [ { exchange = "audit", routing_key = "audit.{routing_key.1}" } ]

[dead_letter]
stream = "dead"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    return path


def test_check_prints_routes_and_hides_secrets(config: Path) -> None:
    result = run_cli(["check", "--config", str(config)])
    assert result.returncode == 0, result.stderr
    assert "route orders" in result.stdout
    assert "stream orders:{headers.tenant} maxlen~1000" in result.stdout
    assert "exchange 'audit'" in result.stdout
    assert "config OK" in result.stdout
    assert "hunter2-secret" not in result.stdout + result.stderr
    assert "redis-secret" not in result.stdout + result.stderr
    assert "bridge:***@rabbit" in result.stdout


def test_route_dry_run_as_json(config: Path, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(b'{"type": "order.created"}')
    result = run_cli(
        [
            "route",
            "--config",
            str(config),
            "--routing-key",
            "order.created",
            "--header",
            "tenant=acme",
            "--body",
            f"@{body}",
            "--json",
        ]
    )
    assert result.returncode == 0, result.stderr
    decision = orjson.loads(result.stdout)
    assert decision["decision"] == "routed"
    assert decision["routes"] == ["orders", "audit"]
    assert [d.get("stream") or d.get("exchange") for d in decision["destinations"]] == [
        "orders:acme",
        "audit",
    ]
    assert decision["destinations"][1]["routing_key"] == "audit.created"


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        pytest.param(["--routing-key", "order.created", "--body", "{}"], "unrouted", id="unrouted"),
        pytest.param(["--routing-key", "x", "--body", "not json"], "not-json", id="not-json"),
    ],
)
def test_route_dry_run_reports_dead_letters(config: Path, args: list[str], reason: str) -> None:
    result = run_cli(["route", "--config", str(config), *args, "--json"])
    assert result.returncode == 0, result.stderr
    decision = orjson.loads(result.stdout)
    assert (decision["decision"], decision["reason"]) == ("dead-letter", reason)


def test_route_dry_run_text(config: Path) -> None:
    result = run_cli(
        [
            "route",
            "--config",
            str(config),
            "--routing-key",
            "order.paid",
            "--header",
            "tenant=t1",
            "--body",
            "{}",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "orders -> stream orders:t1" in result.stdout


def test_route_with_bad_header_argument_exits_2(config: Path) -> None:
    result = run_cli(["route", "--config", str(config), "--routing-key", "k", "--header", "nope"])
    assert result.returncode == 2
    assert "--header" in result.stderr


@pytest.mark.parametrize(
    ("module", "key"),
    [
        pytest.param("workers.stream_bridge", "routes[1].to[0]", id="bridge-refuses-exchange"),
        pytest.param("workers.exchange_relay", "routes[0].to[0]", id="relay-refuses-stream"),
    ],
)
def test_role_refuses_destinations_it_cannot_serve(config: Path, module: str, key: str) -> None:
    result = run_cli(["--config", str(config)], module=module)
    assert result.returncode == 2
    assert key in result.stderr
    assert "route" in result.stderr


def test_usage_error_exits_2() -> None:
    assert run_cli(["frobnicate"]).returncode == 2
