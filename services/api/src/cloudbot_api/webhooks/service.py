"""Webhooks: a user's receivers of their machines' events, each with its own signing
secret (encrypted at rest, shown once), and the log of what was delivered to each."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from cloudbot_api import pagination
from cloudbot_api.audit.service import Auditor
from cloudbot_api.errors import ProblemError
from cloudbot_api.unit_of_work import UnitOfWork
from cloudbot_api.webhooks.repository import WebhookRepository
from cloudbot_api.webhooks.schemas import (
    DeliveryOut,
    DeliveryPage,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
)
from cloudbot_common import webhooks
from cloudbot_common.audit import Action
from cloudbot_common.logging import get_logger
from cloudbot_common.models import Webhook
from cloudbot_common.security.vault import Vault

log = get_logger(__name__)

MAX_WEBHOOKS_PER_USER = 10


def secret_context(webhook_id: uuid.UUID) -> str:
    """What a webhook's secret is sealed to in the vault (with its owner)."""
    return f"webhook:{webhook_id}"


def _not_found() -> ProblemError:
    return ProblemError(404, "webhook_not_found", "No such webhook.")


class WebhookService:
    def __init__(
        self,
        uow: UnitOfWork,
        *,
        vault: Vault,
        audit: Auditor,
        allowed_networks: list[webhooks.Network],
    ) -> None:
        self.repo = WebhookRepository(uow.session)
        self.vault = vault
        self.audit = audit
        self.allowed = allowed_networks

    async def list(self, user_id: uuid.UUID) -> Sequence[Webhook]:
        return await self.repo.live_for_user(user_id)

    async def create(
        self, user_id: uuid.UUID, body: WebhookCreate, *, actor: str
    ) -> WebhookCreated:
        url = str(body.url)
        try:
            await webhooks.check_target(url, self.allowed)
        except webhooks.UnsafeTarget as exc:
            raise ProblemError(422, "webhook_target_refused", str(exc)) from None
        if len(await self.repo.live_for_user(user_id)) >= MAX_WEBHOOKS_PER_USER:
            raise ProblemError(
                409, "too_many_webhooks", f"At most {MAX_WEBHOOKS_PER_USER} webhooks per account."
            )
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        webhook_id = uuid.uuid4()
        row = Webhook(
            id=webhook_id,
            user_id=user_id,
            url=url,
            description=body.description,
            secret_ciphertext=self.vault.encrypt(user_id, secret_context(webhook_id), secret),
        )
        await self.repo.add(row)
        await self.repo.save(row)
        self.audit.record(
            Action.WEBHOOK_CREATED,
            user_id=user_id,
            actor=actor,
            target=f"webhook:{row.id}",
            url=url,
        )
        log.info("webhook created", user_id=str(user_id), webhook_id=str(row.id))
        return WebhookCreated(secret=secret, **WebhookOut.model_validate(row).model_dump())

    async def delete(self, user_id: uuid.UUID, webhook_id: uuid.UUID, *, actor: str) -> None:
        row = await self.repo.get_owned(user_id, webhook_id)
        if row is None:
            raise _not_found()
        await self.repo.delete(row, datetime.now(UTC))
        self.audit.record(
            Action.WEBHOOK_DELETED, user_id=user_id, actor=actor, target=f"webhook:{webhook_id}"
        )

    async def deliveries(
        self, user_id: uuid.UUID, webhook_id: uuid.UUID, before: int | None, limit: int
    ) -> DeliveryPage:
        if await self.repo.get_owned(user_id, webhook_id) is None:
            raise _not_found()
        fetched = await self.repo.deliveries(webhook_id, before, limit + 1)
        rows, next_before = pagination.page(fetched, limit)
        return DeliveryPage(
            items=[DeliveryOut.model_validate(r) for r in rows], next_before=next_before
        )
