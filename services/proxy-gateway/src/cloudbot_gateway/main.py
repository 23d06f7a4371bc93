"""Entry point: `cloudbot-gateway` or `python -m cloudbot_gateway`.

One gateway process, or with GATEWAY_WORKERS other than 1 a supervisor of several
(`cloudbot_gateway.workers`), each of which runs `serve` with the supervisor's lifeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from cloudbot_common.logging import configure_logging, get_logger
from cloudbot_common.settings import Settings, get_settings
from cloudbot_gateway.workers import (
    START_FAILED,
    WORKER_FLAG,
    supervise,
    watch_supervisor,
    worker_count,
)

_log = get_logger(__name__)


def _raise_fd_limit() -> None:
    # A desktop session holds up to three descriptors (two sockets and a duplicate, see
    # zerocopy); the default soft limit (often 1024) is far too low.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be the soft one (the kernel caps it at nr_open).
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def serve(settings: Settings, *, lifeline: int | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop. A worker (`lifeline`, see
    workers.py) shares its port with the other workers, and stops if its supervisor goes."""
    # Imported here: a supervisor runs no gateway, and starts faster without it.
    from cloudbot_gateway.server import Gateway

    gateway = Gateway(settings)
    try:
        await gateway.start(reuse_port=lifeline is not None)
    except Exception:
        if lifeline is None:
            raise
        _log.exception("gateway worker could not start")
        raise SystemExit(START_FAILED) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if lifeline is not None:
        watch_supervisor(lifeline, stop)
    await stop.wait()
    _log.info("shutdown requested")
    await gateway.drain_and_stop(settings.gateway_drain_timeout_seconds)


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(main)
    else:
        uvloop.run(main)


def run() -> None:
    settings = get_settings()
    configure_logging("gateway", level=settings.log_level, json_output=settings.log_json)
    _raise_fd_limit()
    if sys.argv[1:2] == [WORKER_FLAG]:
        _run_loop(serve(settings, lifeline=int(sys.argv[2])))
        return
    workers = worker_count(settings.gateway_workers)
    if workers == 1:
        _run_loop(serve(settings))
    else:
        sys.exit(supervise(workers, settings.gateway_drain_timeout_seconds))
