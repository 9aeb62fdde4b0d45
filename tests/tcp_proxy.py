"""A small TCP fault proxy between a worker and a broker, for outage tests.

Runs on its own thread with its own event loop so a test (sync or async) can drive it:
``cut()`` closes every connection and refuses new ones, ``blackhole()`` accepts and forwards
nothing,
``latency(s)`` delays every chunk, ``throttle(bytes_per_s)`` caps the rate, ``heal()`` restores.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = 0
        self.mode = "pass"  # pass | cut | blackhole
        self.delay_s = 0.0
        self.rate_bps = 0.0
        self.connections_total = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="tcp-proxy"
        )
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # --- lifecycle ---

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url_port(self) -> int:
        return self.port

    # --- faults ---

    def cut(self) -> None:
        """Close every connection now and refuse new ones until ``heal``."""
        self.mode = "cut"
        self._call(self._close_all())

    def blackhole(self) -> None:
        """Keep connections open (and accept new ones) but forward nothing either way."""
        self.mode = "blackhole"

    def latency(self, seconds: float) -> None:
        self.delay_s = seconds

    def throttle(self, bytes_per_second: float) -> None:
        self.rate_bps = bytes_per_second

    def reset_connections(self) -> None:
        """Drop every open connection but keep accepting: a broker restart, seen from the client."""
        self._call(self._close_all())

    def heal(self) -> None:
        self.mode = "pass"
        self.delay_s = 0.0
        self.rate_bps = 0.0

    @contextlib.contextmanager
    def fault(self, kind: str) -> Iterator[None]:
        getattr(self, kind)()
        try:
            yield
        finally:
            self.heal()

    # --- internals ---

    def _call(self, coro: object) -> object:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return future.result(timeout=10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._close_all()
        # Connection handlers still pending would be destroyed with the loop, with a warning each.
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _close_all(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # stop() cancels handlers: they must end quietly, or asyncio logs each as an error.
        with contextlib.suppress(asyncio.CancelledError):
            await self._forward(reader, writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.transport.abort()
            return
        self.connections_total += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                with contextlib.suppress(Exception):
                    w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                while self.mode == "blackhole":  # noqa: ASYNC110 - mode is set from another thread
                    await asyncio.sleep(0.05)
                if self.mode == "cut":
                    break
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if self.rate_bps:
                    await asyncio.sleep(len(chunk) / self.rate_bps)
                writer.write(chunk)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.transport.abort()
