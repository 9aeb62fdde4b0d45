"""The Grafana dashboard (deploy/grafana/) and its provisioning next to Prometheus in compose.yaml.

Every panel's PromQL must parse (``promtool check rules``, each expression as a recording rule),
use only metrics the worker exports (the names of an in-process ``Metrics`` registry, histogram
suffixes included), and return data from series shaped like that registry's exposition
(``promtool test rules``): a misspelt metric or label shows as an empty panel here, not in front of
an operator. ``message_proxy_ready``, which the readiness panel needs, is checked against a live
worker's ``/ready``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import BatchHistogram, Metrics, NodeInfo, ReadinessGauge
from tests.helpers import (
    AMQP_URL,
    REPO,
    WorkerProcess,
    delete_keys,
    delete_queues,
    redis_url_via,
    unique,
    wait_for,
)
from tests.tcp_proxy import TcpProxy

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "message-proxy.json"
COMPOSE = REPO / "compose.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus, in .ci/run)"
)
# What Grafana puts in place of its variables before it sends a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "or", "and"}
PROMQL_WORDS |= {"unless", "bool", "offset"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL as Grafana sends it) for every query of every panel."""
    found = []
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a variable Grafana would not replace"
            found.append((f"{panel['title']} / {target['refId']}", expr))
    return found


def exercised_registry() -> CollectorRegistry:
    """A worker's registry with every series present: each labelled metric counted once."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, role="all", version="0")
    for metric in vars(metrics).values():
        if isinstance(metric, Counter | Gauge | Histogram):
            labels = metric._labelnames  # private, but the only way to list them
            child = metric.labels(*("x" for _ in labels)) if labels else metric
            if isinstance(child, Histogram):
                child.observe(0.01)
            elif isinstance(child, Counter):
                child.inc()
            else:
                child.set(1)
        elif isinstance(metric, BatchHistogram):
            metric.observe_many([0.01, 0.2])
        elif isinstance(metric, ReadinessGauge):
            metric.follow(lambda: True)
        elif isinstance(metric, NodeInfo):
            metric.follow(lambda: {"x": "x"})
    return registry


def exported_samples() -> list[tuple[str, dict[str, str], float]]:
    text = generate_latest(exercised_registry()).decode()
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (not its functions, labels or keywords)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # ranges
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    names = set()
    for found in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
        rest = bare[found.end() :].lstrip()
        if rest.startswith("(") or found[0] in PROMQL_WORDS:
            continue  # a function or an operator
        if bare[found.start() - 1 : found.start()].isdigit():
            continue  # the exponent or unit of a number
        names.add(found[0])
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        pytest.param("up", {"up"}, id="bare"),
        pytest.param('sum by (le) (rate(a_bucket{job=~"x"}[1m]))', {"a_bucket"}, id="nested"),
        pytest.param("a / on (i) group_left b or vector(0)", {"a", "b"}, id="operators"),
        pytest.param('count(x{q="sum(y)"}) > 1e3', {"x"}, id="strings-and-numbers"),
    ],
)
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# --- the dashboard -----------------------------------------------------------------------------


def test_every_panel_queries_only_metrics_the_worker_exports(dashboard: dict[str, Any]) -> None:
    exported = {name for name, _, _ in exported_samples()}
    for where, expr in expressions(dashboard):
        used = metric_names(expr)
        assert used, f"{where}: no metric in {expr}"
        assert used <= exported, f"{where}: {used - exported} not exported"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # Grafana's label_values(SELECTOR, LABEL): the selector is PromQL
            found = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["definition"])
            assert found, variable["name"]
            assert metric_names(found[1]) <= exported, variable["name"]


def test_the_dashboard_shows_what_an_operator_needs(dashboard: dict[str, Any]) -> None:
    queries = " ".join(expr for _, expr in expressions(dashboard))
    needed = [
        r"rate\(message_proxy_messages_consumed_total",
        r"rate\(message_proxy_messages_acked_total",
        r"histogram_quantile\(0\.5, sum by \(le\) \(rate\(message_proxy_end_to_end_latency",
        r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(message_proxy_end_to_end_latency",
        r"message_proxy_batch_size_(sum|bucket)",
        r"message_proxy_inflight_messages",
        r"sum by \(reason\) \(rate\(message_proxy_messages_dead_lettered_total",
        r"sum by \(destination, error\) \(rate\(message_proxy_publish_errors_total",
        r"message_proxy_broker_up",
        r"message_proxy_broker_node_info",
        r"message_proxy_ready",
        r"sum by \(result\) \(increase\(message_proxy_config_reloads_total",
    ]
    for pattern in needed:
        assert re.search(pattern, queries), pattern


def test_the_dashboard_is_laid_out_and_portable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "message-proxy"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = [panel["title"] for panel in panels(dashboard)]
    assert len(titles) == len(set(titles))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        # any Grafana, any Prometheus: the data source is the dashboard's variable
        for holder in (panel, *panel["targets"]):
            assert holder["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def recording_rules(dashboard: dict[str, Any]) -> tuple[str, list[str]]:
    """Each panel query as a rule, and as a rule that is 1 when the query returns anything."""
    raw, has_data, names = [], [], []
    for index, (_, expr) in enumerate(expressions(dashboard)):
        name = f"dashboard:query_{index}"
        raw.append({"record": name, "expr": expr})
        has_data.append({"record": f"{name}:has_data", "expr": f"clamp_max(count({expr}), 1)"})
        names.append(f"{name}:has_data")
    groups = [{"name": "dashboard", "rules": raw}, {"name": "has-data", "rules": has_data}]
    return yaml.safe_dump({"groups": groups}, sort_keys=False), names


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_every_panel_query_parses(dashboard: dict[str, Any], tmp_path: Path) -> None:
    rules, _ = recording_rules(dashboard)
    (tmp_path / "dashboard.yml").write_text(rules)
    checked = promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # and promtool has teeth: an unbalanced parenthesis fails it
    (tmp_path / "broken.yml").write_text(rules.replace("sum(", "sum((", 1))
    assert promtool("check", "rules", "broken.yml", cwd=tmp_path).returncode != 0


@needs_promtool
def test_every_panel_query_returns_data_from_a_workers_series(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    rules, names = recording_rules(dashboard)
    (tmp_path / "dashboard.yml").write_text(rules)
    series = []
    for name, labels, value in exported_samples():
        labelled = {**labels, "job": "message-proxy", "instance": "worker-1:8000"}
        selector = ",".join(f'{key}="{val}"' for key, val in sorted(labelled.items()))
        step = max(value, 1.0)  # counters and buckets rise, gauges too: rates are never zero
        series.append({"series": f"{name}{{{selector}}}", "values": f"{step}+{step}x40"})
    tests = {
        "rule_files": ["dashboard.yml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "promql_expr_test": [
                    {"expr": name, "eval_time": "5m", "exp_samples": [{"labels": name, "value": 1}]}
                    for name in names
                ],
            }
        ],
    }
    (tmp_path / "dashboard_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    tested = promtool("test", "rules", "dashboard_test.yml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


# --- provisioning in compose.yaml --------------------------------------------------------------


@pytest.fixture(scope="module")
def grafana() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"]["grafana"])


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for the bind mounts of a service."""
    found = {}
    for volume in service["volumes"]:
        host, container, *_ = volume.split(":")
        if host.startswith("."):
            found[container] = (REPO / host).resolve()
    return found


