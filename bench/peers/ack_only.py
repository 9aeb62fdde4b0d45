"""The ceiling: a plain aio-pika consumer that forwards nothing and only acks.

It acks with ``multiple=True`` every ``--ack-every`` deliveries (and whatever is left every 5 ms),
so it measures what the client library and the broker cost per message and nothing else. So that
the benchmark can see when the last ack went out (it has no other output), it adds the number it
acked to the Redis key ``--stream`` after each ack: one INCRBY per 500 messages.
"""

from __future__ import annotations

import asyncio
import signal

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage

from bench.peers._common import AMQP_URL, REDIS_URL, arguments, run

TAIL_INTERVAL_S = 0.005


async def main(queue_name: str, counter: str, prefetch: int, ack_every: int) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    redis = aioredis.Redis.from_url(REDIS_URL)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, durable=True)
        unacked: list[AbstractIncomingMessage] = []

        async def ack_all() -> None:
            last, count = unacked[-1], len(unacked)
            unacked.clear()
            await last.ack(multiple=True)
            await redis.incrby(counter, count)

        async def on_message(message: AbstractIncomingMessage) -> None:
            unacked.append(message)
            if len(unacked) >= ack_every:
                await ack_all()

        async def ack_tail() -> None:
            while True:
                await asyncio.sleep(TAIL_INTERVAL_S)
                if unacked:
                    await ack_all()

        tail = asyncio.create_task(ack_tail())
        await queue.consume(on_message)
        await stop.wait()
        tail.cancel()
        await asyncio.gather(tail, return_exceptions=True)
        if unacked:
            await ack_all()
    await redis.aclose()


if __name__ == "__main__":
    args = arguments(__doc__ or "")
    run(main(args.queue, args.stream, args.prefetch, args.ack_every), uvloop=not args.no_uvloop)
