"""``/metrics`` of a live worker after real traffic, and the alerting rules of docs/OPERATING.md.

The counters must match the traffic exactly, label by label, and the exposition must pass
``promtool check metrics``; the documented alert rules must pass ``promtool check rules`` and fire
on the series they are about (``promtool test rules``). Without promtool (CI installs it with
``.ci/install-promtool.sh``) only the promtool steps are skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.metrics import Metrics
from tests.helpers import (
    AMQP_URL,
    REDIS_URL,
    REPO,
    WorkerProcess,
    delete_keys,
    delete_queues,
    json_message,
    publish,
    stream_entries,
    stream_length,
    unique,
    wait_for,
)

OPERATING = REPO / "docs" / "OPERATING.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (CI runs .ci/install-promtool.sh)"
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (sample, labels), v in samples.items() if sample == name}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60
    )


# --- the traffic test ----------------------------------------------------------------------------


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    prefix = unique("mx")
    found = {
        "queue": unique("mx-q"),
        "prefix": prefix,
        "dead": unique("mx-dl"),
        "a": f"{prefix}:a",
        "b": f"{prefix}:b",
        "all": f"{prefix}:all",
    }
    yield found
    import asyncio

    async def cleanup() -> None:
        await delete_queues(found["queue"])
        await delete_keys(found["a"], found["b"], found["all"], found["dead"])

    asyncio.run(cleanup())


def traffic_config(names: dict[str, str]) -> str:
    return f"""
unrouted = "dead-letter"

[amqp]
url = "{AMQP_URL}"
prefetch = 200

[redis]
url = "{REDIS_URL}"

[batch]
max_messages = 50
max_delay_ms = 5

[[sources]]
queue = "{names["queue"]}"

[[routes]]
name = "orders"
match.headers = {{ kind = "order" }}
match.json = {{ "type" = "order.created" }}
to = [
  {{ stream = "{names["prefix"]}:{{headers.tenant}}", maxlen = 10000 }},
  {{ stream = "{names["prefix"]}:all" }},
]

