"""Batch, route, publish, then settle: the only place a delivery is acked or rejected.

Natural batching: a batch is written as soon as the intake has handed over what the socket held
and no batch is in flight; while one is in flight, deliveries accumulate and make the next, so
batches grow by themselves exactly when the load needs them. ``batch.max_messages`` bounds a
batch (and ``max_batch_bytes`` its bodies); ``batch.max_delay_ms`` > 0 is a minimum linger, for
fewer, larger writes under a light load. One batch is in flight at a time, so delivery tags are
settled in order and one ``basic.ack(multiple=True)`` covers the batch. A destination that
cannot be reached holds the batch (retried with backoff, never acked meanwhile); prefetch then
stops the broker from sending more. A destination that refuses one message dead-letters that
message only; a dead-letter destination that refuses holds the batch like an outage.

A held delivery whose channel closes meanwhile (the broker's consumer timeout, a lost connection)
is dropped before the next retry: RabbitMQ has requeued it and delivers it again, so writing the
held copy as well would write it twice. Not one from a stream queue: RabbitMQ does not deliver
it again (the consumer resumes after the recorded offset), so it is written all the same, once,
by its offset.

A reload hands new rules (routes, dead-letter destination, batching) to ``reconfigure``; they
take effect between two batches, never inside one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from operator import attrgetter, itemgetter

from proxy.amqp.consumer import Delivery, Settler
from proxy.backoff import Backoff
from proxy.config import BatchSettings, DeadLetter
from proxy.encoding import DeadLetterInfo
from proxy.errors import AmqpError, PermanentError, RouteError, TransientError
from proxy.message import Message
from proxy.metrics import Metrics
from proxy.routing import Rejected, Routed, Router, StreamTarget, Target, compile_destination
from proxy.sinks import Accepted, OffsetStore, Outcome, Publish, Sink
from proxy.state import HealthState
from proxy.stream_offsets import StreamPosition, WrittenOffsets

log = logging.getLogger(__name__)

DEAD_LETTER_ROUTE = "dead-letter"
DEAD_LETTER_COMPONENT = "dead_letter"  # its name in /ready while its destination refuses
# Retries of a refused dead letter stop at this delay, not the outage cap of 30 s: nothing tells
# the worker that the operator fixed the destination, so it asks this often.
DEAD_LETTER_RETRY_CAP_S = 5.0
BROKER_RECHECK_S = 0.1


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    detail: str
    route: str | None


class DeadLetterDestination:
    """Where permanent failures go: the ``[dead_letter]`` destination, built like a route's."""

    def __init__(self, config: DeadLetter) -> None:
        self._build = compile_destination(DEAD_LETTER_ROUTE, config.destination()).build

    def target(self, message: Message) -> Target:
        return self._build(message)


@dataclass(frozen=True, slots=True)
class Rules:
    """What a reload may change in the pipeline; applied between two batches."""

    router: Router
    dead_letter: DeadLetterDestination | None
    drop_unrouted: bool
    batch: BatchSettings
    offsets: OffsetStore | None  # set while some source is a stream queue