def test_grafana_provisions_prometheus_and_the_dashboard(grafana: dict[str, Any]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    binds = mounts(grafana)
    provisioning = binds["/etc/grafana/provisioning"]
    assert provisioning == (GRAFANA / "provisioning").resolve()
    assert all(v.endswith(":ro") for v in grafana["volumes"] if v.startswith("."))

    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    prometheus_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[-1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}

    (provider,) = yaml.safe_load((provisioning / "dashboards/message-proxy.yml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file"
    dashboard_mount = f"{provider['options']['path']}/message-proxy.json"
    assert binds[dashboard_mount] == DASHBOARD.resolve()
    environment = grafana["environment"]
    assert environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_mount
    # anonymous visitors may look, not edit; only localhost can reach it
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])


# --- message_proxy_ready on a live worker ------------------------------------------------------


def ready_gauge(worker: WorkerProcess) -> float | None:
    for family in text_string_to_metric_families(worker.metrics()):
        for sample in family.samples:
            if sample.name == "message_proxy_ready":
                return sample.value
    return None


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    found = {"queue": unique("dash-q"), "stream": unique("dash-s")}
    yield found
    asyncio.run(delete_queues(found["queue"]))
    asyncio.run(delete_keys(found["stream"]))


@pytest.mark.broker
def test_the_ready_gauge_follows_the_ready_endpoint(tmp_path: Path, names: dict[str, str]) -> None:
    with TcpProxy("127.0.0.1", 6379) as redis:
        config = f"""
[amqp]
url = "{AMQP_URL}"
[redis]
url = "{redis_url_via(redis.port)}"
[[sources]]
queue = "{names["queue"]}"
[[routes]]
name = "all"
to = [ {{ stream = "{names["stream"]}" }} ]
"""
        with WorkerProcess(config, tmp_path) as worker:
            assert worker.get("/ready")[0] == 200
            assert ready_gauge(worker) == 1.0
            redis.cut()
            wait_for(lambda: worker.get("/ready")[0] == 503, 5, what="/ready 503")
            assert ready_gauge(worker) == 0.0
            redis.heal()
            wait_for(lambda: worker.get("/ready")[0] == 200, 10, what="/ready 200 again")
            assert ready_gauge(worker) == 1.0
