"""What the gateway writes down about sessions, off the relay's path: the audit log (a
desktop or agent session opened and closed, by whom, from where) and the instances' use
marks for idle stop (renewed by the registry's tick while sessions live).

Writes are gathered and flushed together every FLUSH_SECONDS, one transaction and one Redis
pipeline for all of them: a burst of thousands of sessions costs a few statements, not a
pooled connection each. A failed flush is tried again at the next one; what cannot be kept
(more than MAX_PENDING rows waiting) is dropped with a warning. Nothing here touches a
session."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from redis.asyncio import Redis

from cloudbot_common import activity
from cloudbot_common.audit import Action, Origin, record
from cloudbot_common.db import SessionFactory, unit_of_work
from cloudbot_common.logging import get_logger
from cloudbot_gateway.sessions import Session

_log = get_logger(__name__)

FLUSH_SECONDS = 0.5
MAX_PENDING = 20_000


class Journal:
    def __init__(self, sessions: SessionFactory, redis: Redis) -> None:
        self._sessions = sessions
        self._redis = redis
        self._rows: list[dict[str, Any]] = []
        self._marks: set[uuid.UUID] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="session-journal")

    def opened(self, session: Session) -> None:
        self._add(session, Action.SESSION_OPENED, {})

    def closed(self, session: Session, cause: str) -> None:
        seconds = round(time.monotonic() - session.opened_at, 1)
        self._add(session, Action.SESSION_CLOSED, {"cause": cause, "seconds": seconds})

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.flush()

    def _add(self, session: Session, action: Action, details: dict[str, Any]) -> None:
        self._marks.add(session.instance_id)
        if len(self._rows) >= MAX_PENDING:
            _log.warning("session journal full; an audit row was dropped", action=action.value)
            return
        kind = "token" if session.via == "token" else "session"
        self._rows.append(
            {
                "action": action,
                "user_id": session.user_id,
                "actor": f"{kind}:{session.login_session_id}",
                "origin": session.origin or Origin(),
                "target": f"instance:{session.instance_id}",
                "channel": session.channel.value,
                "via": session.via,
                **details,
            }
        )

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        marks, self._marks = self._marks, set()
        if marks:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    activity.mark(pipe, marks)
                    await pipe.execute()
            except Exception as exc:
                self._marks |= marks
                _log.warning("session use marks not written", error=type(exc).__name__)
        rows, self._rows = self._rows, []
        if rows:
            try:
                async with unit_of_work(self._sessions) as db:
                    for row in rows:
                        record(db, **row)
            except Exception as exc:
                self._rows = (rows + self._rows)[:MAX_PENDING]
                _log.warning("session audit rows not written", error=type(exc).__name__)
