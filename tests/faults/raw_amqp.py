"""Publish what aio-pika will not: no ``message_id`` at all (aiormq fills in a random one), or a
timestamp property with any 64-bit value (a publisher sending micro- or nanoseconds)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pamqp import body as amqp_body
from pamqp import commands, exceptions, frame, header


class RawTimestamp(datetime):
    """A timestamp pamqp encodes as exactly ``raw``: it packs ``int(value.timestamp())``."""

    raw = 0

    @classmethod
    def of(cls, raw: int) -> RawTimestamp:
        value = cls(2000, 1, 1, tzinfo=UTC)
        value.raw = raw
        return value

    def timestamp(self) -> float:
        return float(self.raw)


async def publish_raw(
    queue: str,
    bodies: Sequence[bytes],
    *,
    host: str = "127.0.0.1",
    port: int = 5672,
    **properties: Any,
) -> None:
    """Publish with confirms to the default exchange, properties exactly as given."""
    reader, writer = await asyncio.open_connection(host, port)
    buffer = b""

    async def receive(kind: type[Any]) -> Any:
        nonlocal buffer
        while True:
            try:
                used, _channel, value = frame.unmarshal(buffer)
            except exceptions.UnmarshalingException:
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError("RabbitMQ closed the connection") from None
                buffer += chunk
                continue
            buffer = buffer[used:]
            if isinstance(value, kind):
                return value

    def send(value: Any, channel: int = 0) -> None:
        writer.write(frame.marshal(value, channel))

    send(header.ProtocolHeader())
    await receive(commands.Connection.Start)
    send(commands.Connection.StartOk(response="\0guest\0guest"))
    tune = await receive(commands.Connection.Tune)
    send(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
    send(commands.Connection.Open("/"))
    await receive(commands.Connection.OpenOk)
    send(commands.Channel.Open(), 1)
    await receive(commands.Channel.OpenOk)
    send(commands.Confirm.Select(), 1)
    await receive(commands.Confirm.SelectOk)
    props = commands.Basic.Properties(delivery_mode=2, **properties)
    for data in bodies:
        send(commands.Basic.Publish(exchange="", routing_key=queue), 1)
        send(header.ContentHeader(0, len(data), props), 1)
        send(amqp_body.ContentBody(data), 1)
    acked = 0
    while acked < len(bodies):
        acked = (await receive(commands.Basic.Ack)).delivery_tag
    send(commands.Connection.Close(200, "done", 0, 0))
    await receive(commands.Connection.CloseOk)
    writer.close()
    await writer.wait_closed()
