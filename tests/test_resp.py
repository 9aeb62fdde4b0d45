"""RESP as the Redis sinks write and read it: packing as tables held to redis-py's own packer (no
server), then reading a batch's replies from a real Redis with and without hiredis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser
from redis.asyncio.connection import Connection

from proxy.encoding import DeadLetterInfo, entry_fields, entry_resp
from proxy.message import Message
from proxy.routing import StreamTarget
from proxy.sinks import Publish
from proxy.sinks.redis_stream import packed_xadds, plan_batch
from proxy.sinks.resp import XaddHead, pack_commands, packed_fields, read_replies
from tests.helpers import REDIS_URL, unique


def redis_py(*commands: list[Any]) -> bytes:
    """What redis-py itself sends for ``commands``: the reference."""
    return b"".join(b"".join(Connection().pack_command(*command)) for command in commands)


def flat(fields: dict[str, Any]) -> list[Any]:
    return [part for pair in fields.items() for part in pair]


MESSAGES = [
    pytest.param(Message(b"", "", "", ""), id="empty values"),
    pytest.param(Message(b"\x00\xff\r\n raw", "a.b", "ex", "q"), id="binary body with CRLF"),
    pytest.param(Message(b"x" * 5000, "k" * 300, "ex", "q"), id="values past the prefix sizes"),
    pytest.param(
        Message(
            b'{"a": 1}',
            "order.créé",
            "app",
            "q",
            headers={"tenant": "acmé", "n": 3, "when": datetime(2026, 1, 2, tzinfo=UTC)},
            content_type="application/json",
            content_encoding="gzip",
            message_id="m-1",
            correlation_id="c-1",
            type="order.created",
            app_id="shop",
            timestamp=datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC),
            delivery_mode=2,
        ),
        id="every field, non-ASCII text",
    ),
    pytest.param(Message(b"b", "k", "", "q", message_id="%d%b%s"), id="format marks in values"),
]


@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("maxlen", [None, 1000], ids=["no maxlen", "maxlen"])
def test_an_entry_packs_as_redis_py_packs_its_fields(message: Message, maxlen: int | None) -> None:
    head = ["XADD", "s{1}"] + ([] if maxlen is None else ["MAXLEN", "~", maxlen])
    target = StreamTarget("r", "s{1}", "s{1}", maxlen)
    plain: Any = [(0, target, None, entry_resp(message))]
    expected = redis_py([*head, "*", *flat(entry_fields(message))])
    assert pack_commands(packed_xadds(plain)) == expected


def test_dead_letters_and_argument_lists_pack_as_redis_py_packs_them() -> None:
    message = Message(b"body", "k", "ex", "q", message_id="m")
    info = DeadLetterInfo("rejected", "WRONGTYPE", "r", 1_700_000_000_000)
    target = StreamTarget("dead-letter", "dl", "dl", None)
    outcomes, plain, deduped = plan_batch(
        [Publish(message, target, info), Publish(message, target)]
    )
    assert outcomes == [None, None] and not deduped
    (_, _, letter, packed), (_, _, _, fast) = plain
    assert packed[0] == fast[0] + 4  # error, detail, route, failed_at
    facts = ["error", "rejected", "detail", "WRONGTYPE", "route", "r", "failed_at", "1700000000000"]
    letter_fields = [*flat(entry_fields(message)), *facts]
    commands = [*packed_xadds(plain), ["WAIT", 1, 250], ["EVALSHA", "sha", 1, "k", ""]]
    assert pack_commands(commands) == redis_py(
        ["XADD", "dl", "*", *letter_fields],
        ["XADD", "dl", "*", *flat(entry_fields(message))],
        ["WAIT", 1, 250],
        ["EVALSHA", "sha", 1, "k", ""],
    )
    assert letter.dead_letter is info


@pytest.mark.parametrize(
    ("stream", "maxlen", "arguments"),
    [
        pytest.param("s", None, 3, id="XADD s *"),
        pytest.param("s", 10, 6, id="XADD s MAXLEN ~ 10 *"),
        pytest.param("ströme", 10, 6, id="non-ASCII key"),
    ],
)
def test_xadd_head(stream: str, maxlen: int | None, arguments: int) -> None:
    head = XaddHead.of(stream, maxlen)
    assert head.arguments == arguments
    fields = {"body": b"x"}
    entry = packed_fields(fields)[1:]
    packed = pack_commands([(b"*%d\r\n" % (arguments + 2), head.packed, *entry)])
    words = ["XADD", stream] + ([] if maxlen is None else ["MAXLEN", "~", maxlen])
    assert packed == redis_py([*words, "*", "body", b"x"])


# --- reading replies from a real server ------------------------------------------------------


@pytest.fixture(params=[_AsyncHiredisParser, _AsyncRESP2Parser], ids=["hiredis", "redis-py"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, parser_class=request.param)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.broker
async def test_replies_are_read_in_order_with_errors_in_place(client: aioredis.Redis) -> None:
    stream, text = unique("s"), unique("k")
    await client.set(text, "not a stream")
    many = [["XADD", stream, "*", "n", str(i)] for i in range(2000)]  # replies span many reads
    commands = [*many, ["XADD", text, "*", "n", "1"], ["EVALSHA", "0" * 40, 0], ["PING"]]
    connection = await client.connection_pool.get_connection()
    try:
        await connection.send_packed_command(pack_commands(commands), check_health=False)
        replies = await read_replies(connection, len(commands))
    finally:
        await client.connection_pool.release(connection)
        await client.delete(stream, text)
    assert len(replies) == len(commands)
    assert all(isinstance(r, bytes) and b"-" in r for r in replies[:2000])
    assert isinstance(replies[2000], redis_errors.ResponseError)
    assert "WRONGTYPE" in str(replies[2000])
    assert isinstance(replies[2001], redis_errors.NoScriptError)
    assert replies[2002] in (b"PONG", "PONG")
    assert await client.ping()  # the connection went back to the pool clean
