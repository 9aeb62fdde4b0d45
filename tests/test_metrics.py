"""The metrics that are not plain prometheus_client ones: the batch-observed latency histogram
exports exactly what prometheus_client's would; the readiness gauge reads the health snapshot."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from proxy.metrics import LATENCY_BUCKETS, BatchHistogram, Metrics
from proxy.state import HealthState

NAME = "latency_seconds"


def _exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


@pytest.mark.parametrize(
    "batches",
    [
        [],
        [[]],
        [[0.0]],
        [[0.001, 0.0025, 0.005]],  # exactly on bucket bounds: "less or equal"
        [[0.0011, 0.7, 59.9, 60.0, 61.0, 3600.0]],  # above the last bound: +Inf only
        [[0.2] * 500, [1.5, 2.5], [], [0.004]],
    ],
    ids=["nothing", "empty-batch", "zero", "on-bounds", "spread", "several-batches"],
)
def test_batch_histogram_exports_what_prometheus_client_would(batches: list[list[float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = BatchHistogram(NAME, "doc", LATENCY_BUCKETS, ours)
    reference = Histogram(NAME, "doc", buckets=LATENCY_BUCKETS, registry=theirs)
    for batch in batches:
        histogram.observe_many(batch)
        for value in batch:
            reference.observe(value)

    assert _exposition(ours) == _exposition(theirs)


def test_batch_histogram_reads_back_through_the_registry() -> None:
    registry = CollectorRegistry(auto_describe=True)
    histogram = BatchHistogram(NAME, "doc", (0.5, 1.0), registry)
    histogram.observe_many([0.25, 0.75, 2.0])

    assert registry.get_sample_value(f"{NAME}_count") == 3
    assert registry.get_sample_value(f"{NAME}_sum") == 3.0
    assert registry.get_sample_value(f"{NAME}_bucket", {"le": "0.5"}) == 1
    assert registry.get_sample_value(f"{NAME}_bucket", {"le": "1.0"}) == 2
    assert registry.get_sample_value(f"{NAME}_bucket", {"le": "+Inf"}) == 3
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        BatchHistogram(NAME, "doc", (0.5,), registry)  # one name, one collector


def test_the_ready_gauge_reads_what_ready_answers_at_each_scrape() -> None:
    registry = CollectorRegistry(auto_describe=True)
    metrics = Metrics(registry, role="all", version="0")
    assert registry.get_sample_value("message_proxy_ready") == 0  # nothing to follow yet

    health = HealthState(clock=lambda: 0.0)
    metrics.ready.follow(lambda: health.snapshot().is_ready())
    health.expect_consumers(1)
    health.set_broker("amqp", True)
    assert registry.get_sample_value("message_proxy_ready") == 0  # not consuming yet

    health.set_consumers(1)
    assert registry.get_sample_value("message_proxy_ready") == 1
    health.set_broker("redis", False, "ping timed out")
    assert registry.get_sample_value("message_proxy_ready") == 0
    health.set_broker("redis", True)
    assert registry.get_sample_value("message_proxy_ready") == 1
    health.stopping()
    assert registry.get_sample_value("message_proxy_ready") == 0


def test_the_node_info_follows_each_broker_to_its_node_and_leaves_no_old_series() -> None:
    registry = CollectorRegistry(auto_describe=True)
    metrics = Metrics(registry, role="all", version="0")
    health = HealthState(clock=lambda: 0.0)
    metrics.broker_node.follow(lambda: health.snapshot().nodes())

    def series() -> dict[tuple[str, str], float]:
        return {
            (s.labels["broker"], s.labels["node"]): s.value
            for family in registry.collect()
            if family.name == "message_proxy_broker_node_info"
            for s in family.samples
        }

    assert series() == {}
    health.set_broker("amqp", True, node="rabbit-2:5672")
    health.set_broker("amqp_out", True, node="rabbit-1:5672")
    health.set_broker("redis", True)  # names no node: no series
    assert series() == {("amqp", "rabbit-2:5672"): 1, ("amqp_out", "rabbit-1:5672"): 1}
    health.set_broker("amqp", False, "rabbit-2:5672: connection lost", node="rabbit-2:5672")
    assert series() == {("amqp_out", "rabbit-1:5672"): 1}  # down: on no node
    health.set_broker("amqp", True, node="rabbit-3:5672")
    health.set_broker("amqp_out", True, node="rabbit-3:5672")  # moved while up
    assert series() == {("amqp", "rabbit-3:5672"): 1, ("amqp_out", "rabbit-3:5672"): 1}
