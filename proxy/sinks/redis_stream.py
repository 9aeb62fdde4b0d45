"""Redis Streams: one pipelined round trip of XADDs per batch (CONTRACT.md section 2)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from pydantic import SecretStr
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from proxy.encoding import Fields, dead_letter_fields, entry_fields
from proxy.errors import PermanentError, TransientError
from proxy.routing import StreamTarget
from proxy.sinks import Outcome, Publish

# Replies that mean "the server is busy or failing over", not "this entry is wrong".
_TRANSIENT_REPLIES = (
    redis_errors.OutOfMemoryError,
    redis_errors.ReadOnlyError,
    redis_errors.BusyLoadingError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
)
_TRANSIENT_PREFIXES = ("OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS")
_UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError)


def _reply_outcome(reply: Any, target: StreamTarget) -> Outcome:
    if not isinstance(reply, Exception):
        return None
    text = str(reply)
    if isinstance(reply, _TRANSIENT_REPLIES) or text.startswith(_TRANSIENT_PREFIXES):
        raise TransientError(f"redis: {text}")
    return PermanentError("rejected", f"stream {target.name!r} refused the entry: {text}")


class RedisStreamSink:
    def __init__(self, url: SecretStr, *, timeout: float = 5.0) -> None:
        self._timeout = timeout
        # Our own retry loop decides when to try again; the client must fail fast instead.
        self._client = aioredis.Redis.from_url(
            url.get_secret_value(),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    @property
    def broker(self) -> str:
        return "redis"

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def connect(self) -> None:
        await self.ping()

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.ping()
        except _UNREACHABLE as exc:
            raise TransientError(f"redis: {exc or type(exc).__name__}") from exc
        except redis_errors.RedisError as exc:
            raise TransientError(f"redis: {exc}") from exc

    async def publish_batch(self, items: Sequence[Publish]) -> list[Outcome]:
        encoded: dict[int, Fields] = {}  # one encoding per message, however many streams
        pipe = self._client.pipeline(transaction=False)
        for item in items:
            target = item.target
            if not isinstance(target, StreamTarget):
                raise TypeError(f"RedisStreamSink cannot publish to {target!r}")
            key = id(item.message) if item.dead_letter is None else id(item)
            fields = encoded.get(key)
            if fields is None:
                if item.dead_letter is None:
                    fields = entry_fields(item.message)
                else:
                    fields = dead_letter_fields(item.message, item.dead_letter)
                encoded[key] = fields
            pipe.xadd(target.name, fields, maxlen=target.maxlen, approximate=True)  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(self._timeout):
                replies = await pipe.execute(raise_on_error=False)
        except _UNREACHABLE as exc:
            raise TransientError(f"redis: {exc or type(exc).__name__}") from exc
        except redis_errors.RedisError as exc:
            raise TransientError(f"redis: {exc}") from exc
        outcomes: list[Outcome] = []
        for item, reply in zip(items, replies, strict=True):
            target = item.target
            if not isinstance(target, StreamTarget):  # pragma: no cover - checked above
                raise TypeError(f"RedisStreamSink cannot publish to {target!r}")
            outcomes.append(_reply_outcome(reply, target))
        return outcomes

    async def aclose(self) -> None:
        await self._client.aclose()
