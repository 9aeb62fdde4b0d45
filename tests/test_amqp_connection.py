"""The source's own AMQP client against the real RabbitMQ (and, for outages, a TCP fault proxy)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from pamqp import commands as spec
from pamqp import exceptions as pamqp_exceptions
from pamqp import frame
from pamqp.header import ContentHeader

from proxy.amqp import frames
from proxy.amqp.connection import AmqpConnection
from proxy.amqp.endpoint import Endpoint
from proxy.errors import AmqpError
from tests.helpers import (
    AMQP_URL,
    amqp_url_via,
    async_wait_for,
    declare_topology,
    delete_queues,
    publish,
    queue_depth,
    unique,
)
from tests.tcp_proxy import TcpProxy


class Received:
    def __init__(self) -> None:
        self.items: list[tuple[dict[str, Any], int, str | None]] = []

    def __call__(self, values: dict[str, Any], tag: int, defect: str | None) -> None:
        self.items.append((values, tag, defect))


@pytest.fixture
async def queue() -> AsyncIterator[str]:
    name = unique("client")
    await declare_topology(name)
    yield name
    await delete_queues(name)


async def open_connection(url: str = AMQP_URL, heartbeat: int = 10) -> AmqpConnection:
    endpoint = Endpoint.from_url(url, heartbeat=heartbeat)
    async with asyncio.timeout(10):
        return await AmqpConnection.open(endpoint, connection_name="test")


async def test_a_backlog_is_delivered_whole_and_a_multiple_ack_empties_the_queue(
    queue: str,
) -> None:
    # Some deliveries arrive in the same read as consume-ok; bodies span 0, 1 and 3 frames.
    bodies = [b"", b"x" * 300_000, *(f"m-{i}".encode() for i in range(2000))]
    await publish([aio_pika.Message(body, message_id=str(i)) for i, body in enumerate(bodies)],
                  routing_key=queue)  # fmt: skip
    connection = await open_connection()
    try:
        await connection.qos(5000)
        received = Received()
        await connection.consume(queue, received)
        await async_wait_for(lambda: len(received.items) == len(bodies), within=20)
        assert [values["body"] for values, _, _ in received.items] == bodies
        assert [values["message_id"] for values, _, _ in received.items] == [
            str(i) for i in range(len(bodies))
        ]
        assert all(defect is None for _, _, defect in received.items)
        assert received.items[0][0]["routing_key"] == queue
        connection.ack(received.items[-1][1], multiple=True)
        await async_wait_for(_depth_is(queue, 0), within=10)
    finally:
        await connection.close()
    assert connection.is_closed


async def test_closing_without_acks_gives_every_delivery_back(queue: str) -> None:
    await publish([aio_pika.Message(b"x") for _ in range(50)], routing_key=queue)
    connection = await open_connection()
    received = Received()
    await connection.consume(queue, received)
    await async_wait_for(lambda: len(received.items) == 50, within=10)
    connection.reject(received.items[0][1], requeue=False)  # one dropped for good
    await connection.close()
    await async_wait_for(_depth_is(queue, 49), within=10)


async def test_a_deleted_queue_cancels_the_consumer_and_the_tag_goes(queue: str) -> None:
    connection = await open_connection()
    try:
        tag = await connection.consume(queue, Received())
        assert connection.consumer_tags == {tag}
        await delete_queues(queue)
        await async_wait_for(lambda: not connection.consumer_tags, within=5)
        assert not connection.is_closed  # the connection itself is fine
    finally:
        await connection.close()


async def test_a_refusal_on_the_side_channel_leaves_the_consuming_channel_alone(
    queue: str,
) -> None:
    await publish([aio_pika.Message(b"held")], routing_key=queue)
    connection = await open_connection()
    try:
        received = Received()
        await connection.consume(queue, received)
        await async_wait_for(lambda: len(received.items) == 1, within=5)
        for _ in range(2):  # the side channel is opened again after each refusal
            with pytest.raises(AmqpError, match="404 NOT_FOUND"):
                await connection.declare_queue(unique("missing"), None, passive=True, side=True)
        await connection.declare_queue(queue, None, passive=True, side=True)
        assert not connection.is_closed
        connection.ack(received.items[0][1])  # the delivery held meanwhile is still ours
    finally:
        await connection.close()
    assert await queue_depth(queue) == 0  # acked: not given back by the close


async def test_a_channel_error_closes_the_connection_with_the_brokers_reason() -> None:
    connection = await open_connection()
    with pytest.raises(AmqpError, match="404"):
        await connection.consume(unique("missing"), Received())
    await async_wait_for(lambda: connection.is_closed, within=5)
    assert "NOT_FOUND" in str(connection.closed.result())
    await connection.close()  # the socket, once the broker's close-ok is in


class Recording:
    """What crossed a TCP relay between the client and RabbitMQ, in order: (side, bytes, time);
    an empty ``bytes`` is that side closing its socket."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes, float]] = []

    def frames(self, side: str) -> list[tuple[Any, float]]:
        """Every frame ``side`` sent, with the time the relay saw its last byte."""
        data, found = b"", []
        for who, chunk, at in self.events:
            if who != side:
                continue
            data += chunk
            if data.startswith(b"AMQP"):
                data = data[8:]
            while True:
                try:
                    used, _channel, value = frame.unmarshal(data)
                except pamqp_exceptions.UnmarshalingException:
                    break
                data = data[used:]
                found.append((value, at))
        return found

    def closed_at(self, side: str) -> float:
        return next(at for who, chunk, at in self.events if who == side and not chunk)


