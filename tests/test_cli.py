"""``message-proxy check`` and ``route``, and the role entry points' refusals: no broker needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.helpers import REPO, run_cli, wait_for

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


# --- errors a person can act on: exact messages, exit codes, never a traceback -----------------

BROKEN = """
[[sources]]
queu = "events"

[[routes]]
name = "all"
to = []
"""


def test_check_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN)
    result = run_cli(["check", "--config", str(path)])
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "message-proxy: config error: sources[0].queue: required key is missing\n"
        "message-proxy: config error: sources[0].queu: unknown key; did you mean 'queue'?\n"
        "message-proxy: config error: routes[0].to: a route needs at least one destination\n"
    )


def test_unknown_section_from_the_environment_names_the_variable(config: Path) -> None:
    result = run_cli(["check", "--config", str(config)], env={"MESSAGE_PROXY_AMPQ__URL": "x"})
    assert result.returncode == 2
    assert result.stderr == (
        "message-proxy: config error: ampq: unknown key (set by MESSAGE_PROXY_AMPQ__URL); "
        "did you mean MESSAGE_PROXY_AMQP__URL?\n"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ["check", "--config", "{tmp}"],
            "message-proxy: config error: --config: cannot read {tmp}: Is a directory\n",
            id="config-is-a-directory",
        ),
        pytest.param(
            ["check", "--config", "{tmp}/none.toml"],
            "message-proxy: config error: --config: cannot read {tmp}/none.toml: "
            "No such file or directory\n",
            id="config-missing",
        ),
        pytest.param(
            ["route", "--config", "{config}", "--routing-key", "k", "--body", "@{tmp}/none"],
            "message-proxy: config error: --body: cannot read {tmp}/none: "
            "No such file or directory\n",
            id="body-file-missing",
        ),
        pytest.param(
            ["route", "--config", "{config}", "--routing-key", "k", "--body", "@"],
            "message-proxy: config error: --body: @ needs a file name: --body @FILE\n",
            id="body-without-file-name",
        ),
        pytest.param(
            ["route", "--config", "{config}", "--routing-key", "k", "--header", "nope"],
            "message-proxy: config error: --header: expected K=V, got 'nope'\n",
            id="bad-header",
        ),
    ],
)
def test_unreadable_inputs_exit_2_with_one_line(
    tmp_path: Path, config: Path, args: list[str], expected: str
) -> None:
    fill = {"tmp": str(tmp_path), "config": str(config)}
    result = run_cli([arg.format(**fill) for arg in args])
    assert result.returncode == 2
    assert result.stderr == expected.format(**fill)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["check", "--config", "{config}"], id="check"),
        pytest.param(["schema"], id="schema"),
        pytest.param(["route", "--config", "{config}", "--routing-key", "order.x"], id="route"),
    ],
)
def test_a_reader_that_stops_early_ends_the_command_quietly(config: Path, args: list[str]) -> None:
    # Like `message-proxy check ... | head -3`, with the reader gone before anything is written.
    command = [sys.executable, "-m", "proxy", *(arg.format(config=config) for arg in args)]
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        stderr = process.stderr.read()
        code = process.wait(timeout=30)
    assert stderr == b""
    assert code == 0


def test_ctrl_c_during_check_exits_130_without_a_traceback(tmp_path: Path) -> None:
    started = tmp_path / "importing"
    (tmp_path / "slow_rules.py").write_text(
        "import pathlib, time\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        "time.sleep(30)\n"
        "def rule(message):\n    return True\n"
    )
    path = tmp_path / "c.toml"
    path.write_text(
        CONFIG.replace('name = "orders"', 'name = "orders"\nmatch.plugin = "slow_rules:rule"')
    )
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", "check", "--config", str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        wait_for(started.exists, timeout=20, what="the plugin's import")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 130
    assert (stdout, stderr) == ("", "message-proxy: interrupted\n")


def test_streams_without_the_redis_package_exit_2(tmp_path: Path, config: Path) -> None:
    # An install without the `redis` extra: the package cannot be imported.
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "__init__.py").write_text("raise ImportError('No module named redis')\n")
    result = run_cli(["run", "--config", str(config)], env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr == (
        "message-proxy: config error: routes[0].to[0]: stream destinations need the redis "
        "package (No module named redis); install message-proxy[redis]\n"
    )
