"""Linux's /proc, read in one place: processes, their groups, command lines, environments,
children, memory, CPU time and sockets.

The local backend uses it to find its desktops' processes; the tests and benchmarks use it
to watch the processes they start. A process that is gone, or goes while it is read, reads
as absent (None, nothing, zero) rather than raising. Zombies count as dead: nobody may be
left to reap them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/<pid>/stat this project reads."""

    pid: int
    state: str
    pgrp: int
    # CPU seconds: its own, and those of its exited children it has reaped.
    cpu_seconds: float
    reaped_children_cpu_seconds: float

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def stat(pid: int) -> Stat | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = raw.rsplit(")", 1)[1].split()
    ticks = [int(v) for v in fields[11:15]]  # utime, stime, cutime, cstime
    return Stat(
        pid=pid,
        state=fields[0],
        pgrp=int(fields[2]),
        cpu_seconds=(ticks[0] + ticks[1]) / CLOCK_TICKS,
        reaped_children_cpu_seconds=(ticks[2] + ticks[3]) / CLOCK_TICKS,
    )


def alive(pid: int) -> bool:
    found = stat(pid)
    return found is not None and found.alive


def processes() -> Iterator[Stat]:
    """Every live process."""
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            found = stat(int(entry.name))
            if found is not None and found.alive:
                yield found


def group_members(pgid: int) -> list[int]:
    """The live processes of a process group."""
    return [p.pid for p in processes() if p.pgrp == pgid]


def cmdline(pid: int) -> list[bytes] | None:
    """The arguments `pid` was started with (None if it is gone)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return raw.rstrip(b"\0").split(b"\0") if raw else []


def naming(text: str) -> list[int]:
    """The live processes with `text` in one of their arguments."""
    needle = text.encode()
    found = []
    for process in processes():
        args = cmdline(process.pid)
        if args is not None and any(needle in arg for arg in args):
            found.append(process.pid)
    return found


def environ(pid: int) -> bytes | None:
    """The environment `pid` was started with, NUL-separated (None if unreadable)."""
    try:
        return (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (none once it is gone)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in (PROC / str(pid) / "task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and all its descendants, the exited (reaped) ones included."""
    found = stat(pid)
    if found is None:
        return 0.0
    own = found.cpu_seconds + found.reaped_children_cpu_seconds
    return own + sum(tree_cpu_seconds(child) for child in children(pid))


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (0 if it is gone)."""
    with contextlib.suppress(OSError):
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of `pid` and its descendants (shared pages split fairly)."""
    total = 0
    with contextlib.suppress(OSError):
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total + sum(tree_pss_bytes(child) for child in children(pid))


def socket_count(pid: int) -> int:
    """Open sockets of `pid`."""
    count = 0
    with contextlib.suppress(OSError):
        for fd in (PROC / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                count += int(os.readlink(fd).startswith("socket:"))
    return count


def _tcp_rows(table: str = "tcp") -> list[list[str]]:
    """/proc/net/tcp (IPv4) or tcp6: slot, local address, remote address, state, ...,
    inode. Addresses are hex as the kernel writes them, ports hex after a colon."""
    return [row.split() for row in (PROC / "net" / table).read_text().splitlines()[1:]]


def tcp_listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as the kernel writes them: "0100007F" is 127.0.0.1) of
    TCP listeners on `port`, IPv4 and IPv6."""
    return {
        row[1].partition(":")[0]
        for table in ("tcp", "tcp6")
        for row in _tcp_rows(table)
        if row[3] == "0A" and int(row[1].partition(":")[2], 16) == port
    }


def tcp_listeners(port: int, host: str = "127.0.0.1") -> int:
    """IPv4 sockets listening on host:port, across the machine."""
    address = "".join(f"{int(octet):02X}" for octet in reversed(host.split(".")))
    local = f"{address}:{port:04X}"
    return sum(1 for row in _tcp_rows() if row[1] == local and row[3] == "0A")


def tcp_socket_owner(local_port: int) -> int | None:
    """The process holding the IPv4 TCP socket whose local end is on `local_port`."""
    inode = next(
        (row[9] for row in _tcp_rows() if int(row[1].split(":")[1], 16) == local_port), None
    )
    if inode is None:
        return None
    wanted = f"socket:[{inode}]"
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == wanted:
                        return int(entry.name)
    return None
