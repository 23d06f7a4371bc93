"""The benchmarks (the gateway's and the API's) in their short mode, so that they cannot
rot. Their figures are not asserted against targets here (a shared CI machine is no place
for timing); `make bench` is. What is asserted is what holds whatever the timing: every
scenario ran and produced figures, no request failed, and no create was lost or doubled."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.support.processes import PYTHON, ROOT


def test_quick_benchmark_runs_end_to_end(
    base_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [PYTHON, "-m", "bench", "--quick", "--json", str(out)],
        env={
            **os.environ,
            "DATABASE_URL": base_env["DATABASE_URL"],  # the bench makes its own database there
            "REDIS_URL": redis_url,
            "BENCH_REDIS_DB": redis_url.rsplit("/", 1)[1],
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for line in (
        "single stream",
        "streams, aggregate",
        "CPU per GB",
        "RTT added",
        "memory per idle",
        "API benchmark",
        "GET /api/auth/me",
        "logins (POST /api/auth/login)",
        "running delivered",
        "creates, 2 workers",
    ):
        assert line in result.stdout
    figures = json.loads(out.read_text())
    api = figures["api"]
    for target in ("bare", "healthz", "me", "instances"):
        assert api["requests"][target]["rps"] > 0
        assert api["requests"][target]["errors"] == 0
    assert api["logins"]["login"]["rps"] > 0
    assert api["logins"]["login"]["errors"] == 0
    assert api["logins"]["raw_argon2_per_s"] > 0
    assert api["logins"]["login_with_probe"]["errors"] == 0
    assert api["logins"]["me_meanwhile"]["requests"] > 0
    assert api["logins"]["me_meanwhile"]["errors"] == 0
    assert api["lifecycle"]["launched_twice"] == 0
    assert api["lifecycle"]["never_launched"] == 0
    assert all(ms > 0 for ms in api["lifecycle"]["delivered_ms"])
    assert len(api["soak"]["samples"]) >= 2
    figures = figures["gateway"]
    for target in ("direct", "websockify", "gateway"):
        assert figures["single_stream"][target]["mb_per_s"] > 0
        assert figures["streams"][target]["mb_per_s"] > 0
    assert figures["streams"]["gateway"]["cpu_s_per_gb"] > 0
    assert figures["latency"]["under_load"]["gateway_p99_ms"] > 0
    assert figures["idle_bytes_per_connection"]["gateway"] > 0
