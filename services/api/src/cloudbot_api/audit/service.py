"""The audit log as the API writes and reads it. Other domains' services take an `Auditor`
(made per request with the client's origin) and record their actions through it."""

from __future__ import annotations

import uuid
from typing import Any

from cloudbot_api import pagination
from cloudbot_api.audit.repository import AuditRepository
from cloudbot_api.audit.schemas import AuditEventOut, AuditPage
from cloudbot_api.unit_of_work import UnitOfWork
from cloudbot_common.audit import Action, Origin


class Auditor:
    def __init__(self, uow: UnitOfWork, *, origin: Origin) -> None:
        self.repo = AuditRepository(uow.session)
        self.origin = origin

    def record(
        self,
        action: Action,
        *,
        user_id: uuid.UUID | None,
        actor: str,
        target: str | None = None,
        **details: Any,
    ) -> None:
        self.repo.add_event(
            action, user_id=user_id, actor=actor, origin=self.origin, target=target, details=details
        )


class AuditService:
    def __init__(self, uow: UnitOfWork) -> None:
        self.repo = AuditRepository(uow.session)

    async def page(self, user_id: uuid.UUID, before: int | None, limit: int) -> AuditPage:
        rows, next_before = pagination.page(await self.repo.page(user_id, before, limit + 1), limit)
        return AuditPage(
            items=[AuditEventOut.model_validate(r) for r in rows], next_before=next_before
        )
