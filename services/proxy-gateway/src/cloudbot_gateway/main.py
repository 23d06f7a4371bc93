"""Entry point: `cloudbot-gateway` or `python -m cloudbot_gateway`."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal

from cloudbot_common.logging import configure_logging, get_logger
from cloudbot_common.settings import Settings, get_settings
from cloudbot_gateway.server import Gateway

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


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop."""
    gateway = Gateway(settings)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _log.info("shutdown requested")
    await gateway.drain_and_stop(settings.gateway_drain_timeout_seconds)


def run() -> None:
    settings = get_settings()
    configure_logging("gateway", level=settings.log_level, json_output=settings.log_json)
    _raise_fd_limit()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
