"""The stricter ceiling: aiormq alone (no aio-pika on top), uvloop, batched ``multiple`` acks.

The fastest way stock Python clients consume: aiormq's channel directly, a callback that only
counts, and one ``basic.ack(multiple=True, wait=False)`` every ``--ack-every`` deliveries (and
whatever is left every 5 ms), so no drain is awaited per ack. Like the aio-pika ceiling it
forwards nothing; it adds the number it acked to the Redis key ``--stream`` after each ack so
that the benchmark sees when the last ack went out.
"""

from __future__ import annotations

import asyncio
import signal

import aiormq
import redis.asyncio as aioredis
from aiormq.abc import DeliveredMessage

from bench.peers._common import AMQP_URL, REDIS_URL, arguments, run

TAIL_INTERVAL_S = 0.005


async def main(queue: str, counter: str, prefetch: int, ack_every: int) -> None:
    connection = await aiormq.connect(AMQP_URL)
    redis = aioredis.Redis.from_url(REDIS_URL)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=prefetch)
    await channel.queue_declare(queue, durable=True)
    pending = [0, 0]  # [unacked count, highest delivery tag]

    async def ack_all() -> None:
        count, last = pending
        pending[0] = 0
        await channel.basic_ack(last, multiple=True, wait=False)
        await redis.incrby(counter, count)

    async def on_message(message: DeliveredMessage) -> None:
        pending[0] += 1
        pending[1] = max(pending[1], message.delivery_tag or 0)
        if pending[0] >= ack_every:
            await ack_all()

    async def ack_tail() -> None:
        while True:
            await asyncio.sleep(TAIL_INTERVAL_S)
            if pending[0]:
                await ack_all()

    tail = asyncio.create_task(ack_tail())
    await channel.basic_consume(queue, on_message)
    await stop.wait()
    tail.cancel()
    await asyncio.gather(tail, return_exceptions=True)
    if pending[0]:
        await ack_all()
    await connection.close()
    await redis.aclose()


if __name__ == "__main__":
    args = arguments(__doc__ or "")
    run(main(args.queue, args.stream, args.prefetch, args.ack_every), uvloop=not args.no_uvloop)
