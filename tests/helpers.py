"""Shared test helpers: unique names, worker subprocesses, publishing and reading back."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import redis.asyncio as aioredis

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REPO = Path(__file__).resolve().parent.parent


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def amqp_url_via(port: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/%2F"


def redis_url_via(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


async def async_wait_for(
    predicate: Any, within: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    timeout = within
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


class WorkerProcess:
    """A worker in a subprocess, as users run it: ``python -m workers.<role>`` or the CLI."""

    def __init__(
        self,
        config_text: str,
        tmp_path: Path,
        *,
        module: str = "proxy",
        args: Sequence[str] = ("run",),
        env: Mapping[str, str] | None = None,
        health_port: int | None = None,
        name: str = "worker",
    ) -> None:
        self.health_port = health_port or free_port()
        self.config_path = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.toml"
        self.config_path.write_text(config_text)
        self.log_path = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.module = module
        self.args = list(args)
        self.env = {
            **os.environ,
            "MESSAGE_PROXY_HEALTH__PORT": str(self.health_port),
            "MESSAGE_PROXY_HEALTH__HOST": "127.0.0.1",
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_ready: bool = True, timeout: float = 20.0) -> WorkerProcess:
        command = [sys.executable, "-m", self.module, *self.args, "--config", str(self.config_path)]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
        )
        log.close()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.logs()}")
            return self.get("/ready")[0] == 200

        wait_for(ready, timeout, what=f"worker ready; logs:\n{self.logs()}")

    def get(self, path: str) -> tuple[int, bytes]:
        return http_get(self.health_port, path)

    def metrics(self) -> str:
        return self.get("/metrics")[1].decode()

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> WorkerProcess:
        try:
            return self.start()
        except BaseException:  # not ready: no __exit__ follows, so it must not outlive the test
            self.kill()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def run_cli(
    args: Sequence[str],
    *,
    module: str = "proxy",
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


# --- brokers ---------------------------------------------------------------------------------


async def declare_topology(
    queue: str,
    exchange: str | None = None,
    routing_key: str = "#",
    *,
    arguments: dict[str, Any] | None = None,
    url: str = AMQP_URL,
) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, durable=True, arguments=arguments)
        if exchange:
            x = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            await q.bind(x, routing_key)


async def publish(
    messages: Iterable[aio_pika.Message | tuple[aio_pika.Message, str]],
    *,
    exchange: str = "",
    routing_key: str = "",
    confirm_every: int = 1000,
) -> int:
    """Publish with confirms (in windows of ``confirm_every``); returns how many were sent."""
    connection = await aio_pika.connect(AMQP_URL)
    count = 0
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
        pending: list[Any] = []
        for item in messages:
            message, key = item if isinstance(item, tuple) else (item, routing_key)
            pending.append(target.publish(message, routing_key=key))
            count += 1
            if len(pending) >= confirm_every:
                await asyncio.gather(*pending)
                pending.clear()
        if pending:
            await asyncio.gather(*pending)
    return count


def json_message(payload: Any, **properties: Any) -> aio_pika.Message:
    properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
    properties.setdefault("content_type", "application/json")
    return aio_pika.Message(orjson.dumps(payload), **properties)


async def queue_depth(queue: str, *, url: str = AMQP_URL) -> int:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)


async def ready_and_unacked(queue: str) -> tuple[int, int]:
    """Messages the queue still owns: (ready, delivered but unacked), via rabbitmqctl."""
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    for line in out.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == queue:
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"queue {queue} not listed")


async def delete_queues(*queues: str, url: str = AMQP_URL) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)


def redis_client() -> aioredis.Redis:
    return aioredis.Redis.from_url(REDIS_URL)


async def stream_entries(stream: str) -> list[dict[bytes, bytes]]:
    client = redis_client()
    try:
        entries = await client.xrange(stream)
        return [fields for _id, fields in entries]
    finally:
        await client.aclose()


async def stream_length(stream: str) -> int:
    client = redis_client()
    try:
        return int(await client.xlen(stream))
    finally:
        await client.aclose()


async def stream_message_ids(stream: str) -> list[str]:
    """Every entry's ``message_id`` in order, read in pages (streams may be large)."""
    client = redis_client()
    ids: list[str] = []
    try:
        start = "-"
        while True:
            page = await client.xrange(stream, min=start, count=10_000)
            if not page:
                return ids
            for _entry_id, fields in page:
                ids.append(fields.get(b"message_id", b"").decode())
            last = page[-1][0].decode()
            millis, seq = last.split("-")
            start = f"{millis}-{int(seq) + 1}"
    finally:
        await client.aclose()


async def delete_keys(*keys: str) -> None:
    client = redis_client()
    try:
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