@asynccontextmanager
async def recording_relay() -> AsyncIterator[tuple[int, Recording]]:
    recording = Recording()

    async def pipe(side: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                recording.events.append((side, data, time.monotonic()))
                writer.write(data)
                await writer.drain()
        finally:
            recording.events.append((side, b"", time.monotonic()))
            writer.close()

    async def handle(client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        broker_reader, broker = await asyncio.open_connection("127.0.0.1", 5672)
        await asyncio.gather(
            pipe("client", client_reader, broker),
            pipe("broker", broker_reader, client),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], recording
    finally:
        server.close()


async def test_a_channel_error_ends_the_connection_with_connection_close_not_a_dropped_socket(
) -> None:  # fmt: skip
    async with recording_relay() as (port, recording):
        connection = await open_connection(amqp_url_via(port))
        with pytest.raises(AmqpError, match="404"):
            await connection.consume(unique("missing"), Received())
        await connection.close()  # returns once the socket is gone
        await async_wait_for(
            lambda: sum(1 for _, chunk, _ in recording.events if not chunk) == 2, within=5
        )
    sent = [value for value, _ in recording.frames("client")]
    assert [type(v) for v in sent[-2:]] == [spec.Channel.CloseOk, spec.Connection.Close], sent
    close_ok_at = [
        at for v, at in recording.frames("broker") if isinstance(v, spec.Connection.CloseOk)
    ]
    assert close_ok_at, recording.frames("broker")
    # The socket went after the broker's close-ok, at once: not when the wait ran out.
    client_closed = recording.closed_at("client")
    assert close_ok_at[0] <= client_closed < close_ok_at[0] + 0.5
    assert "404 NOT_FOUND" in str(connection.closed.result())


async def test_every_socket_has_tcp_keepalive_on() -> None:
    connection = await open_connection(heartbeat=7)
    try:
        sock = connection._transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
    finally:
        await connection.close()


async def test_a_wrong_password_is_refused_without_echoing_it() -> None:
    with pytest.raises(AmqpError) as refused:
        await open_connection("amqp://guest:not-the-password-42@127.0.0.1:5672/")
    assert "403" in str(refused.value) or "ACCESS_REFUSED" in str(refused.value)
    assert "not-the-password-42" not in str(refused.value)
    endpoint = Endpoint.from_url("amqp://guest:not-the-password-42@h/", heartbeat=1)
    assert "not-the-password-42" not in repr(endpoint)


async def test_a_silent_broker_is_given_up_after_missed_heartbeats(queue: str) -> None:
    with TcpProxy("127.0.0.1", 5672) as proxy:
        connection = await open_connection(amqp_url_via(proxy.port), heartbeat=1)
        await connection.consume(queue, Received())
        proxy.blackhole()
        started = time.monotonic()
        await async_wait_for(lambda: connection.is_closed, within=10, interval=0.05)
        took = time.monotonic() - started
        assert 2.0 <= took <= 5.0, took  # three silent 1 s intervals, checked every 0.5 s
        assert "no frame from the broker" in str(connection.closed.result())


async def test_a_cut_connection_is_seen_at_once() -> None:
    with TcpProxy("127.0.0.1", 5672) as proxy:
        connection = await open_connection(amqp_url_via(proxy.port))
        proxy.cut()
        await async_wait_for(lambda: connection.is_closed, within=5, interval=0.02)
        with pytest.raises(AmqpError):
            connection.ack(1)


class Written:
    """A transport that keeps what is written: for the frames no broker can be made to send."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def deliver_frames(consumer_tag: str, tag: int, header: bytes, body: bytes) -> bytes:
    method = frame.marshal(spec.Basic.Deliver(consumer_tag, tag, False, "", "q"), 1)
    header_frame = b"\x02\x00\x01" + len(header).to_bytes(4, "big") + header + b"\xce"
    body_frame = b"\x03\x00\x01" + len(body).to_bytes(4, "big") + body + b"\xce"
    return method + header_frame + body_frame


async def fed_connection() -> tuple[AmqpConnection, Written, Received]:
    connection = AmqpConnection(Endpoint.from_url(AMQP_URL, heartbeat=0), "test")
    written = Written()
    connection.connection_made(written)  # type: ignore[arg-type]
    received = Received()
    connection._consumers["ctag"] = received
    return connection, written, received


async def test_unreadable_properties_deliver_the_message_with_a_defect_not_a_dropped_connection(
) -> None:  # fmt: skip
    connection, _, received = await fed_connection()
    bad_header = (
        b"\x00\x3c\x00\x00" + (3).to_bytes(8, "big") + b"\x20\x00"  # headers flag
        + b"\x00\x00\x00\x08" + b"\x01kZ" + b"\x00" * 5  # field type Z: unknown
    )  # fmt: skip
    data = deliver_frames("ctag", 7, bad_header, b"abc")
    connection.data_received(data[:5])  # frames split across reads, too
    connection.data_received(data[5:])
    ((values, tag, defect),) = received.items
    assert (values["body"], tag) == (b"abc", 7)
    assert defect is not None and "cannot be read" in defect
    assert not connection.closed.done()  # the connection goes on


async def test_a_delivery_for_a_cancelled_consumer_is_given_back_not_left_unsettled() -> None:
    connection, written, received = await fed_connection()
    connection._channel_open = True
    good_header = b"\x00\x3c\x00\x00" + (1).to_bytes(8, "big") + b"\x00\x00"
    written.data = b""
    connection.data_received(deliver_frames("gone", 9, good_header, b"x"))
    assert received.items == []
    assert written.data == frames.reject_frame(1, 9, requeue=True)


def _header(properties: spec.Basic.Properties, body_size: int) -> bytes:
    return frame.marshal(ContentHeader(0, body_size, properties), 1)[7:-1]


def _stream_of_deliveries() -> bytes:
    """Four deliveries as RabbitMQ sends them: every property, an empty body, a body in three
    frames, and after a heartbeat a plain one."""
    every = spec.Basic.Properties(
        content_type="application/json", headers={"tenant": "acme", "n": 7}, delivery_mode=2,
        message_id="m-1", timestamp=datetime(2024, 5, 1, 12, 0, tzinfo=UTC), app_id="shop",
    )  # fmt: skip
    body = b'{"a": 1}'
    split = b"abcdefghij"
    split_body = b"".join(
        b"\x03\x00\x01" + len(part).to_bytes(4, "big") + part + b"\xce"
        for part in (split[:3], split[3:6], split[6:])
    )
    first_two = deliver_frames("ctag", 1, _header(every, len(body)), body)
    empty = frame.marshal(spec.Basic.Deliver("ctag", 2, True, "app", "k"), 1)
    empty += b"\x02\x00\x01" + (14).to_bytes(4, "big") + _header(spec.Basic.Properties(), 0)
    empty += b"\xce"
    in_parts = frame.marshal(spec.Basic.Deliver("ctag", 3, False, "", "q"), 1)
    header = _header(spec.Basic.Properties(message_id="m-3"), len(split))
    in_parts += b"\x02\x00\x01" + len(header).to_bytes(4, "big") + header + b"\xce"
    in_parts += split_body
    last = deliver_frames("ctag", 4, _header(spec.Basic.Properties(), 1), b"z")
    return first_two + empty + in_parts + frames.HEARTBEAT + last


async def test_deliveries_read_the_same_however_the_reads_cut_them() -> None:
    """Whole in one read (the one-pass path), cut at every byte in two, and byte by byte (the
    frame-by-frame path): the same messages, tags and properties."""
    data = _stream_of_deliveries()
    connection, _, whole = await fed_connection()
    connection.data_received(data)
    assert [tag for _, tag, _ in whole.items] == [1, 2, 3, 4]
    bodies = [values["body"] for values, _, _ in whole.items]
    assert bodies == [b'{"a": 1}', b"", b"abcdefghij", b"z"]
    assert whole.items[0][0]["headers"] == {"tenant": "acme", "n": 7}
    assert whole.items[1][0]["redelivered"] is True
    cuts = [[data[:at], data[at:]] for at in range(1, len(data))]
    cuts.append([data[at : at + 1] for at in range(len(data))])
    for reads in cuts:
        connection, _, received = await fed_connection()
        for read in reads:
            connection.data_received(read)
        assert received.items == whole.items
        assert not connection.closed.done()


def _depth_is(queue: str, depth: int) -> Any:
    async def check() -> bool:
        return await queue_depth(queue) == depth

    return check


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for localhost (openssl is on every machine these tests run on)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@asynccontextmanager
async def tls_in_front_of_rabbitmq(cert: str, key: str) -> AsyncIterator[int]:
    """A TLS listener forwarding to RabbitMQ's plain port: amqps without reconfiguring it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def handle(client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        broker_reader, broker = await asyncio.open_connection("127.0.0.1", 5672)
        await asyncio.gather(
            forward(client_reader, broker), forward(broker_reader, client), return_exceptions=True
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_amqps_verifies_the_broker_against_the_given_ca(
    queue: str, certificate: tuple[str, str]
) -> None:
    cert, key = certificate
    await publish([aio_pika.Message(b"over tls")], routing_key=queue)
    async with tls_in_front_of_rabbitmq(cert, key) as port:
        connection = await open_connection(f"amqps://guest:guest@localhost:{port}/?cafile={cert}")
        try:
            received = Received()
            await connection.consume(queue, received)
            await async_wait_for(lambda: len(received.items) == 1, within=5)
            assert received.items[0][0]["body"] == b"over tls"
        finally:
            await connection.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # not signed by a CA we trust
            await open_connection(f"amqps://guest:guest@localhost:{port}/")
        unverified = await open_connection(f"amqps://guest:guest@localhost:{port}/?no_verify_ssl=1")
        sock = unverified._transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        await unverified.close()
