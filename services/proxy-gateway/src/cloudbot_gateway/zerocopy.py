"""The desktop's bytes to the client without copying them: Linux splice(2).

Relaying by `recv` and `send` costs two copies of every byte in the kernel (out of the
VNC server's socket, into the client's), and those copies were nearly all the gateway's
CPU (README, Performance). `splice` moves the socket's pages into a pipe and from the
pipe into the other socket by reference instead. The WebSocket framing is what makes this
work a little harder: each chunk is preceded by a frame header giving its exact length,
so a chunk is first spliced into a pipe (which tells its length), then its header is sent,
then the pipe is spliced out to the client.

One `SpliceSender` owns, while the relay runs, everything written to its client: frame
headers, spliced payloads, and websockets' own control frames (pings, pongs, the close
frame), which `GatewayConnection.send_data` hands over instead of writing to the transport.
All of it goes through one queue, in order, so a control frame never lands inside a
partly written data frame. The sender writes to a duplicate of the client's socket
descriptor, because the event loop does not let a descriptor its transport owns be
watched separately; the transport itself writes nothing while the sender is attached.

Flow control is the same as the copying relay's: the VNC server's socket is read (one
chunk) only when everything before it has reached the client's socket; while the client
lags, the VNC server is not read. A session holds at most one chunk in a pipe. Pipes are
taken from a small process-wide pool and given back as soon as their chunk is out, so
while clients keep up, a handful of pipes serve every session, and an idle session holds
none.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import select
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable

from cloudbot_gateway.relay import Meter

# A pipe holds one page reference per slot: the default 16 slots often hold much less
# than a chunk of socket pages. 1 MiB (256 slots) is the most an unprivileged process may
# ask for (fs.pipe-max-size).
PIPE_SIZE = 1 << 20
# At most this much is spliced from the VNC server at once, and sent as one frame: what
# one pipe holds. Per-splice costs (the TCP acknowledgement a read sends, pushing out
# what a write queued) are per chunk, so the larger the chunk the lower the CPU per GB:
# 1 MiB took 0.26 s per GB with 200 streams where 256 KiB took 0.65 (README, Performance).
SPLICE_SIZE = PIPE_SIZE
# Empty pipes kept for reuse; more are made when that many chunks are in flight at once.
POOL_SIZE = 16

_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # Refused past the per-user pipe quota (pipe-user-pages-soft): a small pipe still works.
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


class PipePool:
    """Empty pipes for chunks in flight. Only empty pipes come back here."""

    def __init__(self, keep: int = POOL_SIZE) -> None:
        self._keep = keep
        self._free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        return self._free.pop() if self._free else _pipe()

    def give_back(self, pipe: tuple[int, int]) -> None:
        if len(self._free) < self._keep:
            self._free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        os.close(pipe[0])
        os.close(pipe[1])


_pool = PipePool()


def supported() -> bool:
    """Whether splice works from and to TCP sockets here (not every kernel or sandbox
    allows it). Tried once at start-up on a loopback connection."""
    if not hasattr(os, "splice"):
        return False
    try:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
            a = stack.enter_context(socket.create_connection(server.getsockname()[:2]))
            b = stack.enter_context(server.accept()[0])
            pipe = _pipe()
            stack.callback(PipePool.discard, pipe)
            a.sendall(b"probe")
            if not select.select([b], [], [], 2)[0]:
                return False
            moved = os.splice(b.fileno(), pipe[1], 5)
            back = os.splice(pipe[0], a.fileno(), moved)
            return moved == back == 5 and b.recv(5) == b"probe"
    except OSError:
        return False


# A chunk waiting at most this much is relayed as soon as it is seen; bigger ones wait
# their turn in the bulk queue (a keystroke's echo, a cursor, a small redraw are small).
INTERACTIVE_BYTES = 8 * 1024
# A chunk at least this big is not watched while it waits in the bulk queue.
UNWATCH_BYTES = 128 * 1024
# The bulk queue runs in slices of about this long, and the event loop polls in between.
SLICE_SECONDS = 0.0001
_waiting_bytes = array.array("i", [0])  # FIONREAD's answer


class _BulkQueue:
    """Chunks too big to be interactive, relayed in short slices, oldest first.

    Each readable VNC server's socket used to be relayed in the event-loop pass that saw
    it, so a small message waited behind every chunk that pass moved: with 200 busy
    desktops, passes of several milliseconds (README, Performance). A socket holding more
    than INTERACTIVE_BYTES joins this queue instead, which is worked through in slices
    of SLICE_SECONDS with a poll for new events between them, so a small message is
    relayed within about a slice of its arrival whatever the load.
    """

    def __init__(self) -> None:
        self._waiting: deque[SpliceSender] = deque()
        self._scheduled = False

    def add(self, sender: SpliceSender) -> None:
        self._waiting.append(sender)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        deadline = time.perf_counter() + SLICE_SECONDS
        waiting = self._waiting
        try:
            while waiting:
                waiting.popleft().relay_bulk()
                if time.perf_counter() >= deadline:
                    break
        finally:  # (an error in one session must not stall the others)
            if waiting:  # after the loop has polled again
                asyncio.get_running_loop().call_soon(self._run)
            else:
                self._scheduled = False


_bulk = _BulkQueue()


class SpliceSender:
    """Writes one VNC client's side of the relay: frames spliced from the VNC server,
    and any other frame the connection sends, in order."""

    def __init__(
        self,
        client: asyncio.Transport,
        upstream_fd: int,
        meter: Meter,
        *,
        upstream_ended: Callable[[Exception | None], None],
        client_failed: Callable[[], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = client
        # A duplicate: the transport keeps its own descriptor and closes it on its own
        # schedule; a closed number could be reused by another connection at once.
        self._client = socket.socket(fileno=os.dup(client.get_extra_info("socket").fileno()))
        self._upstream: int | None = upstream_fd  # owned by the caller
        self._meter = meter
        self._upstream_ended = upstream_ended
        self._client_failed = client_failed
        # bytes to send, or the count of bytes still in self._pipe
        self._queue: deque[bytes | int] = deque()
        self._pipe: tuple[int, int] | None = None
        self._started = False
        self._in_bulk = False  # in the bulk queue
        self._reading = False
        self._waiting = False  # for the client's socket to take more
        self._eof = False
        self.closed = False

    # --- the VNC server side -----------------------------------------------------------

    def start(self) -> None:
        if self.closed:
            return
        if self._transport.get_write_buffer_size():
            # The handshake's response is not all out yet (the rarest case): the transport
            # writes it, and nothing may go ahead of it.
            self._loop.call_later(0.01, self.start)
            return
        self._started = True
        self._flush()

    def stop_reading(self) -> None:
        """The relay is over: let go of the VNC server's socket. Queued frames still go."""
        self._set_reading(False)
        self._upstream = None

    def _on_upstream_readable(self) -> None:
        if self._in_bulk:
            return  # waiting its turn, and still watched (see below)
        assert self._upstream is not None
        try:
            fcntl.ioctl(self._upstream, termios.FIONREAD, _waiting_bytes, True)
        except OSError:
            _waiting_bytes[0] = 0  # the splice will meet the error
        waiting = _waiting_bytes[0]
        if waiting <= INTERACTIVE_BYTES:
            self._relay()
            return
        self._in_bulk = True
        # While it waits, the socket is reported ready on every poll. For a big chunk,
        # stop watching it (watching again after costs little beside the chunk); for a
        # small one that costs more than the reports.
        if waiting >= UNWATCH_BYTES:
            self._set_reading(False)
        _bulk.add(self)

    def relay_bulk(self) -> None:
        """The bulk queue's turn: relay a chunk, unless the relay stopped meanwhile or
        the client is behind (reading resumes when it has caught up)."""
        self._in_bulk = False
        if self._upstream is not None and not self._queue and not self.closed:
            self._relay()

    def _relay(self) -> None:
        assert self._upstream is not None
        assert self._pipe is None
        pipe = _pool.take()
        try:
            n = os.splice(self._upstream, pipe[1], SPLICE_SIZE, flags=_FLAGS)
        except BlockingIOError:
            _pool.give_back(pipe)
            self._set_reading(True)
            return
        except OSError as exc:
            _pool.give_back(pipe)
            self._end_upstream(exc)
            return
        if n == 0:
            _pool.give_back(pipe)
            self._end_upstream(None)
            return
        self._pipe = pipe
        self._meter.bytes_down += n
        self._queue.append(frame_header(n))
        self._queue.append(n)
        self._flush()

    def _end_upstream(self, exc: Exception | None) -> None:
        self.stop_reading()
        self._upstream_ended(exc)

    def _set_reading(self, on: bool) -> None:
        if on is self._reading or self._upstream is None:
            return
        self._reading = on
        if on:
            self._loop.add_reader(self._upstream, self._on_upstream_readable)
        else:
            self._loop.remove_reader(self._upstream)

    # --- the client side ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue whole frames (the connection's own: pings, pongs, close)."""
        if not self.closed:
            self._queue.append(data)
            self._flush()

    def send_eof(self) -> None:
        """Half-close the client's socket once everything queued is out."""
        self._eof = True
        self._flush()

    def _flush(self) -> None:
        if self.closed or not self._started:
            return
        queue, client = self._queue, self._client
        try:
            while queue:
                piece = queue[0]
                if type(piece) is int:
                    assert self._pipe is not None
                    sent = os.splice(self._pipe[0], client.fileno(), piece, flags=_FLAGS)
                    if not sent:  # the pipe holds less than we put in it: never seen
                        raise OSError("pipe drained early")
                    if sent < piece:
                        queue[0] = piece - sent
                        break
                    queue.popleft()
                    _pool.give_back(self._pipe)
                    self._pipe = None
                else:
                    assert isinstance(piece, bytes)
                    # A header is followed by its payload: no packet for the header alone.
                    more = socket.MSG_MORE if len(queue) > 1 else 0
                    sent = client.send(piece, more)
                    if sent < len(piece):
                        queue[0] = piece[sent:]
                        break
                    queue.popleft()
        except BlockingIOError:
            pass
        except OSError:
            # The client is gone (reset, broken pipe): end the whole connection.
            self.close()
            self._client_failed()
            return
        if queue:
            self._set_reading(False)
            self._wait_writable(True)
            return
        self._wait_writable(False)
        if self._eof:
            self._eof = False
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)
        self._set_reading(True)  # everything before is out: read the next chunk

    def _wait_writable(self, on: bool) -> None:
        if on is self._waiting or self.closed:
            return
        self._waiting = on
        if on:
            self._loop.add_writer(self._client.fileno(), self._flush)
        else:
            self._loop.remove_writer(self._client.fileno())

    def close(self) -> None:
        """The client connection is gone: drop whatever is still queued."""
        if self.closed:
            return
        self.stop_reading()
        self._wait_writable(False)
        self.closed = True
        self._queue.clear()
        if self._pipe is not None:
            PipePool.discard(self._pipe)  # not empty
            self._pipe = None
        self._client.close()


_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")
_FIN_BINARY = 0x82


def frame_header(n: int) -> bytes:
    """Header of an unmasked (server to client) final binary frame of `n` bytes."""
    if n < 126:
        return _SHORT.pack(_FIN_BINARY, n)
    if n < 65536:
        return _MEDIUM.pack(_FIN_BINARY, 126, n)
    return _LONG.pack(_FIN_BINARY, 127, n)
