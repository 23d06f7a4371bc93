"""A fault proxy in front of Redis, for tests of what happens when Redis will not take a
write: while `refuse_writes_to` names a key fragment, each command that writes a key
holding it is renamed on its way, so that Redis itself answers it with an error, in order
with every other answer (pipelines and pub/sub pass untouched). `cut()` drops every
connection and refuses new ones until `restore()`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

_WRITES = frozenset({b"SET", b"SETEX", b"PSETEX", b"SETNX", b"GETSET", b"PUBLISH"})
_FAULT = b"CLOUDBOT.INJECTED.FAULT"


def _take_command(buf: bytearray) -> list[bytes] | bytes | None:
    """One command off the front of `buf`: its arguments (RESP array), the raw line
    (inline command), or None if it is not all there yet."""
    if not buf:
        return None
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    if buf[:1] != b"*":
        raw = bytes(buf[: end + 2])
        del buf[: end + 2]
        return raw
    count, pos, args = int(buf[1:end]), end + 2, []
    for _ in range(count):
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        length = int(buf[pos + 1 : line_end])
        start = line_end + 2
        if len(buf) < start + length + 2:
            return None
        args.append(bytes(buf[start : start + length]))
        pos = start + length + 2
    del buf[:pos]
    return args


def _encode(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class RedisFaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self._upstream = (upstream_host, upstream_port)
        self.refuse_writes_to: bytes | None = None
        self.refused = 0  # writes refused so far
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self._thread.start()
        self._call(self._listen())

    def close(self) -> None:
        self._call(self._shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def cut(self) -> None:
        self._call(self._shut())

    def restore(self) -> None:
        self._call(self._listen())

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if server is not None:
            await server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, server_w))
        try:
            await asyncio.gather(self._commands(client_r, server_w), self._pipe(server_r, client_w))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_w, server_w):
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.transport.abort()

    async def _commands(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        while data := await reader.read(65536):
            buf += data
            out = bytearray()
            while (command := _take_command(buf)) is not None:
                if isinstance(command, bytes):
                    out += command
                    continue
                fragment = self.refuse_writes_to
                if (
                    fragment is not None
                    and command[0].upper() in _WRITES
                    and any(fragment in arg for arg in command[1:])
                ):
                    command = [_FAULT, *command[1:]]
                    self.refused += 1
                out += _encode(command)
            writer.write(out)
            await writer.drain()
        writer.transport.abort()


@contextlib.contextmanager
def redis_fault_proxy(upstream_port: int) -> Iterator[RedisFaultProxy]:
    proxy = RedisFaultProxy(upstream_port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
