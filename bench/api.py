"""The API's benchmarks, each figure beside its anchor from the same run.

- Requests: wrk (one thread, HTTP/1.1 keep-alive) against a bare FastAPI app under the
  same uvicorn settings (`bench.bare_app`), then the API's /healthz, and authenticated
  GET /api/auth/me and GET /api/instances (a user with a few instances).
- Logins: POST /api/auth/login flat out against raw argon2id verification with the same
  parameters on the same cores (`bench.argon2_raw`); then GET /api/auth/me's latency,
  requests paced at a person's rate, while logins saturate again.
- Lifecycle: creates through the API with the provisioner's worker (two processes) on a
  backend that completes at once (`bench.instant_worker`): accepted -> picked up (the
  `provisioning` state written) -> `running` written -> delivered on the event stream, and
  creates per second sustained, checking that no instance was launched twice or never.
- Memory: each service's PSS sampled through a stretch of load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from bench.stack import (
    PYTHON,
    Proc,
    _tcp_open,
    _wait,
    create_database,
    drop_database,
    free_port,
    seed,
    start,
)
from cloudbot_common.procfs import tree_pss_bytes
from cloudbot_common.security.passwords import Passwords
from cloudbot_common.settings import Settings

PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class ApiPlan:
    seconds: float  # each wrk run
    connections: int
    login_seconds: float
    lifecycle_samples: int  # one create at a time, for latency
    lifecycle_burst: int  # creates sent together, for throughput
    soak_seconds: float  # memory under load
    instances: int = 3


API_FULL = ApiPlan(seconds=8, connections=32, login_seconds=10, lifecycle_samples=200,
                   lifecycle_burst=300, soak_seconds=180)  # fmt: skip
API_QUICK = ApiPlan(seconds=1, connections=8, login_seconds=2, lifecycle_samples=5,
                    lifecycle_burst=10, soak_seconds=3)  # fmt: skip


@dataclass(frozen=True)
class ApiStack:
    api_port: int
    bare_port: int
    api: Proc
    bare: Proc
    workers: Proc
    state_dir: Path
    database_url: str
    email: str
    token: str
    # A second user, whose instances the lifecycle creates (the first keeps a few).
    creator_token: str

    def url(self, path: str, *, bare: bool = False) -> str:
        return f"http://127.0.0.1:{self.bare_port if bare else self.api_port}{path}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextlib.contextmanager
def api_stack(settings: Settings, redis_url: str, plan: ApiPlan) -> Iterator[ApiStack]:
    database_url = asyncio.run(create_database(settings))
    procs: list[Proc] = []
    state_dir = Path(tempfile.mkdtemp(prefix="cloudbot-bench-machines-"))
    try:
        password_hash = Passwords(settings, threads=1)._hasher.hash(PASSWORD)
        _, email, _ = asyncio.run(
            seed(database_url, password_hash=password_hash, instances=plan.instances,
                 vnc_port=5900)
        )  # fmt: skip
        _, creator, _ = asyncio.run(
            seed(database_url, password_hash=password_hash, instances=0, vnc_port=5900)
        )
        env = {
            "ENVIRONMENT": "test",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            # Logins and creates flat out: the limits would answer 429 instead.
            "RATE_LIMIT_ENABLED": "false",
            "MAX_LIVE_INSTANCES_PER_USER": "100000",
            "LOG_LEVEL": os.environ.get("BENCH_API_LOG_LEVEL", "INFO"),
        }
        api_port, bare_port = free_port(), free_port()
        api = start(
            "api", [PYTHON, "-m", "cloudbot_api"],
            {**env, "API_PORT": str(api_port), "API_METRICS_PORT": str(free_port())},
        )  # fmt: skip
        procs.append(api)
        bare = start("bare-api", [PYTHON, "-m", "bench.bare_app", str(bare_port)])
        procs.append(bare)
        workers = start(
            "workers",
            [PYTHON, "-m", "bench.instant_worker", str(state_dir), "--queues=provisioning",
             "--concurrency=2", "--hostname=bench@%h", "--without-gossip", "--without-mingle",
             "--loglevel=WARNING"],
            env,
        )  # fmt: skip
        procs.append(workers)
        _wait(lambda: httpx.get(f"http://127.0.0.1:{api_port}/readyz").status_code == 200, api)
        _wait(lambda: _tcp_open(bare_port), bare)
        tokens = [
            httpx.post(
                f"http://127.0.0.1:{api_port}/api/auth/login",
                json={"email": who, "password": PASSWORD},
                timeout=30,
            ).json()["access_token"]
            for who in (email, creator)
        ]
        yield ApiStack(
            api_port, bare_port, api, bare, workers, state_dir, database_url, email, *tokens
        )
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
        asyncio.run(drop_database(settings, database_url))


# --- wrk -----------------------------------------------------------------------------


@dataclass
class Wrk:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers and socket errors


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _parse_wrk(out: str) -> Wrk:
    percentile = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)\s*$", out, re.M))
    rps = float(re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"^\s+(\d+) requests in", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(g) for g in socket.groups()) if socket else 0
    )
    return Wrk(rps, _ms(percentile["50"]), _ms(percentile["99"]), requests, errors)


def wrk_argv(
    url: str, seconds: float, connections: int, headers: dict[str, str], script: Path | None = None
) -> list[str]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("the API benchmark needs wrk (Debian: apt-get install wrk)")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    # Answers slower than wrk's default 2 s would not be counted at all.
    argv += ["--timeout", "30s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    if script is not None:
        argv += ["-s", str(script)]
    return [*argv, url]


def wrk(
    url: str, seconds: float, connections: int, headers: dict[str, str], script: Path | None = None
) -> Wrk:
    out = subprocess.run(
        wrk_argv(url, seconds, connections, headers, script),
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return _parse_wrk(out)


# --- scenarios -----------------------------------------------------------------------


def requests(s: ApiStack, plan: ApiPlan) -> dict[str, dict[str, float]]:
    targets = {
        "bare": (s.url("/healthz", bare=True), {}),
        "healthz": (s.url("/healthz"), {}),
        "me": (s.url("/api/auth/me"), s.auth),
        "instances": (s.url("/api/instances"), s.auth),
    }
    for url, headers in targets.values():  # warm up: connections, caches, prepared statements
        wrk(url, 1, plan.connections, headers)
    return {
        name: asdict(wrk(url, plan.seconds, plan.connections, headers))
        for name, (url, headers) in targets.items()
    }


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def _raw_argon2(seconds: float) -> float:
    out = subprocess.run(
        [PYTHON, "-m", "bench.argon2_raw", str(seconds)],
        capture_output=True, text=True, check=True, env={**os.environ, "ENVIRONMENT": "test"},
    ).stdout  # fmt: skip
    return float(out)


# GET /api/auth/me's pace while logins saturate: a person's page, not a second load.
ME_PROBE_PER_S = 20


def _paced(url: str, headers: dict[str, str], seconds: float, per_s: float) -> Wrk:
    """Latency of requests sent at a steady pace (each on time, whatever the last one
    took: a slow answer does not hide the next ones' wait), on one keep-alive connection."""
    latencies, errors = [], 0
    with httpx.Client(headers=headers, timeout=30) as client:
        start = time.perf_counter()
        n = 0
        while (due := start + n / per_s) < start + seconds:
            time.sleep(max(0.0, due - time.perf_counter()))
            sent = time.perf_counter()
            if client.get(url).status_code != 200:
                errors += 1
            latencies.append((time.perf_counter() - sent) * 1e3)
            n += 1
    latencies.sort()
    return Wrk(
        rps=len(latencies) / seconds,
        p50_ms=latencies[len(latencies) // 2],
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        requests=len(latencies),
        errors=errors,
    )


def logins(s: ApiStack, plan: ApiPlan, workdir: Path) -> dict[str, object]:
    script = workdir / "login.lua"
    body = json.dumps({"email": s.email, "password": PASSWORD})
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    raw = _raw_argon2(plan.login_seconds)

    def flat_out() -> subprocess.Popen[str]:
        # Twice as many logins at once as the pool has threads (one per CPU).
        return subprocess.Popen(
            wrk_argv(s.url("/api/auth/login"), plan.login_seconds, 2 * _cpus(), {}, script),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    # Throughput: logins alone, as the raw anchor ran alone.
    out, _ = flat_out().communicate()
    alone = _parse_wrk(out)
    # Then the event loop's latency while they saturate: /api/auth/me at a person's pace.
    login = flat_out()
    me = _paced(s.url("/api/auth/me"), s.auth, plan.login_seconds, ME_PROBE_PER_S)
    out, _ = login.communicate()
    return {
        "raw_argon2_per_s": raw,
        "login": asdict(alone),
        "login_with_probe": asdict(_parse_wrk(out)),
        "me_meanwhile": asdict(me),
    }


@dataclass
class Lifecycle:
    # From the POST sent to: its 202 (the command stored and published), the worker's
    # `provisioning` written, `running` written (both as Postgres stamped them), `running`
    # received on the instance's event stream. (The worker may pick the command up before
    # the 202 arrives: it is published before the answer is sent.)
    accepted_ms: list[float] = field(default_factory=list)
    picked_up_ms: list[float] = field(default_factory=list)
    written_ms: list[float] = field(default_factory=list)
    delivered_ms: list[float] = field(default_factory=list)


async def _create(client: httpx.AsyncClient, n: int) -> tuple[str, float, float]:
    sent = time.time()
    r = await client.post(
        "/api/instances", json={"name": f"bench-{n}", "size": "small"},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )  # fmt: skip
    if r.status_code != 202:
        raise RuntimeError(f"create answered {r.status_code}: {r.text}")
    return str(r.json()["id"]), sent, time.time()


async def _states(client: httpx.AsyncClient, instance_id: str) -> dict[str, tuple[float, float]]:
    """The instance's event stream until `running`: per state, (stamped, received)."""
    seen: dict[str, tuple[float, float]] = {}
    async with client.stream("GET", f"/api/instances/{instance_id}/events") as r:
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
                stamped = datetime.fromisoformat(data["at"]).timestamp()
                seen[data["state"]] = (stamped, time.time())
                if data["state"] in ("running", "failed"):
                    return seen
    raise RuntimeError(f"event stream of {instance_id} ended early")


async def _running_count(database_url: str, ids: list[str]) -> int:
    conn = await asyncpg.connect(
        make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM instances WHERE state = 'running' AND id = ANY($1::uuid[])", ids
        )
        return count
    finally:
        await conn.close()


async def lifecycle(s: ApiStack, plan: ApiPlan) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {s.creator_token}"}
    async with httpx.AsyncClient(
        base_url=s.url(""), headers=headers, timeout=60, limits=httpx.Limits(max_connections=64)
    ) as client:
        result = Lifecycle()
        for n in range(plan.lifecycle_samples):
            iid, sent, accepted = await _create(client, n)
            states = await asyncio.wait_for(_states(client, iid), 60)
            if "running" not in states:
                raise RuntimeError(f"instance {iid} failed: {states}")
            result.accepted_ms.append((accepted - sent) * 1e3)
            result.picked_up_ms.append((states["provisioning"][0] - sent) * 1e3)
            result.written_ms.append((states["running"][0] - sent) * 1e3)
            result.delivered_ms.append((states["running"][1] - sent) * 1e3)
        # Throughput: a burst of creates from 16 clients at once, until all run.
        pss_before = tree_pss_bytes(s.workers.pid)
        limit = asyncio.Semaphore(16)

        async def one(n: int) -> str:
            async with limit:
                iid, _, _ = await _create(client, n)
                return iid

        started = time.perf_counter()
        ids = list(await asyncio.gather(*(one(n) for n in range(plan.lifecycle_burst))))
        deadline = started + 60 + plan.lifecycle_burst
        while await _running_count(s.database_url, ids) < len(ids):
            if time.perf_counter() > deadline:
                raise RuntimeError("the burst's instances did not all come up")
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        pss_after = tree_pss_bytes(s.workers.pid)
    launches = (s.state_dir / "launches").read_text().split()
    return {
        **asdict(result),
        "burst": plan.lifecycle_burst,
        "creates_per_s": plan.lifecycle_burst / elapsed,
        "launches": len(launches),
        "launched_twice": len(launches) - len(set(launches)),
        "never_launched": len(set(ids) - set(launches)),
        "workers_pss_before": pss_before,
        "workers_pss_after": pss_after,
    }


def soak(s: ApiStack, plan: ApiPlan) -> dict[str, object]:
    """The API's PSS every few seconds while GET /api/instances runs flat out."""
    samples: list[tuple[float, int]] = []
    interval = max(plan.soak_seconds / 12, 0.5)
    load = subprocess.Popen(
        wrk_argv(s.url("/api/instances"), plan.soak_seconds, plan.connections, s.auth),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    started = time.perf_counter()
    while load.poll() is None:
        samples.append((time.perf_counter() - started, tree_pss_bytes(s.api.pid)))
        time.sleep(interval)
    out, _ = load.communicate()
    return {"samples": samples, "load": asdict(_parse_wrk(out))}


def run_api(settings: Settings, redis_url: str, plan: ApiPlan) -> dict[str, object]:
    with api_stack(settings, redis_url, plan) as s, tempfile.TemporaryDirectory() as tmp:
        figures: dict[str, object] = {"cpus": _cpus()}
        figures["pss_start"] = {
            "api": tree_pss_bytes(s.api.pid),
            "workers": tree_pss_bytes(s.workers.pid),
        }
        figures["requests"] = requests(s, plan)
        figures["logins"] = logins(s, plan, Path(tmp))
        figures["lifecycle"] = asyncio.run(lifecycle(s, plan))
        figures["soak"] = soak(s, plan)
        return figures


# --- report --------------------------------------------------------------------------


def _pct(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[98]


def report_api(f: dict[str, object]) -> str:
    req: dict[str, dict[str, float]] = f["requests"]  # type: ignore[assignment]
    log: dict[str, dict[str, float]] = f["logins"]  # type: ignore[assignment]
    life: dict[str, list[float]] = f["lifecycle"]  # type: ignore[assignment]
    soaked: dict[str, list[tuple[float, int]]] = f["soak"]  # type: ignore[assignment]
    bare = req["bare"]["rps"]

    def row(name: str, key: str, target: str) -> tuple[str, ...]:
        r = req[key]
        return (name, f"{r['rps']:8.0f} req/s", f"bare {bare:.0f} ({r['rps'] / bare:.0%})",
                f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['errors']:.0f} errors",
                target)  # fmt: skip

    raw = float(log["raw_argon2_per_s"])  # type: ignore[arg-type]
    logged, me = log["login"], log["me_meanwhile"]
    acc, picked, written, delivered = (
        _pct(life[k]) for k in ("accepted_ms", "picked_up_ms", "written_ms", "delivered_ms")
    )
    mem = [pss for _, pss in soaked["samples"]]
    third = max(len(mem) // 3, 1)
    early, late = statistics.mean(mem[:third]), statistics.mean(mem[-third:])
    rows = [
        ("bare FastAPI /healthz", f"{bare:8.0f} req/s", "(anchor)",
         f"p50 {req['bare']['p50_ms']:.1f} ms, p99 {req['bare']['p99_ms']:.1f} ms", ""),
        row("API /healthz", "healthz", ">= 70% of bare"),
        row("GET /api/auth/me", "me", ">= 30% of bare"),
        row("GET /api/instances", "instances", ">= 30% of bare"),
        ("logins (POST /api/auth/login)", f"{logged['rps']:8.1f} /s",
         f"raw argon2id {raw:.1f} /s ({logged['rps'] / raw:.0%})",
         f"p50 {logged['p50_ms']:.0f} ms, {logged['errors']:.0f} errors", ">= 90% of raw"),
        ("  /api/auth/me meanwhile", f"{me['p99_ms']:8.1f} ms p99", f"p50 {me['p50_ms']:.1f} ms",
         f"{ME_PROBE_PER_S} req/s paced, logins {log['login_with_probe']['rps']:.1f} /s",
         "p99 < 50 ms"),
        ("create: accepted (202)", f"{acc[0]:8.1f} ms p50", f"p99 {acc[1]:.1f} ms",
         "from the POST sent", ""),
        ("  picked up by a worker", f"{picked[0]:8.1f} ms p50", f"p99 {picked[1]:.1f} ms",
         "provisioning written", ""),
        ("  running written", f"{written[0]:8.1f} ms p50", f"p99 {written[1]:.1f} ms", "", ""),
        ("  running delivered", f"{delivered[0]:8.1f} ms p50", f"p99 {delivered[1]:.1f} ms",
         "received on the instance's SSE stream", ""),
        (f"creates, 2 workers ({life['burst']})", f"{life['creates_per_s']:8.1f} /s",
         f"launched twice {life['launched_twice']}, never {life['never_launched']}", "",
         "no duplicate, none lost"),
        ("API memory under load", f"{late / 2**20:8.1f} MiB",
         f"first third {early / 2**20:.1f} MiB, last {late / 2**20:.1f} MiB "
         f"({(late - early) / 2**20:+.1f})", f"over {soaked['samples'][-1][0]:.0f} s", "flat"),
        ("workers' memory, burst", f"{life['workers_pss_after'] / 2**20:8.1f} MiB",  # type: ignore[operator]
         f"before {life['workers_pss_before'] / 2**20:.1f} MiB", "", ""),  # type: ignore[operator]
    ]  # fmt: skip
    width = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"API benchmark, {f['cpus']} CPUs, wrk -t1, one uvicorn process each"]
    lines += ["  ".join(c.ljust(width[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)
