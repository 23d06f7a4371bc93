from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from cloudbot_api.repository import Repository
from cloudbot_common.audit import Action, Origin, record
from cloudbot_common.models import AuditEvent


class AuditRepository(Repository):
    def add_event(
        self,
        action: Action,
        *,
        user_id: uuid.UUID | None,
        actor: str,
        origin: Origin,
        target: str | None,
        details: dict[str, Any],
    ) -> None:
        record(
            self.session,
            action,
            user_id=user_id,
            actor=actor,
            origin=origin,
            target=target,
            **details,
        )

    async def page(
        self, user_id: uuid.UUID, before: int | None, limit: int
    ) -> Sequence[AuditEvent]:
        """The user's newest events, older than `before` when given (keyset pagination)."""
        query = select(AuditEvent).where(AuditEvent.user_id == user_id)
        if before is not None:
            query = query.where(AuditEvent.id < before)
        result = await self.session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit))
        return result.all()
