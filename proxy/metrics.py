"""Every Prometheus metric message-proxy exports, on an injected registry (CONTRACT.md section 6).

Destination labels are always the configured template (``orders:{headers.tenant}``), never the
expanded name, so label cardinality is bounded by the config file.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "message_proxy"

BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, role: str, version: str) -> None:
        self.registry = registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        self.messages_consumed = counter(
            "messages_consumed", "Deliveries taken from RabbitMQ.", ("queue",)
        )
        self.messages_published = counter(
            "messages_published",
            "Messages accepted by a destination.",
            ("route", "destination"),
        )
        self.messages_acked = counter(
            "messages_acked",
            "Deliveries acked to RabbitMQ after all destinations accepted.",
            ("queue",),
        )
        self.messages_dead_lettered = counter(
            "messages_dead_lettered", "Messages dead-lettered, by reason code.", ("reason",)
        )
        self.messages_unrouted = counter(
            "messages_unrouted", "Messages that matched no route.", ("queue",)
        )
        self.publish_errors = counter(
            "publish_errors",
            "Failed publish attempts, by destination and error kind.",
            ("destination", "error"),
        )
        self.reconnects = counter(
            "reconnects", "Connection attempts after a loss, by broker.", ("broker",)
        )
        self.duplicates_suppressed = counter(
            "duplicates_suppressed", "Stream writes skipped because the message id was seen."
        )
        self.dedupe_skipped = counter(
            "dedupe_skipped", "Messages written without de-duplication, by reason.", ("reason",)
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Deliveries per flushed batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.flush_duration = Histogram(
            f"{PREFIX}_flush_duration_seconds",
            "Time from batch start to its ack.",
            buckets=FLUSH_BUCKETS,
            registry=registry,
        )
        self.end_to_end_latency = Histogram(
            f"{PREFIX}_end_to_end_latency_seconds",
            "From the message timestamp property to its ack (only messages that carry one).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inflight = Gauge(
            f"{PREFIX}_inflight_messages",
            "Deliveries received and not yet acked.",
            registry=registry,
        )
        self.broker_up = Gauge(
            f"{PREFIX}_broker_up",
            "1 while connected to the broker.",
            ("broker",),
            registry=registry,
        )
        self.build_info = Gauge(
            f"{PREFIX}_build_info",
            "Always 1; labels carry the build.",
            ("version", "role"),
            registry=registry,
        )
        self.build_info.labels(version=version, role=role).set(1)
