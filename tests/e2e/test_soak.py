"""The soak: simulated users run the whole flow (sign up, key, create, wait for running,
the desktop through the gateway, the agent, stop, delete) against the local stack in
LOCAL_DEV_MODE, in waves. Zero errors; every instance ends terminated with nothing of its
machine left running; the memory of each service is flat from wave to wave.

CI runs a short one (SOAK_USERS=4 in waves of SOAK_CONCURRENCY=2); `make soak` the full
one (200 users, 20 at a time) and prints its figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloudbot_common.procfs import tree_pss_bytes
from tests.support.flow import Replicas, Timings, whole_flow
from tests.support.leaks import SECRETS
from tests.support.processes import LOG_DIR, leftovers
from tests.support.supervisor import Supervisor, local_desktops, url_of

pytestmark = [pytest.mark.slow, pytest.mark.vnc]

USERS = int(os.environ.get("SOAK_USERS", "4"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "2"))
# Growth of a service's memory from the first wave to the last that still counts as flat:
# caches filling (the target cache, the pool's statements) settle within a wave or two.
FLAT_BYTES = int(os.environ.get("SOAK_FLAT_MIB", "24")) << 20
SERVICES = ["api", "gateway", "worker", "beat"]


@pytest.fixture(scope="module")
def local_stack(base_env: dict[str, str], tmp_path_factory) -> Iterator[Supervisor]:
    state = tmp_path_factory.mktemp("soak")
    env = local_desktops(base_env, state, RATE_LIMIT_ENABLED="false", DATABASE_POOL_SIZE="20")
    supervisor = Supervisor(env, state)
    api = supervisor.api()
    # The worker's desktops call the API back (bootstrap, heartbeats).
    supervisor.env["PUBLIC_API_URL"] = url_of(api)
    gateway = supervisor.gateway()
    api.env["PUBLIC_GATEWAY_URL"] = f"ws://127.0.0.1:{gateway.env['GATEWAY_PORT']}"
    supervisor.worker(concurrency=2)
    supervisor.beat()
    with supervisor.running():
        yield supervisor


def memory(supervisor: Supervisor) -> dict[str, int]:
    readings = {}
    for name in SERVICES:
        proc = supervisor[name].proc
        assert proc is not None
        assert proc.alive(), f"{name} died"
        readings[name] = tree_pss_bytes(proc.pid)
    return readings


async def test_soak(local_stack: Supervisor) -> None:
    api = url_of(local_stack["api"])
    gateway = f"ws://127.0.0.1:{local_stack['gateway'].env['GATEWAY_PORT']}"
    replicas = Replicas([api], [gateway], origin=local_stack.env["ALLOWED_WS_ORIGINS"])
    timings: list[Timings] = []
    errors: list[str] = []
    readings: list[dict[str, int]] = []
    started = time.monotonic()
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(
        timeout=30, limits=limits, headers={"X-Forwarded-For": "10.77.0.1"}
    ) as http:

        async def one() -> None:
            try:
                timings.append(await whole_flow(replicas, http, SECRETS.add, running_timeout=180))
            except Exception as e:  # every kind counts as an error of the soak
                errors.append(f"{type(e).__name__}: {e}")

        for wave in range(0, USERS, CONCURRENCY):
            await asyncio.gather(*(one() for _ in range(min(CONCURRENCY, USERS - wave))))
            readings.append(await asyncio.to_thread(memory, local_stack))
    elapsed = time.monotonic() - started

    state_dir = Path(local_stack.env["LOCAL_STATE_DIR"])
    figures = {
        "users": USERS,
        "concurrency": CONCURRENCY,
        "seconds": round(elapsed, 1),
        "errors": len(errors),
        "flows_per_minute": round(len(timings) / elapsed * 60, 1),
        "step_p50_p95_seconds": {
            step: [
                round(statistics.median(v), 2),
                round(sorted(v)[max(0, int(len(v) * 0.95) - 1)], 2),
            ]
            for step in (timings[0].steps if timings else {})
            for v in [[t.steps[step] for t in timings]]
        },
        "memory_mib_first_last_max": {
            name: [round(r[name] / 2**20, 1) for r in (readings[0], readings[-1])]
            + [round(max(r[name] for r in readings) / 2**20, 1)]
            for name in SERVICES
        },
    }
    LOG_DIR.mkdir(exist_ok=True)
    (LOG_DIR / "soak.json").write_text(json.dumps(figures, indent=2))
    print("\nsoak:", json.dumps(figures, indent=2))

    assert errors == [], errors[:10]
    assert len(timings) == USERS
    assert leftovers(state_dir) == [], "a machine outlived its deleted instance"
    if len(readings) > 1:
        for name in SERVICES:
            grew = readings[-1][name] - readings[0][name]
            assert grew < FLAT_BYTES, f"{name} grew {grew / 2**20:.1f} MiB over the soak"
