"""Pure parts of the Redis sinks, no server: where dedupe keys hash, the WAIT that ends a pipeline
and how its reply is read."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr
from redis.crc import key_slot
from redis.exceptions import ResponseError

from proxy.config import RedisSettings
from proxy.errors import TransientError
from proxy.sinks.redis_stream import check_replicas, dedupe_key, hash_tag, wait_command


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        pytest.param("orders", None, id="no-braces"),
        pytest.param("orders{eu}", "eu", id="tag"),
        pytest.param("{eu}orders{us}", "eu", id="first-tag-wins"),
        pytest.param("orders{}x", None, id="empty-braces"),
        pytest.param("a{b", None, id="unclosed"),
        pytest.param("a}b{c}", "c", id="close-before-open"),
    ],
)
def test_hash_tag(key: str, tag: str | None) -> None:
    assert hash_tag(key) == tag


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param("orders", id="plain"),
        pytest.param("orders{eu}", id="own-tag"),
        pytest.param("a{b", id="unclosed-brace"),
        pytest.param("a}b", id="closing-brace"),
        pytest.param("x{}y", id="empty-tag"),
    ],
)
def test_a_dedupe_key_lands_in_its_stream_slot(stream: str) -> None:
    key = dedupe_key(stream, "id-1")
    assert key_slot(key.encode()) == key_slot(stream.encode())
    assert key.endswith(":dedupe:id-1")


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        pytest.param({}, None, id="standalone-default-no-wait"),
        pytest.param({"mode": "cluster"}, ["WAIT", 1, 1000], id="cluster-default"),
        pytest.param(
            {"mode": "sentinel", "sentinels": (SecretStr("redis://s"),), "service_name": "m"},
            ["WAIT", 1, 1000],
            id="sentinel-default",
        ),
        pytest.param({"mode": "cluster", "min_replicas": 0}, None, id="cluster-off"),
        pytest.param({"min_replicas": 2, "replica_timeout": 0.25}, ["WAIT", 2, 250], id="set"),
    ],
)
def test_wait_command(keys: dict[str, Any], expected: list[Any] | None) -> None:
    assert wait_command(RedisSettings(**keys)) == expected


@pytest.mark.parametrize(
    ("reply", "accepted"),
    [
        pytest.param(1, True, id="enough"),
        pytest.param(2, True, id="more-than-enough"),
        pytest.param(0, False, id="none"),
        pytest.param(ResponseError("ERR WAIT cannot be used with replica instances"), False,
                     id="error-reply"),
    ],
)  # fmt: skip
def test_check_replicas(reply: Any, accepted: bool) -> None:
    wait = ["WAIT", 1, 500]
    if accepted:
        check_replicas(reply, wait)
    else:
        with pytest.raises(TransientError):
            check_replicas(reply, wait)
