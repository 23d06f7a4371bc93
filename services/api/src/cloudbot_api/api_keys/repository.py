from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import delete, select

from cloudbot_api.repository import Repository
from cloudbot_common.models import ApiKey


class ApiKeyRepository(Repository):
    async def list_for_user(self, user_id: uuid.UUID) -> Sequence[ApiKey]:
        result = await self.session.scalars(
            select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.provider)
        )
        return result.all()

    async def get(self, user_id: uuid.UUID, provider: str) -> ApiKey | None:
        result = await self.session.scalars(
            select(ApiKey).where(ApiKey.user_id == user_id, ApiKey.provider == provider)
        )
        return result.one_or_none()

    async def delete(self, user_id: uuid.UUID, provider: str) -> bool:
        result = await self.session.execute(
            delete(ApiKey)
            .where(ApiKey.user_id == user_id, ApiKey.provider == provider)
            .returning(ApiKey.id)
        )
        return result.first() is not None
