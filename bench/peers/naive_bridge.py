"""The naive bridge, as tutorials write it: per message, one XADD, then the ack.

``async for message in queue.iterator()`` with ``async with message.process()``: the ack follows
the XADD, so it is at-least-once, but every message pays a Redis round trip and an ack frame.
"""

from __future__ import annotations

import asyncio
import signal

import aio_pika
import orjson
import redis.asyncio as aioredis

from bench.peers._common import AMQP_URL, REDIS_URL, arguments, run


async def main(queue_name: str, stream: str, prefetch: int) -> None:
    connection = await aio_pika.connect_robust(AMQP_URL)
    redis = aioredis.Redis.from_url(REDIS_URL)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, durable=True)

        async def consume() -> None:
            async with queue.iterator() as messages:
                async for message in messages:
                    async with message.process():
                        fields = {
                            "body": message.body,
                            "routing_key": message.routing_key or "",
                            "message_id": message.message_id or "",
                            "headers": orjson.dumps(message.headers),
                        }
                        await redis.xadd(stream, fields)  # type: ignore[arg-type]

        consumer = asyncio.create_task(consume())
        await stop.wait()
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    await redis.aclose()


if __name__ == "__main__":
    args = arguments(__doc__ or "")
    run(main(args.queue, args.stream, args.prefetch), uvloop=not args.no_uvloop)
