"""``message-proxy check --brokers`` against the real brokers: what passes, a missing queue, a
queue with other arguments, a Redis user without XADD, a refused login; nothing created or
written, no password shown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest
import redis

from tests.helpers import AMQP_URL, REDIS_URL, delete_queues, queue_depth, run_cli, unique

pytestmark = pytest.mark.broker

PASSWORD = "s3cret-check-pw"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"check-{unique()}.toml"
    path.write_text(text)
    return str(path)


def check(path: str) -> tuple[int, list[str]]:
    done = run_cli(["check", "--config", path, "--brokers"])
    assert PASSWORD not in done.stdout + done.stderr
    return done.returncode, done.stdout.splitlines()


def line(lines: list[str], start: str) -> str:
    found = [text for text in lines if text.startswith(start)]
    assert len(found) == 1, f"{start!r} in {lines}"
    return found[0]


@pytest.fixture
async def names() -> AsyncIterator[dict[str, str]]:
    names = {p: unique(f"cb-{p}") for p in ("existing", "missing", "app", "audit", "stream", "dl")}
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(names["existing"], durable=True)
    yield names
    await delete_queues(names["existing"], names["missing"])
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for exchange in (names["app"], names["audit"]):
            await channel.exchange_delete(exchange)


def config(names: dict[str, str], *, redis_url: str = REDIS_URL, existing: str = "") -> str:
    return f"""
[amqp]
url = "{AMQP_URL}"

[redis]
url = "{redis_url}"

[[sources]]
queue = "{names["existing"]}"
{existing}

[[sources]]
queue = "{names["missing"]}"
bindings = [ {{ exchange = "{names["app"]}", routing_key = "#" }} ]

[[routes]]
name = "audit"
match.routing_key = "audit.#"
to = [ {{ exchange = "{names["audit"]}", declare = true }}, {{ exchange = "amq.topic" }} ]

[[routes]]
name = "by-tenant"
match.headers = {{ tenant = "*" }}
to = [
  {{ exchange = "t.{{headers.tenant}}" }},
  {{ stream = "{names["stream"]}:{{headers.tenant}}" }},
]

[[routes]]
name = "all"
to = [ {{ stream = "{names["stream"]}", dedupe = true }} ]

[dead_letter]
stream = "{names["dl"]}"
"""


async def test_a_config_whose_brokers_hold_what_it_needs_passes_and_nothing_is_created(
    tmp_path: Path, names: dict[str, str]
) -> None:
    code, lines = check(write(tmp_path, config(names)))
    assert code == 0, "\n".join(lines)
    assert lines[-1] == "brokers OK"
    assert line(lines, "[ ok ] amqp:").endswith("connected to amqp://guest:***@127.0.0.1:5672/%2F")
    assert "as user 'default'" in line(lines, "[ ok ] redis:")
    assert "exists (0 messages, 0 consumers), with the same arguments" in line(
        lines, f"[ ok ] source {names['existing']}:"
    )
    assert "does not exist yet; the worker declares it at start" in line(
        lines, f"[ ok ] source {names['missing']}:"
    )
    assert "declared at start (topic, durable)" in line(lines, f"[ ok ] binding {names['missing']}")
    assert "declared at start" in line(lines, f"[ ok ] destination {names['audit']!r}")
    assert "exchange 'amq.topic' exists" in line(lines, "[ ok ] destination 'amq.topic'")
    assert "a template" in line(lines, "[skip] destination 't.{headers.tenant}'")
    sampled = line(lines, f"[ ok ] destination stream '{names['stream']}:{{headers.tenant}}'")
    assert f"XADD to '{names['stream']}:message-proxy-check' (placeholders filled in)" in sampled
    assert "checked without writing" in sampled
    line(lines, f"[ ok ] destination stream '{names['stream']}'")
    line(lines, f"[ ok ] dead letters to stream '{names['dl']}'")
    # a check, not a start: nothing was declared or written
    with pytest.raises(aio_pika.exceptions.ChannelClosed):
        await queue_depth(names["missing"])
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.exists(names["stream"], f"{names['stream']}:message-proxy-check") == 0
    finally:
        client.close()


async def test_a_missing_queue_fails_the_sources_and_stops_there(
    tmp_path: Path, names: dict[str, str]
) -> None:
    text = config(names).replace(
        f'queue = "{names["missing"]}"', f'queue = "{names["missing"]}"\ndeclare = false'
    )
    code, lines = check(write(tmp_path, text))
    assert code == 1
    assert "does not exist, and declare = false" in line(lines, f"[FAIL] source {names['missing']}")
    assert lines[-1] == "check failed: 1 in sources; the checks after them were not run"
    assert not [text for text in lines if "destination" in text]


async def test_a_queue_with_other_arguments_names_the_argument(
    tmp_path: Path, names: dict[str, str]
) -> None:
    code, lines = check(
        write(tmp_path, config(names, existing='arguments = { "x-queue-type" = "quorum" }'))
    )
    assert code == 1
    failed = line(lines, f"[FAIL] source {names['existing']}")
    assert "exists with other arguments" in failed
    assert "406 PRECONDITION_FAILED" in failed and "'x-queue-type'" in failed


@pytest.fixture
def no_xadd_user() -> Iterator[str]:
    """A Redis ACL user that may do anything but XADD; deleted afterwards."""
    user = unique("cb-user")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.execute_command("ACL", "SETUSER", user, "on", f">{PASSWORD}", "~*", "+@all", "-xadd")
        yield user
    finally:
        client.execute_command("ACL", "DELUSER", user)
        client.close()


async def test_a_redis_user_without_xadd_fails_the_destinations(
    tmp_path: Path, names: dict[str, str], no_xadd_user: str
) -> None:
    url = REDIS_URL.replace("redis://", f"redis://{no_xadd_user}:{PASSWORD}@")
    code, lines = check(write(tmp_path, config(names, redis_url=url)))
    assert code == 1
    assert f"as user {no_xadd_user!r}" in line(lines, "[ ok ] redis:")
    failed = line(lines, f"[FAIL] destination stream '{names['stream']}'")
    assert f"refused for user {no_xadd_user!r}" in failed
    assert "no permissions to run the 'xadd' command" in failed
    assert lines[-1].startswith("check failed: 2 in destinations")


async def test_a_refused_login_fails_the_connections(tmp_path: Path, names: dict[str, str]) -> None:
    text = config(names).replace("guest:guest@", f"guest:{PASSWORD}@", 1)
    code, lines = check(write(tmp_path, text))
    assert code == 1
    failed = line(lines, "[FAIL] amqp:")
    assert "amqp://guest:***@127.0.0.1:5672/%2F" in failed and "403 ACCESS_REFUSED" in failed
    assert lines[-1].startswith("check failed: 1 in connections")


async def test_a_cluster_node_that_does_not_answer_is_a_warning_while_another_does(
    tmp_path: Path, names: dict[str, str]
) -> None:
    down = AMQP_URL.replace("127.0.0.1:5672", "127.0.0.1:1")
    text = config(names).replace(f'url = "{AMQP_URL}"', f'url = ["{down}", "{AMQP_URL}"]', 1)
    code, lines = check(write(tmp_path, text))
    assert code == 0, "\n".join(lines)
    assert line(lines, "[warn] amqp:").startswith(
        "[warn] amqp: cannot connect to amqp://guest:***@127.0.0.1:1/%2F"
    )
    line(lines, "[ ok ] amqp: connected to amqp://guest:***@127.0.0.1:5672/%2F")
