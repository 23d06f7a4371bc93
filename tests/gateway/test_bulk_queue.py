"""The splice relay's bulk queue: oldest first, back to the event loop between slices,
and one session's failure does not stall the others."""

from __future__ import annotations

import asyncio

import pytest

from cloudbot_gateway import zerocopy

pytestmark = pytest.mark.fast


class Recorder:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    def relay_bulk(self) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError("boom")


async def _drained(queue: zerocopy._BulkQueue) -> None:
    async with asyncio.timeout(5):
        while queue._scheduled:
            await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("slice_seconds", "order"),
    [
        (0.0, ["a", "other", "b", "c"]),  # a chunk per slice: the loop runs in between
        (60.0, ["a", "b", "c", "other"]),  # one slice takes them all
    ],
)
async def test_oldest_first_in_slices_with_the_loop_running_between(
    monkeypatch: pytest.MonkeyPatch, slice_seconds: float, order: list[str]
) -> None:
    monkeypatch.setattr(zerocopy, "SLICE_SECONDS", slice_seconds)
    queue = zerocopy._BulkQueue()
    log: list[str] = []
    for name in ("a", "b", "c"):
        queue.add(Recorder(name, log))  # type: ignore[arg-type]
    # Something the loop has to do meanwhile (in the gateway: a small message to relay).
    asyncio.get_running_loop().call_soon(log.append, "other")
    await _drained(queue)
    assert log == order


async def test_a_failing_session_does_not_stall_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zerocopy, "SLICE_SECONDS", 60.0)
    loop = asyncio.get_running_loop()
    errors: list[BaseException | None] = []
    loop.set_exception_handler(lambda _, context: errors.append(context.get("exception")))
    try:
        queue = zerocopy._BulkQueue()
        log: list[str] = []
        for name, fail in (("a", False), ("b", True), ("c", False)):
            queue.add(Recorder(name, log, fail))  # type: ignore[arg-type]
        await _drained(queue)
        assert log == ["a", "b", "c"]
        assert [type(e) for e in errors] == [RuntimeError]
        # And it starts again for the next chunk.
        queue.add(Recorder("d", log))  # type: ignore[arg-type]
        await _drained(queue)
        assert log[-1] == "d"
    finally:
        loop.set_exception_handler(None)
