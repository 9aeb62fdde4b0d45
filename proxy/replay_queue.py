"""``message-proxy replay --from-queue``: a dead-letter queue's messages published again, each
acked only once RabbitMQ confirmed it.

Only the messages present at the start are read (the queue's message count then), with a prefetch
of ``QUEUE_PREFETCH``. A message not replayed (filtered out, kept, past the limit, or every one in
a dry run) stays unacked until the end, when closing the connection gives it back to the queue.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from proxy.amqp.connection import AmqpConnection
from proxy.amqp.nodes import open_first
from proxy.config import Config
from proxy.deadletters import DeadLetter, Filter, from_queue_message
from proxy.errors import PermanentError
from proxy.message import EMPTY_HEADERS, Message
from proxy.replay import PAGE, Progress, Replayer, Summary, Target
from proxy.sinks import Publish

QUEUE_PREFETCH = 1000
QUEUE_IDLE_S = 1.0  # no delivery for this long: the queue holds nothing more for us


@dataclass(slots=True)
class _Received:
    tag: int
    message: Message
    defect: str | None


async def replay_queue(
    config: Config,
    queue: str,
    *,
    target: Target,
    selection: Filter,
    limit: int | None,
    dry_run: bool,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> Summary:
    summary = Summary(f"queue {queue!r}", dry_run)
    progress = Progress(err, summary)
    replayer = Replayer(config, target, progress)
    settings = config.amqp
    received: asyncio.Queue[_Received] = asyncio.Queue()

    def on_message(values: dict[str, Any], tag: int, defect: str | None) -> None:
        values["queue"] = queue
        if values["headers"] is None:
            values["headers"] = EMPTY_HEADERS
        received.put_nowait(_Received(tag, Message.of(values), defect))

    connection = await open_first(settings, connection_name="message-proxy replay")
    try:
        async with asyncio.timeout(settings.connect_timeout):
            declared = await connection.declare_queue(queue, None, passive=True, side=True)
            summary.total = declared.message_count or 0
            await connection.qos(QUEUE_PREFETCH)
            if summary.total:
                await connection.consume(queue, on_message)
        held = 0  # delivered and not acked: given back to the queue at the end
        while summary.scanned < (summary.total or 0):
            if limit is not None and summary.replayed + summary.kept >= limit:
                break
            if held >= QUEUE_PREFETCH:
                progress.note(
                    f"replay: stopped: {held} messages held that are not replayed fill the "
                    f"prefetch ({QUEUE_PREFETCH}); narrow the filters or replay those first"
                )
                break
            page = await _next_deliveries(received, PAGE)
            if not page:
                break  # the queue gave nothing more: another consumer took the rest
            room = None if limit is None else limit - summary.replayed - summary.kept
            held += await _queue_page(connection, page, replayer, selection, room, out)
            progress.show()
    finally:
        progress.show(last=True)
        await replayer.aclose()
        await connection.close(5.0)  # what is not acked goes back to the queue
    return summary


async def _next_deliveries(received: asyncio.Queue[_Received], count: int) -> list[_Received]:
    try:
        first = await asyncio.wait_for(received.get(), QUEUE_IDLE_S)
    except TimeoutError:
        return []
    page = [first]
    while len(page) < count and not received.empty():
        page.append(received.get_nowait())
    return page


async def _queue_page(
    connection: AmqpConnection,
    page: Sequence[_Received],
    replayer: Replayer,
    selection: Filter,
    room: int | None,
    out: TextIO,
) -> int:
    """Replay one page; returns how many of its deliveries stay held (not acked)."""
    summary = replayer.summary
    chosen: list[tuple[_Received, DeadLetter, Publish]] = []
    held = 0
    taken = 0  # towards the limit
    for delivery in page:
        held += 1  # until acked below
        if room is not None and taken >= room:
            continue  # past the limit: given back at the end, unread
        summary.scanned += 1
        where = _where(delivery)
        if delivery.defect is not None:
            taken += 1
            replayer.kept(where, delivery.defect)
            continue
        letter = from_queue_message(delivery.message)
        if not selection.matches(letter):
            summary.filtered += 1
            continue
        taken += 1
        planned = replayer.plan(letter)
        if isinstance(planned, str):
            replayer.kept(where, planned)
            continue
        refusal = await replayer.refusal(planned)
        if refusal is not None:
            replayer.kept(where, refusal)
            continue
        chosen.append((delivery, letter, planned))
    if summary.dry_run:
        for delivery, letter, item in chosen:
            print(f"would replay {replayer.describe(_where(delivery), letter, item)}", file=out)
        summary.replayed += len(chosen)
        return held
    outcomes = await replayer.publish([item for _, _, item in chosen])
    for (delivery, _, _), outcome in zip(chosen, outcomes, strict=True):
        if isinstance(outcome, PermanentError):
            replayer.kept(_where(delivery), f"{outcome.reason}: {outcome.detail}")
        else:
            connection.ack(delivery.tag)
            summary.replayed += 1
            held -= 1
    return held


def _where(delivery: _Received) -> str:
    return f"#{delivery.tag} (message id {delivery.message.message_id or '-'})"