[dead_letter]
stream = "{names["dead"]}"
"""


GOOD, TIMESTAMPED, UNROUTED, NOT_JSON, NO_TENANT = 30, 20, 4, 3, 2
TOTAL = GOOD + UNROUTED + NOT_JSON + NO_TENANT


def traffic(queue: str) -> list[tuple[aio_pika.Message, str]]:
    sent = datetime.now(UTC)
    messages: list[aio_pika.Message] = []
    for i in range(GOOD):
        extra = {"timestamp": sent} if i < TIMESTAMPED else {}
        messages.append(
            json_message(
                {"type": "order.created", "n": i},
                headers={"kind": "order", "tenant": "ab"[i % 2]},
                message_id=f"good-{i}",
                **extra,
            )
        )
    for i in range(UNROUTED):  # no "kind" header: no route matches
        messages.append(json_message({"type": "order.created"}, message_id=f"unrouted-{i}"))
    for i in range(NOT_JSON):  # matches on headers, but the json match cannot read the body
        messages.append(
            aio_pika.Message(
                b"<order/>",
                headers={"kind": "order", "tenant": "a"},
                content_type="application/xml",
                message_id=f"not-json-{i}",
            )
        )
    for i in range(NO_TENANT):  # routed, but {headers.tenant} has no value
        messages.append(
            json_message(
                {"type": "order.created"}, headers={"kind": "order"}, message_id=f"no-tenant-{i}"
            )
        )
    return [(message, queue) for message in messages]


def acked(worker: WorkerProcess, queue: str) -> float | None:
    samples = parse_metrics(worker.metrics())
    return value(samples, "message_proxy_messages_acked_total", queue=queue)


@pytest.mark.broker
def test_metrics_match_the_traffic_exactly_and_pass_promtool(tmp_path, names):
    import asyncio

    with WorkerProcess(traffic_config(names), tmp_path) as worker:
        asyncio.run(publish(traffic(names["queue"])))
        wait_for(
            lambda: acked(worker, names["queue"]) == TOTAL,
            15,
            what=f"{TOTAL} acked; logs:\n{worker.logs()}",
        )
        text = worker.metrics()
        logs = worker.logs()

    samples = parse_metrics(text)
    queue = {"queue": names["queue"]}
    template = f"{names['prefix']}:{{headers.tenant}}"

    assert value(samples, "message_proxy_messages_consumed_total", **queue) == TOTAL
    assert value(samples, "message_proxy_messages_acked_total", **queue) == TOTAL
    # Published: by route and destination template, never the expanded stream name.
    assert series(samples, "message_proxy_messages_published_total") == {
        frozenset({("route", "orders"), ("destination", template)}): GOOD,
        frozenset({("route", "orders"), ("destination", names["all"])}): GOOD,
    }
    assert f'destination="{names["a"]}"' not in text
    assert series(samples, "message_proxy_messages_dead_lettered_total") == {
        frozenset({("reason", "unrouted")}): UNROUTED,
        frozenset({("reason", "not-json")}): NOT_JSON,
        frozenset({("reason", "template")}): NO_TENANT,
    }
    assert value(samples, "message_proxy_messages_unrouted_total", **queue) == UNROUTED
    assert series(samples, "message_proxy_publish_errors_total") == {}
    assert series(samples, "message_proxy_reconnects_total") == {}

    # Histograms: every delivery is in exactly one batch, every batch has one flush duration.
    batches = value(samples, "message_proxy_batch_size_count")
    assert batches is not None and 1 <= batches <= TOTAL
    assert value(samples, "message_proxy_batch_size_sum") == TOTAL
    assert value(samples, "message_proxy_flush_duration_seconds_count") == batches
    assert value(samples, "message_proxy_flush_duration_seconds_bucket", le="+Inf") == batches
    # Latency only for the messages that carry a timestamp; AMQP timestamps are whole seconds.
    assert value(samples, "message_proxy_end_to_end_latency_seconds_count") == TIMESTAMPED
    latency_sum = value(samples, "message_proxy_end_to_end_latency_seconds_sum")
    assert latency_sum is not None and 0 <= latency_sum < TIMESTAMPED * 30

    assert value(samples, "message_proxy_broker_up", broker="amqp") == 1
    assert value(samples, "message_proxy_broker_up", broker="redis") == 1
    assert value(samples, "message_proxy_build_info", version=__version__, role="all") == 1
    assert value(samples, "message_proxy_inflight_messages") == 0

    # What the metrics claim is what landed.
    async def landed() -> tuple[int, int, int, list[dict[bytes, bytes]]]:
        return (
            await stream_length(names["a"]),
            await stream_length(names["b"]),
            await stream_length(names["all"]),
            await stream_entries(names["dead"]),
        )

    length_a, length_b, length_all, dead = asyncio.run(landed())
    assert (length_a, length_b, length_all) == (GOOD // 2, GOOD // 2, GOOD)
    reasons = sorted(entry[b"error"].decode() for entry in dead)
    assert reasons == sorted(
        ["unrouted"] * UNROUTED + ["not-json"] * NOT_JSON + ["template"] * NO_TENANT
    )
    assert "Traceback" not in logs

    if PROMTOOL is None:
        pytest.skip("promtool is not installed (CI runs .ci/install-promtool.sh): lint skipped")
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- the operator doc's alerting rules --------------------------------------------------------


def documented_rules() -> str:
    blocks = re.findall(r"^```ya?ml\n(.*?)^```", OPERATING.read_text(), re.MULTILINE | re.DOTALL)
    rules = [block for block in blocks if block.lstrip().startswith("groups:")]
    assert len(rules) == 1, "docs/OPERATING.md must hold exactly one YAML block of alert rules"
    return rules[0]


def test_documented_rules_name_only_exported_metrics():
    registry = CollectorRegistry()
    Metrics(registry, role="all", version="0")
    exported = {family.name for family in registry.collect()}
    document = yaml.safe_load(documented_rules())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    assert len(rules) >= 3
    used = {name for rule in rules for name in re.findall(r"\bmessage_proxy_[a-z_]+", rule["expr"])}
    assert used, "the rules must use message-proxy's own metrics"
    for name in used:
        assert re.sub(r"_(total|bucket|count|sum)$", "", name) in exported, name


def test_the_metrics_catalogue_documents_every_exported_metric():
    registry = CollectorRegistry()
    Metrics(registry, role="all", version="0")
    text = OPERATING.read_text()
    for family in registry.collect():
        shown = family.name + ("_total" if family.type == "counter" else "")
        assert shown in text, f"{shown} is missing from docs/OPERATING.md"


@needs_promtool
def test_documented_alert_rules_pass_promtool(tmp_path: Path):
    rules = tmp_path / "rules.yml"
    rules.write_text(documented_rules())
    checked = promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr


RULE_TESTS = """
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # stuck: deliveries held in flight, nothing acked for a long while
      - series: 'message_proxy_messages_acked_total{job="mp",instance="a",queue="q"}'
        values: '100x30'
      - series: 'message_proxy_inflight_messages{job="mp",instance="a"}'
        values: '50x30'
      # healthy: acks keep rising
      - series: 'message_proxy_messages_acked_total{job="mp",instance="b",queue="q"}'
        values: '0+100x30'
      - series: 'message_proxy_inflight_messages{job="mp",instance="b"}'
        values: '50x30'
      - series: 'message_proxy_messages_dead_lettered_total{job="mp",instance="a",reason="loop"}'
        values: '0+10x30'
      - series: 'message_proxy_broker_up{job="mp",instance="a",broker="redis"}'
        values: '1 1 0x28'
      - series: 'message_proxy_broker_up{job="mp",instance="a",broker="amqp"}'
        values: '1x30'
    alert_rule_test:
      - eval_time: 25m
        alertname: MessageProxyStalled
        exp_alerts:
          - exp_labels: {severity: critical, job: mp, instance: a}
      - eval_time: 25m
        alertname: MessageProxyDeadLettersRising
        exp_alerts:
          - exp_labels: {severity: warning, job: mp, instance: a, reason: loop}
      - eval_time: 25m
        alertname: MessageProxyBrokerDown
        exp_alerts:
          - exp_labels: {severity: critical, job: mp, instance: a, broker: redis}
"""


@needs_promtool
def test_documented_alert_rules_fire_on_what_they_describe(tmp_path: Path):
    # Annotations are prose, checked by ``promtool check rules``; compare labels and timing only.
    document = yaml.safe_load(documented_rules())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(document))
    tests = tmp_path / "rules_test.yml"
    tests.write_text(RULE_TESTS)
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", tests.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
