from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update

from cloudbot_api.repository import Repository
from cloudbot_common.models import Webhook, WebhookDelivery


class WebhookRepository(Repository):
    async def live_for_user(self, user_id: uuid.UUID) -> Sequence[Webhook]:
        result = await self.session.scalars(
            select(Webhook)
            .where(Webhook.user_id == user_id, Webhook.deleted_at.is_(None))
            .order_by(Webhook.created_at)
        )
        return result.all()

    async def get_owned(self, user_id: uuid.UUID, webhook_id: uuid.UUID) -> Webhook | None:
        result = await self.session.scalars(
            select(Webhook).where(
                Webhook.id == webhook_id,
                Webhook.user_id == user_id,
                Webhook.deleted_at.is_(None),
            )
        )
        return result.one_or_none()

    async def delete(self, webhook: Webhook, now: datetime) -> None:
        webhook.deleted_at = now
        # What was still owed is dropped: the receiver asked for nothing more.
        await self.session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.webhook_id == webhook.id, WebhookDelivery.status == "pending")
            .values(status="failed", last_error="webhook deleted")
        )
        await self.session.flush()

    async def deliveries(
        self, webhook_id: uuid.UUID, before: int | None, limit: int
    ) -> Sequence[WebhookDelivery]:
        query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
        if before is not None:
            query = query.where(WebhookDelivery.id < before)
        result = await self.session.scalars(query.order_by(WebhookDelivery.id.desc()).limit(limit))
        return result.all()
