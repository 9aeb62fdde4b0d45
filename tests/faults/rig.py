"""One fault scenario's rig: a queue, a destination, TCP proxies in front of the brokers, workers.

Every worker reaches RabbitMQ and Redis through a ``TcpProxy``, so a test can cut, blackhole or slow
either broker without touching the shared servers. Publishing and reading back go direct. The
destination is a Redis stream, or an exchange (through a proxy of its own, ``amqp_out``) bound to a
queue the rig drains.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aio_pika

from tests.helpers import (
    AMQP_URL,
    REDIS_URL,
    WorkerProcess,
    amqp_url_via,
    declare_topology,
    delete_queues,
    queue_depth,
    redis_client,
    redis_url_via,
    stream_message_ids,
    unique,
)
from tests.tcp_proxy import TcpProxy

FAULT_S = 3.0


@dataclass(frozen=True)
class Result:
    scenario: str
    dedupe: bool
    messages: int
    lost: int
    duplicates: int
    recover_s: float | None  # see LEGEND
    unready_seen: bool | None  # readiness turned 503 during the fault


LEGEND = (
    "recover s: from the heal (or the kill of one replica) until every live worker is ready and\n"
    "writing again; kill -9: mean restart-to-ready; poison: worker start to the last message;\n"
    "rabbitmq node stopped: from the stop until the worker is ready on another node.\n"
    "503 seen: /ready turned 503 during the fault. Dedupe does not apply to an exchange."
)


class Results(list[Result]):
    def table(self) -> str:
        order = {name: n for n, name in enumerate(dict.fromkeys(r.scenario for r in self))}
        ranked = sorted(self, key=lambda r: (order[r.scenario], not r.dedupe))
        head = ("scenario", "dedupe", "messages", "lost", "duplicates", "recover s", "503 seen")
        rows = [head] + [
            (
                r.scenario,
                "on" if r.dedupe else "off",
                str(r.messages),
                str(r.lost),
                str(r.duplicates),
                "-" if r.recover_s is None else f"{r.recover_s:.1f}",
                "-" if r.unready_seen is None else ("yes" if r.unready_seen else "no"),
            )
            for r in ranked
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([*lines, "", LEGEND])


RESULTS = Results()


def message_ids(count: int) -> list[str]:
    return [f"m-{i}" for i in range(count)]


def message(message_id: str) -> aio_pika.Message:
    return aio_pika.Message(
        b'{"id": "%s", "pad": "..............................."}' % message_id.encode(),
        message_id=message_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def _redis_host_port() -> tuple[str, int]:
    host, port = REDIS_URL.split("//")[1].split("/")[0].split(":")
    return host, int(port)


def _amqp_host_port() -> tuple[str, int]:
    netloc = AMQP_URL.split("@")[1].split("/")[0]
    host, _, port = netloc.partition(":")
    return host, int(port or 5672)


class Rig:
    def __init__(
        self,
        tmp_path: Path,
        *,
        dedupe: bool,
        batch: int = 100,
        prefetch: int = 300,
        plugin: str | None = None,
        heartbeat: int | None = None,
        exchange: bool = False,
    ) -> None:
        self.tmp_path = tmp_path
        self.dedupe = dedupe
        self.batch = batch
        self.prefetch = prefetch
        self.plugin = plugin
        self.heartbeat = heartbeat
        self.queue, self.stream, self.dead = unique("fq"), unique("fs"), unique("fdl")
        self.amqp = TcpProxy(*_amqp_host_port()).start()
        self.redis = TcpProxy(*_redis_host_port()).start()
        self.workers: list[WorkerProcess] = []
        self.exchange = exchange
        self.out_exchange, self.out_queue = unique("fx"), unique("fo")
        self.amqp_out = TcpProxy(*_amqp_host_port()).start()
        self._received: Counter[str] = Counter()  # drained from out_queue so far
        # Where the test publishes to and reads the source queue, and where the exchange
        # destination's queue is: the machine's broker unless a scenario says otherwise.
        self.source_url = AMQP_URL
        self.out_url = AMQP_URL

    def config(self) -> str:
        query = f"?heartbeat={self.heartbeat}" if self.heartbeat else ""
        match = f'match.plugin = "{self.plugin}"' if self.plugin else ""
        dedupe = "true" if self.dedupe else "false"
        destination = f'{{ stream = "{self.stream}", dedupe = {dedupe} }}'
        amqp_out = ""
        if self.exchange:
            destination = f'{{ exchange = "{self.out_exchange}", routing_key = "out" }}'
            amqp_out = f"""
[amqp_out]
url = "{amqp_url_via(self.amqp_out.port)}"
connect_timeout = 2
publish_timeout = 1
"""
        return f"""
[amqp]
url = "{amqp_url_via(self.amqp.port)}{query}"
prefetch = {self.prefetch}
connect_timeout = 2
{amqp_out}
[redis]
url = "{redis_url_via(self.redis.port)}"
timeout = 1

[dedupe]
window = "10m"

[batch]
max_messages = {self.batch}
max_delay_ms = 5

[[sources]]
queue = "{self.queue}"

[[routes]]
name = "all"
{match}
to = [ {destination} ]

