"""The provider API-key vault: keys are encrypted on the way in and never shown again."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from cloudbot_api.api_keys.repository import ApiKeyRepository
from cloudbot_api.audit.service import Auditor
from cloudbot_api.errors import ProblemError
from cloudbot_api.unit_of_work import UnitOfWork
from cloudbot_common.audit import Action
from cloudbot_common.logging import get_logger
from cloudbot_common.models import ApiKey
from cloudbot_common.providers import DISPLAY_NAME, Provider, a_key_of
from cloudbot_common.security.vault import Vault

log = get_logger(__name__)


def mask(key: str) -> str:
    """A hint to tell keys apart: a short prefix and the last four characters."""
    if len(key) >= 16:
        return f"{key[:3]}…{key[-4:]}"
    return "…" + key[-2:]


def _not_found(provider: Provider) -> ProblemError:
    return ProblemError(404, "api_key_not_found", f"No {DISPLAY_NAME[provider]} key is stored.")


class ApiKeyService:
    def __init__(self, uow: UnitOfWork, *, vault: Vault, audit: Auditor) -> None:
        self.repo = ApiKeyRepository(uow.session)
        self.vault = vault
        self.audit = audit

    async def list(self, user_id: uuid.UUID) -> Sequence[ApiKey]:
        return await self.repo.list_for_user(user_id)

    async def create(
        self, user_id: uuid.UUID, provider: Provider, key: str, *, actor: str
    ) -> ApiKey:
        if await self.repo.get(user_id, provider) is not None:
            raise self._exists(provider)
        row = ApiKey(
            id=uuid.uuid4(),
            user_id=user_id,
            provider=provider.value,
            ciphertext=self.vault.encrypt(user_id, provider.value, key),
            hint=mask(key),
        )
        if not await self.repo.add_unless_taken(row):  # a concurrent create won the race
            raise self._exists(provider)
        self.audit.record(
            Action.API_KEY_ADDED, user_id=user_id, actor=actor, target=f"api_key:{provider.value}"
        )
        log.info("api key stored", user_id=str(user_id), provider=provider.value)
        return row

    async def put(self, user_id: uuid.UUID, provider: Provider, key: str, *, actor: str) -> ApiKey:
        """Store or replace the key for `provider`."""
        row = await self.repo.get(user_id, provider)
        if row is None:
            return await self.create(user_id, provider, key, actor=actor)
        row.ciphertext = self.vault.encrypt(user_id, provider.value, key)
        row.hint = mask(key)
        await self.repo.save(row)
        self.audit.record(
            Action.API_KEY_REPLACED,
            user_id=user_id,
            actor=actor,
            target=f"api_key:{provider.value}",
        )
        log.info("api key replaced", user_id=str(user_id), provider=provider.value)
        return row

    async def delete(self, user_id: uuid.UUID, provider: Provider, *, actor: str) -> None:
        if not await self.repo.delete(user_id, provider):
            raise _not_found(provider)
        self.audit.record(
            Action.API_KEY_REMOVED, user_id=user_id, actor=actor, target=f"api_key:{provider.value}"
        )
        log.info("api key deleted", user_id=str(user_id), provider=provider.value)

    @staticmethod
    def _exists(provider: Provider) -> ProblemError:
        return ProblemError(
            409,
            "api_key_exists",
            f"{a_key_of(provider)} is already stored; replace it with PUT.",
        )
