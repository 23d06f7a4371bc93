from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select

from cloudbot_api.repository import Repository
from cloudbot_common.models import ApiKey, Instance


class InstanceAgentRepository(Repository):
    async def by_bootstrap_digest_for_update(self, digest: str) -> Instance | None:
        result = await self.session.scalars(
            select(Instance).where(Instance.bootstrap_token_hash == digest).with_for_update()
        )
        return result.one_or_none()

    async def by_credential_digest(self, digest: str) -> Instance | None:
        result = await self.session.scalars(
            select(Instance).where(Instance.credential_hash == digest)
        )
        return result.one_or_none()

    async def owner_keys(self, owner_id: uuid.UUID) -> Sequence[ApiKey]:
        result = await self.session.scalars(select(ApiKey).where(ApiKey.user_id == owner_id))
        return result.all()
