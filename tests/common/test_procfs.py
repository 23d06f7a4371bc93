"""The one /proc reader, against real processes."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from cloudbot_common import procfs

MARKER = "m-" + secrets.token_hex(4)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping child in a process group of its own, with a marker in its environment."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "procfs-test"],
        env={**os.environ, "PROCFS_MARKER": MARKER},
        start_new_session=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_running_process_is_seen_whole(child: subprocess.Popen[bytes]):
    assert procfs.alive(child.pid)
    assert child.pid in procfs.children(os.getpid())
    assert child.pid in {p.pid for p in procfs.processes()}
    assert procfs.group_members(child.pid) == [child.pid]
    assert procfs.cmdline(child.pid) == [
        sys.executable.encode(),
        b"-c",
        b"import time; time.sleep(60)",
        b"procfs-test",
    ]
    assert f"PROCFS_MARKER={MARKER}".encode() in (procfs.environ(child.pid) or b"").split(b"\0")
    assert procfs.rss_bytes(child.pid) > 1024 * 1024
    assert procfs.tree_pss_bytes(os.getpid()) > procfs.tree_pss_bytes(child.pid) > 0


def test_a_zombie_counts_as_dead_and_a_reaped_one_as_gone(child: subprocess.Popen[bytes]):
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while procfs.alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    found = procfs.stat(child.pid)
    assert found is not None
    assert found.state == "Z"
    assert not procfs.alive(child.pid)
    assert child.pid not in procfs.group_members(child.pid)
    child.wait()
    assert procfs.stat(child.pid) is None
    assert procfs.cmdline(child.pid) is None
    assert procfs.environ(child.pid) is None
    assert procfs.children(child.pid) == []
    assert procfs.rss_bytes(child.pid) == 0


def test_cpu_time_counts_reaped_children():
    before = procfs.tree_cpu_seconds(os.getpid())
    subprocess.run(
        [sys.executable, "-c", "t = __import__('time').process_time\nwhile t() < 0.3: pass"],
        check=True,
    )
    assert procfs.tree_cpu_seconds(os.getpid()) - before >= 0.25


def test_sockets_and_listeners_are_counted():
    before = procfs.socket_count(os.getpid())
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert procfs.tcp_listeners(port) == 0
        server.listen()
        assert procfs.tcp_listeners(port) == 1
        assert procfs.tcp_listening_addresses(port) == {"0100007F"}
        assert procfs.socket_count(os.getpid()) == before + 1
    assert procfs.tcp_listeners(port) == 0


def test_the_owner_of_a_connection_is_found():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            port = client.getsockname()[1]
            assert procfs.tcp_socket_owner(port) == os.getpid()
    assert procfs.tcp_socket_owner(port) is None
