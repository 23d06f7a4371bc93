"""Work started off a session's path and not awaited by it (a lease released, an audit row
written): kept referenced until it ends, its failure logged, awaited briefly at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from cloudbot_common.logging import get_logger

_log = get_logger(__name__)


class Background:
    def __init__(self, failure: str) -> None:
        self._failure = failure  # what a failed task means, for the log
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def wait(self, seconds: float) -> None:
        """Let what is under way finish, for `seconds` at the most."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=seconds)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.warning(self._failure, error=type(task.exception()).__name__)