[dead_letter]
stream = "{self.dead}"
"""

    async def start_worker(self, name: str = "worker") -> WorkerProcess:
        worker = WorkerProcess(self.config(), self.tmp_path, name=name)
        self.workers.append(worker)
        await asyncio.to_thread(worker.start)
        return worker

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.process is not None and w.process.poll() is None]

    def all_ready(self) -> bool:
        live = self.live_workers()
        return bool(live) and all(w.get("/ready")[0] == 200 for w in live)

    async def declare(self) -> None:
        await declare_topology(self.queue, url=self.source_url)
        if self.exchange:
            await declare_topology(self.out_queue, self.out_exchange, url=self.out_url)

    async def publish_paced(self, ids: Sequence[str], seconds: float, chunk: int = 50) -> None:
        """Publish with confirms, spread evenly over ``seconds``: the flow a fault lands in."""
        connection = await aio_pika.connect(self.source_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = channel.default_exchange
            started = time.monotonic()
            for start in range(0, len(ids), chunk):
                await asyncio.gather(
                    *(
                        exchange.publish(message(i), routing_key=self.queue)
                        for i in ids[start : start + chunk]
                    )
                )
                due = started + (start + chunk) / len(ids) * seconds
                await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def delivered(self) -> int:
        """How many entries (or messages) the destination holds, duplicates included."""
        if self.exchange:
            return (await self.counts()).total()
        client = redis_client()
        try:
            return int(await client.xlen(self.stream))
        finally:
            await client.aclose()

    async def counts(self, stream: str | None = None) -> Counter[str]:
        if self.exchange and stream is None:
            await self._drain_out_queue()
            return Counter(self._received)
        return Counter(await stream_message_ids(stream or self.stream))

    async def _drain_out_queue(self) -> None:
        connection = await aio_pika.connect(self.out_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(self.out_queue)
            while (got := await queue.get(no_ack=True, fail=False)) is not None:
                self._received[got.message_id or ""] += 1

    async def wait_for_all(self, ids: Sequence[str], within: float = 60.0) -> Counter[str]:
        """Wait until every id is in the stream; returns what is there (possibly incomplete)."""
        wanted = set(ids)
        deadline = time.monotonic() + within
        while True:
            counts = await self.counts()
            if wanted <= counts.keys() or time.monotonic() > deadline:
                await asyncio.sleep(0.3)  # let late duplicates land before counting them
                return await self.counts()
            await asyncio.sleep(0.1)

    async def watch_unready(self, seconds: float) -> bool:
        """Hold a fault for ``seconds``; whether readiness turned false meanwhile."""
        unready = False
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready = await asyncio.to_thread(self.all_ready)
            unready = unready or not ready
            await asyncio.sleep(0.1)
        return unready

    async def wait_recovered(self, length_before: int, within: float = 60.0) -> float:
        """Seconds until every live worker is ready and the stream grows past ``length_before``."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            grown = await self.delivered() > length_before
            if grown and await asyncio.to_thread(self.all_ready):
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise TimeoutError(f"not recovered within {within}s; logs:\n{self.logs()}")

    async def fault_mid_flow(
        self,
        ids: Sequence[str],
        inject: Callable[[], None],
        heal: Callable[[], None],
        *,
        spread_s: float = 3.0,
        at_s: float = 1.0,
        fault_s: float = FAULT_S,
    ) -> tuple[Counter[str], float, bool]:
        """Publish ``ids`` over ``spread_s``; inject at ``at_s`` for ``fault_s``; heal; wait."""
        publisher = asyncio.create_task(self.publish_paced(ids, spread_s))
        await asyncio.sleep(at_s)
        inject()
        unready = await self.watch_unready(fault_s)
        length_at_heal = await self.delivered()
        heal()
        recover_s = await self.wait_recovered(length_at_heal)
        await publisher
        return await self.wait_for_all(ids), recover_s, unready

    def record(
        self,
        scenario: str,
        ids: Sequence[str],
        counts: Counter[str],
        recover_s: float | None,
        unready_seen: bool | None = None,
    ) -> Result:
        result = Result(
            scenario=scenario,
            dedupe=self.dedupe,
            messages=len(ids),
            lost=sum(1 for i in ids if i not in counts),
            duplicates=sum(n - 1 for n in counts.values() if n > 1),
            recover_s=recover_s,
            unready_seen=unready_seen,
        )
        RESULTS.append(result)
        return result

    async def check(self, result: Result) -> None:
        """What every scenario must end with, whatever the fault."""
        assert result.lost == 0, f"{result}\n{self.logs()}"
        if self.dedupe:
            assert result.duplicates == 0, f"{result}\n{self.logs()}"
        assert await asyncio.to_thread(self.all_ready), self.logs()
        assert await queue_depth(self.queue, url=self.source_url) == 0
        for worker in self.live_workers():  # and stops cleanly: nothing left hanging
            assert await asyncio.to_thread(worker.stop, 15.0) == 0, self.logs()

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.logs()[-4000:]}" for w in self.workers)

    async def close(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.kill()
        self.amqp.stop()
        self.redis.stop()
        self.amqp_out.stop()
        await delete_queues(self.queue, url=self.source_url)
        await delete_queues(self.out_queue, url=self.out_url)
        if self.exchange:
            connection = await aio_pika.connect(self.out_url)
            async with connection:
                await (await connection.channel()).exchange_delete(self.out_exchange)
        client = redis_client()
        try:
            keys = [self.stream, self.dead]
            keys += [k async for k in client.scan_iter(match=f"{{{self.stream}}}:*", count=1000)]
            await client.delete(*keys)
        finally:
            await client.aclose()
