"""Several gateway processes on one port, to use more than one core.

A gateway process relays on one core: one event loop. With `GATEWAY_WORKERS` other than
1, `python -m cloudbot_gateway` is a small supervisor instead. It starts that many worker
processes (0: one per CPU the process may use, container CPU quota included), each
listening on the gateway's address with SO_REUSEPORT, so that the kernel spreads new
connections over them evenly. It restarts a worker that dies, passes SIGTERM and SIGINT
on (each worker drains as a single gateway does), and exits when they all have.

Workers share nothing but Postgres and Redis, as replicas do: the per-user session limit
is held in Redis, and each worker follows the state events itself. Their metrics go to
prometheus_client's multiprocess files, so `/metrics` on any worker reports them all. A
worker whose supervisor is gone (killed outright) drains and exits on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from prometheus_client import multiprocess

from cloudbot_common.logging import get_logger

_log = get_logger(__name__)

WORKER_FLAG = "--worker"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker's exit code when it could not start (bad settings, address taken): it would
# fail again, so the supervisor stops the gateway rather than restart it in a loop.
START_FAILED = 3
RESTART_DELAY_SECONDS = 1.0
# After a stop is asked for, how long beyond the drain the supervisor waits for workers.
EXIT_GRACE_SECONDS = 15.0
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = _CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on, no more than its cgroup's CPU quota allows."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        limit = math.ceil(int(quota) / int(period))
    except (OSError, ValueError):  # no cgroup v2 file, or "max" (no quota)
        return cpus
    return max(1, min(cpus, limit))


def worker_count(setting: int) -> int:
    return setting if setting > 0 else available_cpus()


class WorkerFailed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"a gateway worker failed to start (exit code {code})")


class Supervisor:
    def __init__(self, count: int, drain_timeout: float) -> None:
        self.count = count
        self.drain_timeout = drain_timeout
        self._stopping = asyncio.Event()
        self._workers: dict[int, asyncio.subprocess.Process] = {}
        self._metrics_dir = ""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self._metrics_dir = _metrics_dir()
        env = {**os.environ, METRICS_DIR_ENV: self._metrics_dir}
        _log.info("starting gateway workers", workers=self.count)
        slots = [asyncio.create_task(self._keep(slot, env)) for slot in range(self.count)]
        stop = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait([stop, *slots], return_when=asyncio.FIRST_COMPLETED)
            failure = next((t.exception() for t in done if t is not stop), None)
            self._stopping.set()
            self._signal_all(signal.SIGTERM)
            try:
                async with asyncio.timeout(self.drain_timeout + EXIT_GRACE_SECONDS):
                    await asyncio.gather(*slots, return_exceptions=True)
            except TimeoutError:
                _log.warning("workers still running after the drain: killing them")
                self._signal_all(signal.SIGKILL)
                await asyncio.gather(*slots, return_exceptions=True)
        finally:
            stop.cancel()
            if self._metrics_dir != os.environ.get(METRICS_DIR_ENV):
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if failure is not None:
            _log.error("gateway worker failed", error=str(failure))
            return 1
        _log.info("gateway workers stopped")
        return 0

    async def _keep(self, slot: int, env: dict[str, str]) -> None:
        """Run one worker, and again whenever it dies, until the gateway stops."""
        while not self._stopping.is_set():
            lifeline, held = os.pipe()  # see watch_supervisor
            try:
                try:
                    process = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "cloudbot_gateway", WORKER_FLAG, str(lifeline),
                        env=env, pass_fds=(lifeline,),
                    )  # fmt: skip
                finally:
                    os.close(lifeline)
                self._workers[slot] = process
                if self._stopping.is_set():  # asked while it was starting
                    process.send_signal(signal.SIGTERM)
                code = await process.wait()
                del self._workers[slot]
            finally:
                os.close(held)
            multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            if self._stopping.is_set():
                return
            if code == START_FAILED:
                raise WorkerFailed(code)
            _log.warning("gateway worker exited: restarting it", slot=slot, exit_code=code)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESTART_DELAY_SECONDS):
                    await self._stopping.wait()

    def _signal_all(self, sig: int) -> None:
        for process in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)


def _metrics_dir() -> str:
    """The operator's multiprocess directory, emptied (what an earlier run left there
    would be counted again), or a new one of our own."""
    given = os.environ.get(METRICS_DIR_ENV)
    if not given:
        return tempfile.mkdtemp(prefix="cloudbot-gateway-metrics-")
    for stale in Path(given).glob("*.db"):
        stale.unlink(missing_ok=True)
    return given


def watch_supervisor(lifeline: int, stop: asyncio.Event) -> None:
    """In a worker: ask for a stop when the supervisor is gone. `lifeline` is the read end
    of a pipe whose only write end the supervisor holds: it reads as ended when the
    supervisor exits, however it exits."""

    def gone() -> None:
        loop.remove_reader(lifeline)
        _log.warning("gateway supervisor gone: stopping")
        stop.set()

    loop = asyncio.get_running_loop()
    loop.add_reader(lifeline, gone)


def supervise(count: int, drain_timeout: float) -> int:
    return asyncio.run(Supervisor(count, drain_timeout).run())
