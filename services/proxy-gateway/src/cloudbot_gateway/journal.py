"""What the gateway writes down about sessions, off the relay's path: the audit log (a
desktop or agent session opened and closed, by whom, from where) and the instances' use
marks for idle stop (renewed by the registry's tick while sessions live). Failures are
logged and never touch a session."""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

from cloudbot_common import activity
from cloudbot_common.audit import Action, Origin, record
from cloudbot_common.db import SessionFactory, unit_of_work
from cloudbot_gateway.background import Background
from cloudbot_gateway.sessions import Session


class Journal:
    def __init__(self, sessions: SessionFactory, redis: Redis) -> None:
        self._sessions = sessions
        self._redis = redis
        self._background = Background("session journal write failed")

    def opened(self, session: Session) -> None:
        self._background.spawn(self._audit(session, Action.SESSION_OPENED, {}))
        self._background.spawn(self._mark([session]))

    def closed(self, session: Session, cause: str) -> None:
        seconds = round(time.monotonic() - session.opened_at, 1)
        details = {"cause": cause, "seconds": seconds}
        self._background.spawn(self._audit(session, Action.SESSION_CLOSED, details))
        self._background.spawn(self._mark([session]))

    async def aclose(self) -> None:
        await self._background.wait(5)

    async def _audit(self, session: Session, action: Action, details: dict[str, Any]) -> None:
        async with unit_of_work(self._sessions) as db:
            record(
                db,
                action,
                user_id=session.user_id,
                actor=f"{'token' if session.via == 'token' else 'session'}:"
                f"{session.login_session_id}",
                origin=session.origin or Origin(),
                target=f"instance:{session.instance_id}",
                channel=session.channel.value,
                via=session.via,
                **details,
            )

    async def _mark(self, sessions: list[Session]) -> None:
        if sessions:
            async with self._redis.pipeline(transaction=False) as pipe:
                activity.mark(pipe, {s.instance_id for s in sessions})
                await pipe.execute()
