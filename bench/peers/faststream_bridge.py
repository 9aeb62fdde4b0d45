"""The FastStream bridge, as FastStream's documentation writes one (FastStream 0.7 API).

One application over two brokers: a RabbitMQ subscriber whose return value a Redis publisher
writes to a stream. FastStream acks after the handler (and so after the XADD) returns:
at-least-once, one message at a time. The channel gets the same prefetch as message-proxy.
"""

from __future__ import annotations

from typing import Any

from faststream import FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.redis import RedisBroker

from bench.peers._common import AMQP_URL, REDIS_URL, arguments, run


def build_app(queue: str, stream: str, prefetch: int) -> FastStream:
    rabbit = RabbitBroker(AMQP_URL, default_channel=Channel(prefetch_count=prefetch))
    redis = RedisBroker(REDIS_URL)

    @rabbit.subscriber(RabbitQueue(queue, durable=True))
    @redis.publisher(stream=stream)
    async def bridge(order: dict[str, Any]) -> dict[str, Any]:
        return order

    return FastStream(rabbit, redis)


async def main(queue: str, stream: str, prefetch: int) -> None:
    app = build_app(queue, stream, prefetch)
    await app.run()


if __name__ == "__main__":
    args = arguments(__doc__ or "")
    run(main(args.queue, args.stream, args.prefetch), uvloop=not args.no_uvloop)
