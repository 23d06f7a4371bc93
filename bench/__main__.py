"""Run the gateway's and the API's benchmarks and print each figure beside its anchors.

    python -m bench               full run (about fifteen minutes)
    python -m bench --quick       the same scenarios, small and short (CI runs this)
    python -m bench --json F      also write the figures to F
    python -m bench --only api    one section (gateway or api)

Needs Postgres and Redis as for the tests (DATABASE_URL's server; REDIS_URL with db
BENCH_REDIS_DB, default 15). It makes a throwaway database and drops it at the end.
BENCH_GATEWAY_WORKERS sets the gateway's GATEWAY_WORKERS (default 1; 0: one per CPU).
The API section needs wrk (Debian: apt-get install wrk); see bench/api.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import httpx

from bench.api import API_FULL, API_QUICK, report_api, run_api
from bench.source import PACED_RATE
from bench.stack import (
    GATEWAY_WORKERS,
    PYTHON,
    Stack,
    stack,
)
from bench.wsclient import Counter, open_counter
from cloudbot_common.procfs import children, tree_cpu_seconds, tree_pss_bytes
from cloudbot_common.settings import Settings

MB = 1e6


@dataclass(frozen=True)
class Plan:
    single_seconds: float
    streams: int
    streams_seconds: float
    samples: int
    saturated_samples: int
    idle: int
    websockify_idle: int


FULL = Plan(single_seconds=5, streams=200, streams_seconds=8, samples=3000,
            saturated_samples=100, idle=5000, websockify_idle=100)  # fmt: skip
QUICK = Plan(single_seconds=0.5, streams=20, streams_seconds=1, samples=200,
             saturated_samples=20, idle=300, websockify_idle=10)  # fmt: skip


@dataclass
class Throughput:
    mb_per_s: float
    cpu_s_per_gb: float | None


# --- scenarios -----------------------------------------------------------------------


def _opener(s: Stack, target: str, hello: bytes) -> Callable[[], Awaitable[Counter]]:
    if target == "direct":
        return lambda: open_counter(s.source_port, hello=hello)
    if target in ("gateway", "copying"):
        port = s.gateway_port if target == "gateway" else s.copying_port
        return lambda: open_counter(port, hello=hello, path=s.vnc_path, headers=s.auth)
    return lambda: open_counter(s.websockify_port, hello=hello, path="/")


async def _open_many(opener: Callable[[], Awaitable[Counter]], n: int) -> list[Counter]:
    limit = asyncio.Semaphore(50)

    async def one() -> Counter:
        async with limit:
            for attempt in range(5):
                try:
                    return await opener()
                except ConnectionError:
                    # websockify accepts slowly (a fork per connection) and its listen
                    # backlog is short: a burst of connects can be reset. Try again.
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.1 * (attempt + 1))
            raise AssertionError("unreachable")

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _close_all(counters: list[Counter]) -> None:
    for c in counters:
        c.close()
    if counters:
        await asyncio.wait([c.closed for c in counters], timeout=10)


def _relay_pid(s: Stack, target: str) -> int | None:
    relays = {"gateway": s.gateway, "copying": s.copying, "websockify": s.websockify}
    return relays[target].pid if target in relays else None


async def _settle_websockify(s: Stack) -> None:
    # websockify forks per connection; let the last ones exit and be reaped.
    deadline = time.monotonic() + 15
    while children(s.websockify.pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def throughput(s: Stack, target: str, n: int, seconds: float) -> Throughput:
    # Open every connection first, then start them all: a relay saturated by the first
    # streams would otherwise be measured on how fast it accepts the last ones.
    counters = await _open_many(_opener(s, target, b""), n)
    for c in counters:
        c.say(b"S")
    try:
        await asyncio.sleep(0.3)  # past connection set-up and slow start
        pid = _relay_pid(s, target)
        cpu0 = tree_cpu_seconds(pid) if pid else 0.0
        bytes0, t0 = sum(c.bytes for c in counters), time.perf_counter()
        await asyncio.sleep(seconds)
        bytes1, t1 = sum(c.bytes for c in counters), time.perf_counter()
        cpu1 = tree_cpu_seconds(pid) if pid else 0.0
    finally:
        await _close_all(counters)
        if target == "websockify":
            await _settle_websockify(s)
    relayed = bytes1 - bytes0
    return Throughput(
        mb_per_s=relayed / (t1 - t0) / MB,
        cpu_s_per_gb=(cpu1 - cpu0) / (relayed / 1e9) if pid and relayed else None,
    )


async def _start_probe(s: Stack, samples: int) -> asyncio.subprocess.Process:
    """The probe process, connected (through the gateway and directly) and waiting."""
    process = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bench.probe", str(s.gateway_port), s.vnc_path, s.token,
        str(s.source_port), str(samples),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    if await process.stdout.readline() != b"ready\n":
        raise RuntimeError("latency probe failed to connect")
    return process


async def _run_probe(process: asyncio.subprocess.Process) -> dict[str, list[float]]:
    out, _ = await process.communicate(b"go\n")
    if process.returncode != 0:
        raise RuntimeError("latency probe failed")
    result: dict[str, list[float]] = json.loads(out)
    return result


def _percentiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[98]


@dataclass
class Latency:
    load_streams: int
    gateway_p50_ms: float
    gateway_p99_ms: float
    direct_p50_ms: float
    direct_p99_ms: float

    @property
    def added_p50_ms(self) -> float:
        return self.gateway_p50_ms - self.direct_p50_ms

    @property
    def added_p99_ms(self) -> float:
        return self.gateway_p99_ms - self.direct_p99_ms


async def latency(s: Stack, load_streams: int, samples: int, mode: bytes = b"P") -> Latency:
    """Round trips of small messages while `load_streams` other sessions stream through the
    gateway, paced like busy desktops (mode b"P") or as fast as they can (b"S")."""
    load = await _open_many(_opener(s, "gateway", b""), load_streams)
    try:
        # Connected before the load starts: a saturated gateway is slow to accept.
        process = await _start_probe(s, samples)
        for c in load:
            c.say(mode)
        await asyncio.sleep(0.3)
        result = await _run_probe(process)
    finally:
        await _close_all(load)
    gw50, gw99 = _percentiles(result["gateway"])
    d50, d99 = _percentiles(result["direct"])
    return Latency(load_streams, gw50 * 1e3, gw99 * 1e3, d50 * 1e3, d99 * 1e3)


async def idle_memory(s: Stack, target: str, n: int) -> float:
    """Memory per idle authenticated connection, in bytes: the relay's growth with `n`
    connections open (PSS of its process tree: the gateway's workers, websockify's
    children)."""
    opener = _opener(s, target, b"")
    pid = _relay_pid(s, target)
    assert pid is not None
    await _close_all(await _open_many(opener, 50))  # warm up the code paths
    await asyncio.sleep(0.5)
    before = tree_pss_bytes(pid)
    counters = await _open_many(opener, n)
    try:
        await asyncio.sleep(1.0)
        after = tree_pss_bytes(pid)
    finally:
        await _close_all(counters)
        if target == "websockify":
            await _settle_websockify(s)
    return (after - before) / n


async def run(s: Stack, plan: Plan) -> dict[str, object]:
    figures: dict[str, object] = {
        "plan": asdict(plan),
        "cpus": os.cpu_count(),
        "gateway_workers": GATEWAY_WORKERS,
    }
    metrics = httpx.get(f"http://127.0.0.1:{s.gateway_metrics_port}/metrics", timeout=5).text
    figures["zero_copy"] = "cloudbot_gateway_zero_copy 1.0" in metrics
    # Memory first, on a fresh gateway, before anything else has grown its heap.
    figures["idle_bytes_per_connection"] = {
        "gateway": await idle_memory(s, "gateway", plan.idle),
        "websockify": await idle_memory(s, "websockify", plan.websockify_idle),
    }
    targets = ("direct", "websockify", "gateway", "copying")
    figures["single_stream"] = {
        t: asdict(await throughput(s, t, 1, plan.single_seconds)) for t in targets
    }
    figures["streams"] = {
        t: asdict(await throughput(s, t, plan.streams, plan.streams_seconds)) for t in targets
    }
    idle = await latency(s, 0, plan.samples)
    loaded = await latency(s, plan.streams, plan.samples, b"P")
    # Round trips are long when the CPUs are saturated: fewer samples.
    saturated = await latency(s, plan.streams, plan.saturated_samples, b"S")
    figures["latency"] = {
        name: {**asdict(v), "added_p50_ms": v.added_p50_ms, "added_p99_ms": v.added_p99_ms}
        for name, v in (("idle", idle), ("under_load", loaded), ("saturated", saturated))
    }
    return figures


# --- report --------------------------------------------------------------------------


def report(f: dict[str, object], plan: Plan) -> str:
    single: dict[str, dict[str, float]] = f["single_stream"]  # type: ignore[assignment]
    streams: dict[str, dict[str, float]] = f["streams"]  # type: ignore[assignment]
    lat: dict[str, dict[str, float]] = f["latency"]  # type: ignore[assignment]
    mem: dict[str, float] = f["idle_bytes_per_connection"]  # type: ignore[assignment]
    gw, ws, direct = (single[k]["mb_per_s"] for k in ("gateway", "websockify", "direct"))
    agw, aws, adirect = (streams[k]["mb_per_s"] for k in ("gateway", "websockify", "direct"))
    cgw, cws = streams["gateway"]["cpu_s_per_gb"], streams["websockify"]["cpu_s_per_gb"]
    scgw, scws = single["gateway"]["cpu_s_per_gb"], single["websockify"]["cpu_s_per_gb"]
    cp, acp = single["copying"]["mb_per_s"], streams["copying"]["mb_per_s"]
    sccp, ccp = single["copying"]["cpu_s_per_gb"], streams["copying"]["cpu_s_per_gb"]
    under, idle, sat = lat["under_load"], lat["idle"], lat["saturated"]
    n = plan.streams
    rows = [
        ("single stream", f"{gw:8.0f} MB/s", f"websockify {ws:.0f} MB/s ({gw / ws:.2f}x)",
         f"direct {direct:.0f} MB/s ({gw / direct:.2f}x)", ">= 1x websockify"),
        ("  CPU per GB", f"{scgw:8.2f} s", f"websockify {scws:.2f} s ({scgw / scws:.2f}x)", "", ""),
        ("  copying relay", f"{cp:8.0f} MB/s", f"websockify ({cp / ws:.2f}x)",
         f"CPU per GB {sccp:.2f} s ({sccp / scws:.2f}x websockify)", ""),
        (f"{n} streams, aggregate", f"{agw:8.0f} MB/s",
         f"websockify {aws:.0f} MB/s ({agw / aws:.2f}x)",
         f"direct {adirect:.0f} MB/s ({agw / adirect:.2f}x)", ">= 2x websockify"),
        (f"{n} streams, CPU per GB", f"{cgw:8.2f} s",
         f"websockify {cws:.2f} s ({cgw / cws:.2f}x)", "", "<= 0.5x websockify"),
        ("  copying relay", f"{acp:8.0f} MB/s", f"websockify ({acp / aws:.2f}x)",
         f"CPU per GB {ccp:.2f} s ({ccp / cws:.2f}x websockify)", ""),
        (f"RTT added, {n} x {PACED_RATE / MB:g} MB/s", f"{under['added_p50_ms']:8.3f} ms p50",
         f"gateway {under['gateway_p50_ms']:.3f} / direct {under['direct_p50_ms']:.3f} ms",
         "", ""),
        ("", f"{under['added_p99_ms']:8.3f} ms p99",
         f"gateway {under['gateway_p99_ms']:.3f} / direct {under['direct_p99_ms']:.3f} ms",
         "", "p99 added < 1 ms"),
        (f"RTT added, {n} streams flat out", f"{sat['added_p50_ms']:8.3f} ms p50",
         f"p99 {sat['added_p99_ms']:.3f} ms (CPUs saturated: queueing everywhere)", "", ""),
        ("RTT added, no load", f"{idle['added_p50_ms']:8.3f} ms p50",
         f"p99 {idle['added_p99_ms']:.3f} ms (gateway {idle['gateway_p99_ms']:.3f} / "
         f"direct {idle['direct_p99_ms']:.3f})", "", ""),
        (f"memory per idle conn ({plan.idle})", f"{mem['gateway'] / 1024:8.1f} KB",
         f"websockify {mem['websockify'] / 1024:.0f} KB ({plan.websockify_idle} open, PSS)",
         f"({mem['gateway'] / mem['websockify']:.3f}x)", "< 40 KB"),
    ]  # fmt: skip
    width = [max(len(r[i]) for r in rows) for i in range(5)]
    relay = "splice(2)" if f["zero_copy"] else "copying (splice unavailable)"
    lines = [
        f"gateway benchmark, {f['cpus']} CPUs, Python {sys.version.split()[0]}, "
        f"{f['gateway_workers']} gateway workers, {relay}"
    ]
    lines += ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small and short (CI)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument(
        "--only", choices=("gateway", "api"), help="one section (default: both, gateway first)"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * plan.idle + 1000:
        sys.exit(f"open file limit {hard} is too low for {plan.idle} connections")
    # On SIGTERM, unwind through the stack's clean-up (stop processes, drop the database).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    settings = Settings(environment="test")
    redis_db = os.environ.get("BENCH_REDIS_DB", "15")
    redis_url = urlsplit(settings.redis_url)._replace(path=f"/{redis_db}").geturl()
    figures: dict[str, object] = {}
    if args.only in (None, "gateway"):
        with stack(settings, redis_url) as s:
            import uvloop

            figures["gateway"] = uvloop.run(run(s, plan))
        print(report(figures["gateway"], plan), flush=True)  # type: ignore[arg-type]
    if args.only in (None, "api"):
        figures["api"] = run_api(settings, redis_url, API_QUICK if args.quick else API_FULL)
        print(report_api(figures["api"]), flush=True)  # type: ignore[arg-type]
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()
