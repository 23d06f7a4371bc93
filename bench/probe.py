"""Round-trip latency of small messages, through the gateway and straight to the source,
measured alternately so both see the same load (run as its own process, blocking
sockets, so that the load generator's event loop is not part of the figure).

    python -m bench.probe GATEWAY_PORT PATH TOKEN SOURCE_PORT SAMPLES
connects, prints "ready", waits for a line on stdin (the load is on), then prints
{"gateway": [seconds...], "direct": [seconds...]} as JSON.
"""

from __future__ import annotations

import json
import socket
import sys
import time

from bench.wsclient import mask_frame, upgrade_request

MESSAGE = bytes(range(64))


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: socket.socket, n: int, buffer: bytearray) -> bytes:
    while len(buffer) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk
    data = bytes(buffer[:n])
    del buffer[:n]
    return data


def _ws_round_trip(sock: socket.socket, frame: bytes, buffer: bytearray) -> None:
    sock.sendall(frame)
    got = 0
    while got < len(MESSAGE):  # the echo may come back in more than one frame
        b0, b1 = _recv_exact(sock, 2, buffer)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(_recv_exact(sock, 2, buffer), "big")
        elif length == 127:
            length = int.from_bytes(_recv_exact(sock, 8, buffer), "big")
        payload = _recv_exact(sock, length, buffer)
        if b0 & 0x0F == 0x9:
            sock.sendall(mask_frame(payload, opcode=0xA))
        elif b0 & 0x0F in (0x0, 0x2):
            got += length


def main() -> None:
    gw_port, path, token, source_port, samples = sys.argv[1:6]
    gw = _connect(int(gw_port))
    gw.settimeout(120)  # a saturated gateway answers slowly
    gw.sendall(
        upgrade_request("127.0.0.1", int(gw_port), path, {"Authorization": f"Bearer {token}"})
    )
    head = bytearray()
    while b"\r\n\r\n" not in head:
        head += gw.recv(4096)
    if b" 101" not in head[:16]:
        raise SystemExit(f"probe refused: {bytes(head[:40])!r}")
    gw_buffer = head[head.index(b"\r\n\r\n") + 4 :]
    gw.sendall(mask_frame(b"E"))
    direct = _connect(int(source_port))
    direct.sendall(b"E")
    direct_buffer = bytearray()

    print("ready", flush=True)
    sys.stdin.readline()
    frame = mask_frame(MESSAGE)
    results: dict[str, list[float]] = {"gateway": [], "direct": []}
    for i in range(int(samples) + 20):
        t0 = time.perf_counter()
        _ws_round_trip(gw, frame, gw_buffer)
        t1 = time.perf_counter()
        direct.sendall(MESSAGE)
        _recv_exact(direct, len(MESSAGE), direct_buffer)
        t2 = time.perf_counter()
        if i >= 20:  # warm-up
            results["gateway"].append(t1 - t0)
            results["direct"].append(t2 - t1)
        time.sleep(0.0005)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
