"""A TCP fault proxy for tests, written with asyncio: put it between a service and Postgres,
Redis or the EC2 endpoint, then add latency, stall the bytes, cut every connection, or
refuse new ones (the peer looks dead until `restore`).

It runs its own event loop on a thread, so a test may block (or kill processes) while the
proxy keeps forwarding, and every control method is safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

_CHUNK = 65536


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `upstream_host`:`upstream_port`, faults included."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.latency = 0.0
        self.refusing = False
        self.accepted = 0
        # Makes, per connection, a rewriter of what the client sends upstream (it may keep
        # state across chunks, e.g. to parse a protocol); None: bytes pass as they are.
        self.upstream_filter: Callable[[], Callable[[bytes], bytes]] | None = None
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # --- life -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._open()).result(10)
        return self

    def close(self) -> None:
        self._call(self._close()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- faults -----------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk, each way, by `seconds`."""
        self.latency = seconds

    def stall(self) -> None:
        """Hold every byte, each way, on open and new connections, until `flow`."""
        self._loop.call_soon_threadsafe(self._event().clear)

    def flow(self) -> None:
        self._loop.call_soon_threadsafe(self._event().set)

    def cut(self) -> None:
        """Reset every open connection (the peer sees its socket die)."""
        self._call(self._abort_all()).result(10)

    def kill(self) -> None:
        """The upstream is dead: open connections reset, new ones refused until `restore`."""
        self.refusing = True
        self.cut()

    def restore(self) -> None:
        """Back to a faithful pipe: no latency, no stall, connections accepted."""
        self.latency = 0.0
        self.refusing = False
        self.flow()

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """Hold every byte both ways while the block runs, then let them flow again."""
        self.stall()
        try:
            yield
        finally:
            self.flow()

    # --- inside the loop ----------------------------------------------------------------

    def _call(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _event(self) -> asyncio.Event:
        assert self._flowing is not None, "start the proxy first"
        return self._flowing

    async def _open(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._abort_all()

    async def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._writers.update((writer, up_writer))
        rewrite = self.upstream_filter() if self.upstream_filter is not None else None
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer, rewrite)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rewrite: Callable[[bytes], bytes] | None = None,
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(_CHUNK):
                if rewrite is not None:
                    chunk = rewrite(chunk)
                await self._event().wait()
                if self.latency:
                    await asyncio.sleep(self.latency)
                writer.write(chunk)
                await writer.drain()
