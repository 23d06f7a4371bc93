"""Redis that will not take chosen writes, for tests of what happens then: put a
`FaultProxy` in front of Redis with `upstream_filter=RedisWriteFaults.filter`. While
`refuse_writes_to` names a key fragment, each command that writes a key holding it is
renamed on its way, so that Redis itself answers it with an error, in order with every
other answer (pipelines and pub/sub pass untouched)."""

from __future__ import annotations

from collections.abc import Callable

_WRITES = frozenset({b"SET", b"SETEX", b"PSETEX", b"SETNX", b"GETSET", b"PUBLISH"})
_FAULT = b"CLOUDBOT.INJECTED.FAULT"


def _take_command(buf: bytearray) -> list[bytes] | bytes | None:
    """One command off the front of `buf`: its arguments (RESP array), the raw line
    (inline command), or None if it is not all there yet."""
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


class RedisWriteFaults:
    def __init__(self) -> None:
        self.refuse_writes_to: bytes | None = None
        self.refused = 0  # writes refused so far

    def filter(self) -> Callable[[bytes], bytes]:
        """A rewriter for one connection: whole commands out, partial ones kept."""
        buf = bytearray()

        def rewrite(chunk: bytes) -> bytes:
            buf.extend(chunk)
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
            return bytes(out)

        return rewrite
