"""``message-proxy replay``: dead letters published again, each removed only once RabbitMQ
confirmed it; here what both sources share, and the dead-letter stream.

From a dead-letter **stream**: entries are read in pages (``XRANGE``), from ``--since`` (or the
start) up to ``--until`` or the last entry present when the replay starts, so dead letters written
meanwhile (a replayed message failing again) are left for the next run. Each page is published
mandatory with publisher confirms through the project's exchange sink, and the entries RabbitMQ
confirmed are deleted (``XDEL``); an entry returned as unroutable, refused, or whose body was
truncated is kept and reported. From a dead-letter **queue**: ``replay_queue``.

Killed at any moment, a replay loses nothing: an entry is deleted (a message acked) only after
its publish was confirmed. What was confirmed but not yet deleted is published again by the next
run: at least once, like everything else.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from proxy.amqp.connection import AmqpConnection
from proxy.amqp.nodes import open_first
from proxy.backoff import Backoff
from proxy.config import Config, ExchangeDestination
from proxy.deadletters import DeadLetter, Filter, from_stream_entry
from proxy.errors import AmqpError, ChannelClosed, PermanentError, RouteError, TransientError
from proxy.message import Message
from proxy.routing import ExchangeTarget, compile_destination
from proxy.sinks import Outcome, Publish

PAGE = 100
# How long one page may keep failing (a broker restarting) before the replay stops.
RETRY_WINDOW_S = 30.0
PROGRESS_INTERVAL_S = 0.1
REPLAY_ROUTE = "replay"


class ReplayStopped(Exception):
    """A broker kept failing: what was confirmed is removed, the rest stays for the next run."""


@dataclass
class Summary:
    source: str
    dry_run: bool
    scanned: int = 0
    replayed: int = 0
    filtered: int = 0
    truncated: int = 0
    kept: int = 0  # unroutable, refused, or no target: reported one by one
    total: int | None = None

    @property
    def failed(self) -> bool:
        return self.kept > 0

    def line(self) -> str:
        verb = "would replay" if self.dry_run else "replayed"
        parts = [f"{verb} {self.replayed} of {self.scanned} dead letters from {self.source}"]
        if self.filtered:
            parts.append(f"{self.filtered} filtered out")
        if self.truncated:
            parts.append(f"{self.truncated} kept: body truncated (too-large), never replayed")
        if self.kept:
            parts.append(f"{self.kept} kept: not accepted (see above)")
        return "; ".join(parts)


@dataclass
class Progress:
    """A one-line bar on a terminal (stderr), redrawn at most ten times a second."""

    out: TextIO
    summary: Summary
    enabled: bool = field(init=False)
    _drawn: float = 0.0

    def __post_init__(self) -> None:
        self.enabled = self.out.isatty()

    def note(self, line: str) -> None:
        """One line on the same stream, above the bar (which the next ``show`` redraws)."""
        if self.enabled:
            self.out.write("\r\033[K")
            self._drawn = 0.0
        print(line, file=self.out)

    def show(self, *, last: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not last and now - self._drawn < PROGRESS_INTERVAL_S:
            return
        self._drawn = now
        s = self.summary
        total = s.total or s.scanned or 1
        done = min(1.0, s.scanned / total)
        bar = "#" * round(done * 30)
        self.out.write(
            f"\rreplay [{bar:<30}] {s.scanned}/{s.total if s.total is not None else '?'} "
            f"read, {s.replayed} replayed, {s.kept + s.truncated} kept"
        )
        if last:
            self.out.write("\n")
        self.out.flush()


@dataclass(frozen=True)
class Target:
    """Where a dead letter goes: a destination template over the message as it first came in
    (``{exchange}`` and ``{routing_key}`` by default: where it was published)."""

    destination: ExchangeDestination

    def build(self) -> Callable[[Message], ExchangeTarget]:
        build = compile_destination(REPLAY_ROUTE, self.destination).build

        def target(message: Message) -> ExchangeTarget:
            built = build(message)
            if not isinstance(built, ExchangeTarget):
                raise TypeError("a replay publishes to an exchange")
            return built

        return target


class Replayer:
    """Publishes pages of dead letters through the exchange sink; what each came to."""

    def __init__(self, config: Config, target: Target, progress: Progress) -> None:
        from proxy.sinks.amqp_exchange import AmqpExchangeSink

        # The original exchanges are on the broker the sources consume from.
        self._settings = config.amqp
        self._sink = AmqpExchangeSink(config.amqp, connection_name="message-proxy replay")
        self._target = target.build()
        self.progress = progress
        self.summary = progress.summary
        # Exchanges checked before publishing to them, and why each cannot take a message: a
        # publish to a missing exchange closes the channel, and the publishes not confirmed
        # by then would have to be sent again (twice, for those RabbitMQ had routed).
        self._exchanges: dict[str, str | None] = {}
        self._checker: AmqpConnection | None = None

    def plan(self, letter: DeadLetter) -> Publish | str:
        """The publish for ``letter``, or why there is none."""
        if letter.unreplayable is not None:
            return letter.unreplayable
        try:
            return Publish(letter.message, self._target(letter.message))
        except RouteError as exc:
            return f"no target: {exc}"

    async def refusal(self, item: Publish) -> str | None:
        """Why the item's exchange cannot take it (missing, not allowed), checked once per
        exchange with a passive declare on a connection of its own; None when it can."""
        target = item.target
        if not isinstance(target, ExchangeTarget) or target.exchange == "":
            return None  # the default exchange always exists
        name = target.exchange
        if name not in self._exchanges:
            try:
                async with asyncio.timeout(self._settings.connect_timeout):
                    checker = self._checker
                    if checker is None or checker.is_closed:
                        checker = self._checker = await open_first(
                            self._settings, connection_name="message-proxy replay check"
                        )
                    await checker.declare_exchange(name, "topic", side=True, passive=True)
                self._exchanges[name] = None
            except ChannelClosed as exc:
                self._exchanges[name] = f"exchange {name!r}: {exc.reply_code} {exc.reply_text}"
            except (AmqpError, OSError, TimeoutError):
                return None  # unknown: the publish finds out, with its confirm
        return self._exchanges[name]

    def describe(self, where: str, letter: DeadLetter, item: Publish) -> str:
        target = item.target
        if not isinstance(target, ExchangeTarget):
            raise TypeError("a replay publishes to an exchange")
        return (
            f"{where} ({letter.reason or '?'}, route {letter.route or '-'}) -> exchange "
            f"{target.exchange!r} routing key {target.routing_key!r} "
            f"({len(letter.message.body)} bytes)"
        )

    async def publish(self, items: Sequence[Publish]) -> list[Outcome]:
        """Outcomes once RabbitMQ answered every item; a broker that stays unreachable for
        ``RETRY_WINDOW_S`` raises ``ReplayStopped``."""
        backoff = Backoff()
        deadline = time.monotonic() + RETRY_WINDOW_S
        while True:
            try:
                return await self._sink.publish_batch(items)
            except TransientError as exc:
                if time.monotonic() > deadline:
                    raise ReplayStopped(str(exc)) from exc
                delay = backoff.next_delay()
                self.progress.note(f"replay: {exc}; retry in {delay:.1f}s")
                await asyncio.sleep(delay)

    def kept(self, where: str, why: str) -> None:
        self.summary.kept += 1
        self.progress.note(f"kept {where}: {why}")

    async def aclose(self) -> None:
        await self._sink.aclose()
        if self._checker is not None:
            await self._checker.close(5.0)


async def _guarded_redis(call: Any, what: str) -> Any:
    backoff = Backoff()
    deadline = time.monotonic() + RETRY_WINDOW_S
    while True:
        try:
            return await call()
        except Exception as exc:  # the redis client's errors: unreachable, timeout, failover
            if time.monotonic() > deadline:
                raise ReplayStopped(f"redis: {what}: {exc}") from exc
            await asyncio.sleep(backoff.next_delay())


# --- from a dead-letter stream ----------------------------------------------------------------


async def replay_stream(
    config: Config,
    stream: str,
    *,
    target: Target,
    selection: Filter,
    limit: int | None,
    dry_run: bool,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> Summary:
    from proxy.sinks.redis_clients import aclose_client, client_for  # not in the relay's image

    client = client_for(config.redis)
    summary = Summary(f"stream {stream!r}", dry_run)
    progress = Progress(err, summary)
    replayer = Replayer(config, target, progress)
    try:
        summary.total = int(await _guarded_redis(lambda: client.xlen(stream), "XLEN"))
        last = await _guarded_redis(lambda: client.xrevrange(stream, count=1), "XREVRANGE")
        if not last:
            return summary
        end = last[0][0].decode()  # entries added from now on are left for the next run
        if selection.until_ms is not None:
            end = min(end, f"{selection.until_ms}-18446744073709551615", key=_entry_order)
        start = "-" if selection.since_ms is None else str(selection.since_ms)
        while limit is None or summary.replayed + summary.kept < limit:
            page = await _guarded_redis(
                lambda s=start: client.xrange(stream, min=s, max=end, count=PAGE), "XRANGE"
            )
            if not page:
                break
            start = "(" + page[-1][0].decode()
            room = None if limit is None else limit - summary.replayed - summary.kept
            done = await _stream_page(client, stream, page, replayer, selection, room, out)
            progress.show()
            if not done:
                break
    finally:
        progress.show(last=True)
        await replayer.aclose()
        await aclose_client(client)
    return summary


def _entry_order(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


async def _stream_page(
    client: Any,
    stream: str,
    page: Sequence[tuple[bytes, dict[bytes, bytes]]],
    replayer: Replayer,
    selection: Filter,
    room: int | None,
    out: TextIO,
) -> bool:
    """Replay one page; False once ``room`` (the limit) is used up."""
    summary = replayer.summary
    chosen: list[tuple[str, DeadLetter, Publish]] = []
    taken = 0  # towards the limit: chosen, or kept for a reason of its own
    for raw_id, fields in page:
        if room is not None and taken >= room:
            await _publish_and_delete(client, stream, chosen, replayer, out)
            return False
        entry_id = raw_id.decode()
        summary.scanned += 1
        try:
            letter = from_stream_entry(fields)
        except ValueError as exc:  # not a dead-letter entry: headers that are not JSON
            taken += 1
            replayer.kept(entry_id, f"not a dead-letter entry: {exc}")
            continue
        if not selection.matches(letter):
            summary.filtered += 1
            continue
        planned = replayer.plan(letter)
        if isinstance(planned, str) and letter.unreplayable is not None:
            summary.truncated += 1
            if summary.dry_run:
                print(f"skip {entry_id}: {planned}", file=out)
            continue
        taken += 1
        if isinstance(planned, str):
            replayer.kept(entry_id, planned)
            continue
        refusal = await replayer.refusal(planned)
        if refusal is not None:
            replayer.kept(entry_id, refusal)
            continue
        chosen.append((entry_id, letter, planned))
    await _publish_and_delete(client, stream, chosen, replayer, out)
    return True


async def _publish_and_delete(
    client: Any,
    stream: str,
    chosen: Sequence[tuple[str, DeadLetter, Publish]],
    replayer: Replayer,
    out: TextIO,
) -> None:
    summary = replayer.summary
    if not chosen:
        return
    if summary.dry_run:
        for entry_id, letter, item in chosen:
            print(f"would replay {replayer.describe(entry_id, letter, item)}", file=out)
        summary.replayed += len(chosen)
        return
    outcomes = await replayer.publish([item for _, _, item in chosen])
    confirmed = []
    for (entry_id, _, _), outcome in zip(chosen, outcomes, strict=True):
        if isinstance(outcome, PermanentError):
            replayer.kept(entry_id, f"{outcome.reason}: {outcome.detail}")
        else:
            confirmed.append(entry_id)
    if confirmed:
        await _guarded_redis(lambda: client.xdel(stream, *confirmed), "XDEL")
        summary.replayed += len(confirmed)
