"""The AMQP source in a live worker against the real RabbitMQ: what it says when the broker
refuses it, and what it does when the broker cancels a consumer or closes a channel under it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import (
    REDIS_URL,
    WorkerProcess,
    delete_keys,
    unique,
    wait_for,
)

pytestmark = pytest.mark.broker


def worker_config(amqp_url: str, queue: str, stream: str, *, extra: str = "") -> str:
    return f"""
[amqp]
url = "{amqp_url}"
connect_timeout = 2
{extra}

[redis]
url = "{REDIS_URL}"

[[sources]]
queue = "{queue}"

[[routes]]
name = "all"
to = [ {{ stream = "{stream}" }} ]
"""


@pytest.mark.parametrize(
    ("userinfo", "vhost", "reason"),
    [
        pytest.param(
            f"guest:Pw-{unique('wrong')}", "%2F", "403 ACCESS_REFUSED", id="wrong-password"
        ),
        pytest.param("guest:guest", unique("no-such-vhost"), "530 NOT_ALLOWED", id="no-vhost"),
    ],
)
async def test_every_retry_and_the_readiness_detail_carry_the_brokers_reason(
    tmp_path: Path, userinfo: str, vhost: str, reason: str
) -> None:
    url = f"amqp://{userinfo}@127.0.0.1:5672/{vhost}"
    stream = unique("refused")
    worker = WorkerProcess(worker_config(url, unique("q"), stream), tmp_path)
    worker.start(wait_ready=False)
    try:

        def retries() -> list[str]:
            lines = [json.loads(line)["message"] for line in worker.logs().splitlines()]
            return [line for line in lines if "; retry " in line]

        wait_for(lambda: len(retries()) >= 3, 15, what=f"three retries; logs:\n{worker.logs()}")
        status, body = worker.get("/ready")
        assert status == 503
        detail = json.loads(body)["down"]["amqp"]
        assert reason in detail, detail
        assert all(reason in line for line in retries()), retries()
        password = userinfo.partition(":")[2]
        for where, text in (("logs", worker.logs()), ("/ready", body.decode())):
            assert f":{password}@" not in text, where
            if password != "guest":
                assert password not in text, where
    finally:
        worker.kill()
        await delete_keys(stream)