class Pipeline:
    def __init__(
        self,
        router: Router,
        sinks: Mapping[type[Target], Sink],
        *,
        batch: BatchSettings,
        health: HealthState,
        metrics: Metrics,
        dead_letter: DeadLetterDestination | None = None,
        drop_unrouted: bool = False,
        max_batch_bytes: int | None = None,
        offsets: OffsetStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._router = router
        # Stream-queue offsets: where they are kept, and what this worker recorded there.
        self._offsets = offsets
        self._written = WrittenOffsets()
        self._sinks = dict(sinks)
        self._dead_letter = dead_letter
        self._drop_unrouted = drop_unrouted
        self._max_messages = batch.max_messages
        self._max_delay = batch.max_delay_ms / 1000
        # Bodies per batch (at least one delivery): writing a batch copies its bodies on the
        # way out, so with large bodies a smaller batch keeps those copies small.
        self._max_batch_bytes = max_batch_bytes
        self._health = health
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._pending: list[Delivery] = []
        self._inflight = 0
        self._batch: list[Delivery] = []  # the batch being flushed
        self._flushed = asyncio.Event()  # set after every batch
        self._next_rules: tuple[Rules, asyncio.Future[None]] | None = None
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    # --- intake (called by the source for every delivery) ---

    def submit(self, delivery: Delivery) -> None:
        pending = self._pending
        pending.append(delivery)
        if len(pending) == 1:
            self._idle.clear()
            self._wake.set()
        if len(pending) >= self._max_messages:
            self._full.set()

    @property
    def pending(self) -> int:
        return len(self._pending) + self._inflight

    # --- the flush loop ---

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            while self._pending:
                await self._wait_for_batch()
                if self._next_rules is not None:
                    self._swap_rules()
                batch = self._batch = self._next_batch()
                self._inflight = len(batch)
                try:
                    await self._flush(batch)
                finally:
                    self._inflight = 0
                    self._batch = []
                    self._flushed.set()
                    self._flushed.clear()
            self._wake.clear()
            self._full.clear()
            self._idle.set()

    def _next_batch(self) -> list[Delivery]:
        """The oldest deliveries: up to ``max_messages``, and up to ``max_batch_bytes`` of
        bodies, but at least one."""
        pending, count = self._pending, self._max_messages
        limit = self._max_batch_bytes
        if limit is not None and sum(map(len, map(_body, pending[:count]))) > limit:
            size = 0
            for position, delivery in enumerate(pending[:count]):
                size += len(delivery.message.body)
                if size >= limit:
                    count = position + 1
                    break
        batch = pending[:count]
        del pending[:count]
        return batch

    async def _wait_for_batch(self) -> None:
        if self._draining:
            return
        pending = self._pending
        delay = flush_delay(
            len(pending),
            pending[0].received_at,
            self._clock(),
            max_messages=self._max_messages,
            min_linger=self._max_delay,
        )
        if delay <= 0:
            return
        self._full.clear()
        with suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._full.wait()

    # --- reload: new rules between two batches ---

    async def reconfigure(self, rules: Rules) -> None:
        """Route, dead-letter and batch by ``rules`` from the next batch on; returns once they
        apply. The batch being written (if any) finishes by the rules it started with."""
        if not self._batch:
            self._apply(rules)  # between two batches already: nothing is being written
            return
        if self._next_rules is not None:
            self._next_rules[1].cancel()  # superseded before it applied
        swapped = asyncio.get_running_loop().create_future()
        self._next_rules = (rules, swapped)
        await swapped

    def _swap_rules(self) -> None:
        if self._next_rules is None:
            return
        (rules, swapped), self._next_rules = self._next_rules, None
        self._apply(rules)
        if not swapped.done():
            swapped.set_result(None)

    def _apply(self, rules: Rules) -> None:
        self._router = rules.router
        self._dead_letter = rules.dead_letter
        self._drop_unrouted = rules.drop_unrouted
        self._max_messages = rules.batch.max_messages
        self._max_delay = rules.batch.max_delay_ms / 1000
        self._offsets = rules.offsets
        if len(self._pending) >= self._max_messages:
            self._full.set()

    async def settle(self, queues: Collection[str]) -> None:
        """Return once no delivery from ``queues`` is waiting or being written: each one was
        acked, rejected, or dropped with its closed channel (RabbitMQ then delivers it again)."""
        while any(d.message.queue in queues for d in (*self._pending, *self._batch)):
            await self._flushed.wait()

    async def drain(self) -> None:
        """Flush what was received without waiting for batch deadlines; returns when idle."""
        self._draining = True
        self._full.set()
        await self._idle.wait()

    # --- one batch ---

    async def _flush(self, batch: list[Delivery]) -> None:
        started = self._clock()
        metrics = self._metrics
        metrics.inflight.set(len(batch) + len(self._pending))
        live = _on_open_channels(batch)
        if len(live) < len(batch):
            log.warning(
                "%d deliveries arrived on a channel that has since closed; "
                "RabbitMQ redelivers them",
                len(batch) - len(live),
            )
        if not live:
            return
        for queue, count in _count_queues(live).items():
            metrics.messages_consumed.labels(queue=queue).inc(count)
        metrics.batch_size.observe(len(live))

        publishes, failures = self._plan(live)
        offsets = self._new_offsets(live)
        # Dead letters known before publishing go out with the batch: one round trip, and with
        # a stream source the offsets can be recorded in the same atomic step.
        dead_letters, rejects = self._dead_letters(live, failures)
        for sink, items in dead_letters.items():
            publishes.setdefault(sink, []).extend(items)
        known = set(failures)
        recorded, refused = await self._publish_all(live, publishes, failures, offsets)
        late, late_rejects = self._dead_letters(
            live, {i: f for i, f in failures.items() if i not in known}
        )
        for sink, items in late.items():
            refused.setdefault(sink, []).extend(items)
        await self._dead_letter_reliably(live, refused)
        rejects |= late_rejects
        if offsets:
            if not recorded:
                await self._record_reliably(offsets)
            self._offsets_written(offsets, live)
        if not any(delivery.settleable for delivery in live):
            return  # all held past their channel, dropped from the retries: nothing to settle
        self._settle(live, rejects)
        self._observe_latency(live, rejects)
        metrics.flush_duration.observe(self._clock() - started)
        metrics.inflight.set(len(self._pending))
        self._health.flushed()

    def _plan(
        self, live: Sequence[Delivery]
    ) -> tuple[dict[Sink, list[tuple[int, Publish]]], dict[int, _Failure]]:
        """Route every delivery: what to publish where, and what already failed."""
        failures: dict[int, _Failure] = {}
        publishes: dict[Sink, list[tuple[int, Publish]]] = {}
        seen: set[StreamPosition] = set()
        for index, delivery in enumerate(live):
            message = delivery.message
            position = delivery.position
            if position is not None and self._written.replayed(position, seen):
                self._metrics.stream_skipped.labels(queue=message.queue).inc()
                continue  # acked with the batch (flow control only), not written again
            if delivery.defect is not None:
                failures[index] = _Failure("rejected", delivery.defect, None)
                continue
            decision = self._route(message)
            if isinstance(decision, Routed):
                for target in decision.targets:
                    sink = self._sinks[type(target)]
                    # Publish(...) without the NamedTuple's Python-level __new__: per message.
                    item = _new_tuple(Publish, (message, target, None, position))
                    publishes.setdefault(sink, []).append((index, item))
                continue
            if decision.reason == "unrouted":
                self._metrics.messages_unrouted.labels(queue=message.queue).inc()
                if self._drop_unrouted:
                    continue  # acked with the batch, counted, not dead-lettered
            failures[index] = _Failure(decision.reason, decision.detail, decision.route)
        return publishes, failures

    def _new_offsets(self, live: Sequence[Delivery]) -> dict[str, int]:
        """Per stream source in the batch, its last offset, where that is beyond the recorded.

        Every stream delivery of the batch is written (or dead-lettered, or dropped by design)
        before these are recorded: RabbitMQ does not deliver a stream's messages again, the
        consumer resumes after the recorded offset, so one left out would be lost.
        """
        if self._offsets is None:  # no stream-queue source
            return {}
        return self._written.beyond(d.position for d in live)

    async def _publish_all(
        self,
        live: Sequence[Delivery],
        publishes: Mapping[Sink, list[tuple[int, Publish]]],
        failures: dict[int, _Failure],
        offsets: Mapping[str, int],
    ) -> tuple[bool, dict[Sink, list[tuple[int, Publish]]]]:
        """Publish to every sink at once; a refused item marks its delivery as failed.

        Returns whether ``offsets`` were recorded with the writes (all of them went to the
        offset store, which recorded them atomically), and the refused dead letters.
        """
        store = self._offsets
        atomic = bool(offsets) and bool(publishes) and all(sink is store for sink in publishes)
        results, recorded = await self._publish_to_each(
            live, publishes, offsets if atomic else None
        )
        accepted: list[tuple[int, Publish, Outcome]] = []
        refused: dict[Sink, list[tuple[int, Publish]]] = {}
        for sink, (items, outcomes) in zip(publishes, results, strict=True):
            if not any(outcomes):  # all accepted, none a dead letter: counted in one pass
                if not any(map(_dead_letter, map(_item, items))):
                    self._count_published(Counter(map(_route_and_template, map(_item, items))))
                    continue
            for (index, item), outcome in zip(items, outcomes, strict=True):
                if not isinstance(outcome, PermanentError):
                    if item.dead_letter is None:
                        accepted.append((index, item, outcome))
                elif item.dead_letter is not None:
                    refused.setdefault(sink, []).append((index, item))
                elif index not in failures:
                    failures[index] = _Failure(
                        outcome.reason,
                        f"{_describe(item.target)}: {outcome.detail}",
                        item.target.route,
                    )
        self._count_accepted(accepted)
        return recorded, refused

    def _count_accepted(self, accepted: Sequence[tuple[int, Publish, Outcome]]) -> None:
        published: Counter[tuple[str, str]] = Counter()
        notes: Counter[Accepted] = Counter()
        already: dict[int, str] = {}  # per delivery, not per destination
        for index, item, outcome in accepted:
            if outcome is Accepted.ALREADY_WRITTEN:
                already[index] = item.message.queue
                continue
            if isinstance(outcome, Accepted):
                notes[outcome] += 1
            if outcome is not Accepted.DUPLICATE:  # a duplicate is accepted, not written
                published[(item.target.route, item.target.template)] += 1
        self._count_published(published)
        if notes[Accepted.DUPLICATE]:
            self._metrics.duplicates_suppressed.inc(notes[Accepted.DUPLICATE])
        if notes[Accepted.NO_MESSAGE_ID]:
            self._metrics.dedupe_skipped.labels(reason=Accepted.NO_MESSAGE_ID.value).inc(
                notes[Accepted.NO_MESSAGE_ID]
            )
        for queue, count in Counter(already.values()).items():
            self._metrics.stream_skipped.labels(queue=queue).inc(count)

    def _count_published(self, published: Counter[tuple[str, str]]) -> None:
        for (route, template), count in published.items():
            self._metrics.messages_published.labels(route=route, destination=template).inc(count)

    async def _publish_to_each(
        self,
        live: Sequence[Delivery],
        publishes: Mapping[Sink, list[tuple[int, Publish]]],
        offsets: Mapping[str, int] | None = None,
    ) -> tuple[list[Published], bool]:
        """Every sink's published items and outcomes, in the mapping's order, and whether
        ``offsets`` were recorded with them (only when every item goes to the offset store).
        Sinks are written concurrently."""
        if len(publishes) == 1:  # no Task: the write goes out before the loop reads more deliveries
            ((sink, items),) = publishes.items()
            published, recorded = await self._publish_reliably(sink, items, live, offsets)
            return [published], recorded
        results = await asyncio.gather(
            *(self._publish_reliably(sink, items, live) for sink, items in publishes.items())
        )
        return [published for published, _ in results], False

    def _route(self, message: Message) -> Routed | Rejected:
        try:
            return self._router.route(message)
        # A bug must cost one message, not the worker. SystemExit too: a plugin calling sys.exit()
        # would otherwise end the process on this message, and again on every redelivery.
        except (Exception, SystemExit) as exc:
            log.exception("routing raised unexpectedly")
            return Rejected("plugin-error", f"routing raised {type(exc).__name__}: {exc}")

    async def _publish_reliably(
        self,
        sink: Sink,
        items: list[tuple[int, Publish]],
        live: Sequence[Delivery],
        offsets: Mapping[str, int] | None = None,
    ) -> tuple[Published, bool]:
        """Publish until the sink answers; transient failures are retried with backoff.

        Returns what was published (items whose delivery's channel closed while the batch was
        held are left out: RabbitMQ delivers them again) and the sink's outcome for each; and,
        with ``offsets`` (the sink is then the offset store), whether it recorded them too.
        """
        backoff = Backoff()
        store = self._offsets
        while True:
            try:
                batch = [item for _, item in items]
                if offsets is not None and store is not None and sink is store:
                    outcomes, recorded = await store.publish_recording(batch, offsets)
                else:
                    outcomes, recorded = await sink.publish_batch(batch), False
            except TransientError as exc:
                for template in {item.target.template for _, item in items}:
                    self._metrics.publish_errors.labels(
                        destination=template, error="transient"
                    ).inc()
                if self._health.set_broker(sink.broker, False, str(exc)):
                    self._metrics.broker_up.labels(broker=sink.broker).set(0)
                delay = backoff.next_delay()
                log.warning(
                    "%s: %d messages held, not acked: %s; retry %d in %.1fs",
                    sink.broker,
                    len(items),
                    exc,
                    backoff.attempts,
                    delay,
                )
                await self._back_off(sink.broker, delay, partial(_any_held, items, live))
                items = _still_held(sink.broker, items, live)
                if not items:
                    return ([], []), False
                continue
            if self._health.set_broker(sink.broker, True, node=sink.node):
                self._metrics.broker_up.labels(broker=sink.broker).set(1)
                log.info("%s: accepting again", sink.broker)
            for (_, item), outcome in zip(items, outcomes, strict=True):
                if isinstance(outcome, PermanentError):
                    self._metrics.publish_errors.labels(
                        destination=item.target.template, error=outcome.reason
                    ).inc()
            return (items, outcomes), recorded

    async def _record_reliably(self, offsets: Mapping[str, int]) -> None:
        """Record stream offsets on their own, after every destination accepted the batch."""
        store = self._offsets
        if store is None:
            return
        backoff = Backoff()
        while True:
            try:
                await store.record_offsets(offsets)
                return
            except TransientError as exc:
                broker = store.broker
                if self._health.set_broker(broker, False, str(exc)):
                    self._metrics.broker_up.labels(broker=broker).set(0)
                delay = backoff.next_delay()
                log.warning(
                    "%s: stream offsets not recorded: %s; batch held, retry %d in %.1fs",
                    broker,
                    exc,
                    backoff.attempts,
                    delay,
                )
                await self._back_off(broker, delay, lambda: True)

    def _offsets_written(self, offsets: Mapping[str, int], live: Sequence[Delivery]) -> None:
        self._written.recorded(offsets)
        queues = {d.position.key: d.message.queue for d in live if d.position is not None}
        for key, offset in offsets.items():
            self._metrics.stream_offset.labels(queue=queues[key]).set(offset)

    async def _back_off(self, broker: str, delay: float, held: Callable[[], bool]) -> None:
        """Wait ``delay``, or less once the sink watcher has seen the broker answer again, or
        once nothing ``held`` is left to retry.

        The delay grows to 30 s: without this, the worker would sit ready but idle for up to that
        long after an outage ends. The watcher pings once a second, so retries stay that far apart
        even when the broker answers pings and still refuses writes.
        """
        steps = max(1, math.ceil(delay / BROKER_RECHECK_S))
        for _ in range(steps):
            await asyncio.sleep(delay / steps)
            state = self._health.snapshot().brokers.get(broker)
            if (state is not None and state.up) or not held():
                return

    def _dead_letters(
        self, live: Sequence[Delivery], failures: Mapping[int, _Failure]
    ) -> tuple[dict[Sink, list[tuple[int, Publish]]], set[int]]:
        """The dead letter of every failed delivery, and the indexes to reject instead of ack."""
        if not failures:
            return {}, set()
        now_ms = int(self._wall_clock() * 1000)
        rejects: set[int] = set()
        to_publish: dict[Sink, list[tuple[int, Publish]]] = {}
        for index, failure in failures.items():
            delivery = live[index]
            if not _held(delivery):  # held past its channel: it comes back, handled then
                continue
            message = delivery.message
            self._metrics.messages_dead_lettered.labels(reason=failure.reason).inc()
            log.warning(
                "dead-lettering message %s from queue %s: %s: %s",
                message.message_id or "(no id)",
                message.queue,
                failure.reason,
                failure.detail,
            )
            if self._dead_letter is None:
                self._cannot_dead_letter(delivery, index, rejects, "there is no [dead_letter]")
                continue
            info = DeadLetterInfo(failure.reason, failure.detail, failure.route, now_ms)
            try:
                target = self._dead_letter.target(message)
            except RouteError as exc:
                log.error("dead-letter destination cannot be named for this message: %s", exc)
                self._cannot_dead_letter(delivery, index, rejects, "its name has no value")
                continue
            sink = self._sinks[type(target)]
            item = Publish(message, target, info, delivery.position)
            to_publish.setdefault(sink, []).append((index, item))
        return to_publish, rejects

    @staticmethod
    def _cannot_dead_letter(delivery: Delivery, index: int, rejects: set[int], why: str) -> None:
        position = delivery.position
        if position is None:
            rejects.add(index)  # the queue's own dead-letter exchange, if any, takes it
            return
        # A stream cannot reject (RabbitMQ closes the connection): the message stays in the
        # stream, where moving the source's offset back reads it again.
        log.error(
            "stream queue %s: message at offset %s not written and not dead-lettered (%s); "
            "it stays in the stream",
            delivery.message.queue,
            "unknown" if position.offset is None else position.offset,
            why,
        )

    async def _dead_letter_reliably(
        self, live: Sequence[Delivery], to_publish: dict[Sink, list[tuple[int, Publish]]]
    ) -> None:
        """Publish dead letters until every one is accepted: a refusal holds the batch.

        The dead-letter destination is a message's last place to go: rejecting it instead would
        lose it (or, from a stream queue, close the connection). So a refusal (no such exchange,
        a key that is not a stream) is held like an outage: nothing acked, retried with backoff,
        readiness false with the cause, logged once per cause, until the operator fixes it.
        """
        backoff = Backoff(cap=DEAD_LETTER_RETRY_CAP_S)
        while to_publish:
            results, _ = await self._publish_to_each(live, to_publish)
            refused: dict[Sink, list[tuple[int, Publish]]] = {}
            cause = ""
            for sink, (items, outcomes) in zip(to_publish, results, strict=True):
                for entry, outcome in zip(items, outcomes, strict=True):
                    if isinstance(outcome, PermanentError):
                        refused.setdefault(sink, []).append(entry)
                        cause = cause or f"{_describe(entry[1].target)}: {outcome.detail}"
            if not refused:
                break
            held = sum(len(items) for items in refused.values())
            if self._health.set_held(DEAD_LETTER_COMPONENT, f"refused: {cause}"):
                log.error(
                    "dead-letter destination refused %d messages: %s; holding the batch, "
                    "nothing acked, retrying until it accepts",
                    held,
                    cause,
                )
            await asyncio.sleep(backoff.next_delay())
            still = {sink: _still_held(sink.broker, items, live) for sink, items in refused.items()}
            to_publish = {sink: items for sink, items in still.items() if items}
        if self._health.set_held(DEAD_LETTER_COMPONENT, None):
            log.info("dead-letter destination accepting again")

    def _settle(self, live: Sequence[Delivery], rejects: set[int]) -> None:
        """The one place deliveries are acked: rejects first, then one multiple ack per channel."""
        channel = live[0].channel
        if not rejects and all(delivery.channel is channel for delivery in live):
            try:
                channel.ack(max(map(_tag, live)), multiple=True)
            except AmqpError as exc:  # the channel closed while the batch was held
                log.warning(
                    "amqp: could not settle %d deliveries (%s); RabbitMQ redelivers them",
                    len(live),
                    exc,
                )
                return
            for queue, count in _count_queues(live).items():
                self._metrics.messages_acked.labels(queue=queue).inc(count)
            return
        by_channel: dict[Settler, list[tuple[int, Delivery]]] = {}
        for index, delivery in enumerate(live):
            by_channel.setdefault(delivery.channel, []).append((index, delivery))
        for channel, deliveries in by_channel.items():
            try:
                for index, delivery in deliveries:
                    if index in rejects:
                        channel.reject(delivery.tag, requeue=False)
                acked = [d for i, d in deliveries if i not in rejects]
                if acked:
                    channel.ack(max(d.tag for d in acked), multiple=True)
            except AmqpError as exc:  # the channel closed while the batch was held
                log.warning(
                    "amqp: could not settle %d deliveries (%s); RabbitMQ redelivers them",
                    len(deliveries),
                    exc,
                )
                continue
            for queue, count in _count_queues(d for i, d in deliveries if i not in rejects).items():
                self._metrics.messages_acked.labels(queue=queue).inc(count)

    def _observe_latency(self, live: Sequence[Delivery], rejects: set[int]) -> None:
        now = self._wall_clock()
        latencies: list[float] = []
        append = latencies.append
        last, seconds = None, 0.0
        # Timestamps are whole seconds, shared by runs of messages: comparing two is a small
        # fraction of converting one.
        for index, delivery in enumerate(live):
            timestamp = delivery.message.timestamp
            if timestamp is None or index in rejects:
                continue
            if timestamp != last:
                last, seconds = timestamp, timestamp.timestamp()
            append(max(0.0, now - seconds))
        self._metrics.end_to_end_latency.observe_many(latencies)


def flush_delay(
    pending: int, oldest_received_at: float, now: float, *, max_messages: int, min_linger: float
) -> float:
    """How long the pending deliveries wait before they are cut into a batch; 0: at once.

    The flush loop asks only when no batch is in flight, and it runs only after the intake has
    handed over every delivery of the bytes read: so without a linger, a batch goes out as soon
    as the worker is free, and holds whatever arrived while the previous one was being written.
    ``min_linger`` (seconds, ``max_delay_ms``) holds a batch that is not full until its oldest
    delivery has waited that long; a full batch never waits.
    """
    if pending >= max_messages or min_linger <= 0:
        return 0.0
    return max(0.0, oldest_received_at + min_linger - now)


# What one sink published, and its outcome for each item.
Published = tuple[list[tuple[int, Publish]], list[Outcome]]


def _held(delivery: Delivery) -> bool:
    """Still to be written: its channel is open, or it is from a stream queue, which RabbitMQ
    does not deliver again (it is written once all the same, by its offset)."""
    return delivery.settleable or delivery.position is not None


def _any_held(items: Sequence[tuple[int, Publish]], live: Sequence[Delivery]) -> bool:
    return any(_held(live[index]) for index, _ in items)


def _still_held(
    broker: str, items: list[tuple[int, Publish]], live: Sequence[Delivery]
) -> list[tuple[int, Publish]]:
    """The items still worth retrying: those whose delivery is still ``_held``."""
    kept = [(index, item) for index, item in items if _held(live[index])]
    if len(kept) < len(items):
        log.warning(
            "%s: %d held messages dropped from the retry: their channel closed, so RabbitMQ "
            "has requeued them and delivers them again",
            broker,
            len(items) - len(kept),
        )
    return kept


_new_tuple = tuple.__new__
_body = attrgetter("message.body")
_queue = attrgetter("message.queue")
_tag = attrgetter("tag")
_dead_letter = attrgetter("dead_letter")
_route_and_template = attrgetter("target.route", "target.template")
_item = itemgetter(1)


def _count_queues(deliveries: Iterable[Delivery]) -> Counter[str]:
    return Counter(map(_queue, deliveries))


def _on_open_channels(batch: list[Delivery]) -> list[Delivery]:
    """The deliveries whose channel is still open (``Delivery.settleable``), asked once per
    channel rather than once per delivery."""
    closed = [channel for channel in {d.channel for d in batch} if channel.is_closed]
    if not closed:
        return batch
    return [delivery for delivery in batch if delivery.channel not in closed]


def _describe(target: Target) -> str:
    if isinstance(target, StreamTarget):
        return f"stream {target.name!r}"
    return f"exchange {target.exchange!r} (routing key {target.routing_key!r})"
