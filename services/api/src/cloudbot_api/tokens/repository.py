from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update

from cloudbot_api.repository import Repository
from cloudbot_common.models import PersonalAccessToken


class TokenRepository(Repository):
    async def live_for_user(self, user_id: uuid.UUID) -> Sequence[PersonalAccessToken]:
        result = await self.session.scalars(
            select(PersonalAccessToken)
            .where(
                PersonalAccessToken.user_id == user_id,
                PersonalAccessToken.revoked_at.is_(None),
            )
            .order_by(PersonalAccessToken.created_at.desc())
        )
        return result.all()

    async def revoke(self, user_id: uuid.UUID, token_id: uuid.UUID, now: datetime) -> bool:
        result = await self.session.execute(
            update(PersonalAccessToken)
            .where(
                PersonalAccessToken.id == token_id,
                PersonalAccessToken.user_id == user_id,
                PersonalAccessToken.revoked_at.is_(None),
            )
            .values(revoked_at=now)
            .returning(PersonalAccessToken.id)
        )
        return result.first() is not None
