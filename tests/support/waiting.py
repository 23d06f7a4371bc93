"""Polling helpers shared by the tests: wait for a condition, or for an instance state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

# States an instance does not leave by itself: waiting on past them is pointless.
_FINAL = ("failed", "terminated")


async def eventually(
    check: Callable[[], Any], timeout: float = 20, what: str = "condition"
) -> None:
    """Poll an async or sync predicate until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_for_state(
    read: Callable[[], Awaitable[tuple[str, str | None, T]]],
    wanted: set[str],
    timeout: float = 30,
) -> T:
    """Poll `read` (state, reason, value) until the state is one of `wanted`, and return
    the value; fail at once on a final state that is not wanted."""
    deadline = time.monotonic() + timeout
    while True:
        state, reason, value = await read()
        if state in wanted:
            return value
        if state in _FINAL or time.monotonic() > deadline:
            raise AssertionError(f"instance is {state} ({reason}), wanted {sorted(wanted)}")
        await asyncio.sleep(0.1)
