from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from proxy.metrics import Metrics
from proxy.state import HealthState
from tests.servers.fixtures import (  # noqa: F401 - session fixtures, started only when asked for
    certificates,
    healthy_redis_cluster,
    healthy_redis_sentinel,
    rabbit_cluster,
    redis_cluster,
    redis_sentinel,
    redis_tls,
    server_workspace,
)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, role="test", version="0.0.0")


@pytest.fixture
def health() -> HealthState:
    return HealthState()


@pytest.fixture
def fake_clock() -> Iterator[list[float]]:
    """A clock a test moves by hand: ``fake_clock[0] += 1``; pass ``lambda: fake_clock[0]``."""
    yield [1000.0]
