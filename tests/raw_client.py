"""A few AMQP commands over a bare socket, content headers as raw bytes both ways: what a test
needs to publish a header table no client library would write, and to see the exact bytes
RabbitMQ delivers. Independent of ``proxy.amqp`` (pamqp for the method frames only)."""

from __future__ import annotations

import asyncio
import struct
from types import TracebackType
from typing import Any

from pamqp import commands, frame
from pamqp.base import Frame
from pamqp.body import ContentBody

_HEAD = struct.Struct(">BHI")


class RawClient:
    """One connection, channel 1 in confirm mode."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5672) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tag = 0

    async def __aenter__(self) -> RawClient:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._writer.write(b"AMQP\x00\x00\x09\x01")
        await self._method(commands.Connection.Start)
        self._send(commands.Connection.StartOk(response="\0guest\0guest"), 0)
        tune = await self._method(commands.Connection.Tune)
        self._send(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), 0)
        self._send(commands.Connection.Open("/"), 0)
        await self._method(commands.Connection.OpenOk)
        self._send(commands.Channel.Open(), 1)
        await self._method(commands.Channel.OpenOk)
        self._send(commands.Confirm.Select(), 1)
        await self._method(commands.Confirm.SelectOk)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._writer is not None:
            self._writer.close()

    async def publish(self, exchange: str, routing_key: str, header: bytes, body: bytes) -> None:
        """Publish with ``header`` as the content header payload, byte for byte; confirmed."""
        self._send(commands.Basic.Publish(exchange=exchange, routing_key=routing_key), 1)
        self._write_frame(2, header)
        self._send(ContentBody(body), 1)
        self._tag += 1
        while True:
            ack = await self._method(commands.Basic.Ack, commands.Basic.Nack)
            if not isinstance(ack, commands.Basic.Ack):
                raise AssertionError(f"the broker nacked the publish: {ack}")
            if ack.delivery_tag >= self._tag:
                return

    async def get(self, queue: str) -> tuple[str, bytes, bytes] | None:
        """``basic.get`` with auto-ack: routing key, content header payload, body; None if empty."""
        self._send(commands.Basic.Get(queue=queue, no_ack=True), 1)
        got = await self._method(commands.Basic.GetOk, commands.Basic.GetEmpty)
        if isinstance(got, commands.Basic.GetEmpty):
            return None
        kind, header = await self._frame()
        assert kind == 2
        (size,) = struct.unpack_from(">Q", header, 4)
        body = b""
        while len(body) < size:
            kind, payload = await self._frame()
            assert kind == 3
            body += payload
        return got.routing_key or "", header, body

    def _send(self, method: Any, channel: int) -> None:
        assert self._writer is not None
        self._writer.write(frame.marshal(method, channel))

    def _write_frame(self, kind: int, payload: bytes) -> None:
        assert self._writer is not None
        self._writer.write(_HEAD.pack(kind, 1, len(payload)) + payload + b"\xce")

    async def _frame(self) -> tuple[int, bytes]:
        assert self._reader is not None
        while True:
            kind, _channel, size = _HEAD.unpack(await self._reader.readexactly(7))
            payload = await self._reader.readexactly(size + 1)
            if kind != 8:  # heartbeats are off, but skip one all the same
                return kind, payload[:-1]

    async def _method(self, *kinds: type[Frame]) -> Any:
        while True:
            kind, payload = await self._frame()
            if kind != 1:
                continue
            _used, _channel, method = frame.unmarshal(
                _HEAD.pack(kind, 1, len(payload)) + payload + b"\xce"
            )
            if isinstance(method, commands.Connection.Close | commands.Channel.Close):
                raise AssertionError(f"the broker closed: {method.reply_code} {method.reply_text}")
            if isinstance(method, kinds):
                return method
