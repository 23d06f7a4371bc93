"""Webhook deliveries: the relay hands due (webhook, machine) pairs to the workers; a
worker sends that pair's deliveries oldest first, signed in the Standard Webhooks format.

Order per machine: one worker at a time holds the pair's advisory lock, and a delivery
that failed holds back the later ones of its pair until it succeeds or is given up. At
least once: a delivery is marked done only after the receiver answered 2xx; a worker that
dies mid-send leaves it pending (and its lock goes with its connection).
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import func, select, update
from standardwebhooks.webhooks import Webhook as Signer

from cloudbot_common import webhooks
from cloudbot_common.db import unit_of_work
from cloudbot_common.logging import get_logger
from cloudbot_common.models import Webhook, WebhookDelivery
from cloudbot_common.security.vault import Vault
from cloudbot_provisioner.runtime import Runtime

log = get_logger(__name__)

BATCH = 200
USER_AGENT = "CloudBot-Webhooks/1"


@dataclass(frozen=True, slots=True)
class Sent:
    ok: bool
    status: int | None
    error: str | None


async def due_pairs(rt: Runtime) -> list[tuple[uuid.UUID, uuid.UUID | None]]:
    """(webhook, machine) pairs with a delivery due now."""
    async with unit_of_work(rt.sessions) as session:
        rows = await session.execute(
            select(WebhookDelivery.webhook_id, WebhookDelivery.instance_id)
            .where(
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= func.now(),
            )
            .group_by(WebhookDelivery.webhook_id, WebhookDelivery.instance_id)
            .limit(BATCH)
        )
        return [(w, i) for w, i in rows.all()]


async def deliver_pair(rt: Runtime, webhook_id: uuid.UUID, instance_id: uuid.UUID | None) -> int:
    """Send the pair's due deliveries in order; returns how many succeeded."""
    key = webhooks.delivery_lock_key(webhook_id, instance_id)
    async with rt.engine.connect() as lock:
        if not await lock.scalar(select(func.pg_try_advisory_lock(key))):
            return 0  # another worker is on this pair
        await lock.commit()
        try:
            return await _deliver_in_order(rt, webhook_id, instance_id)
        finally:
            await lock.execute(select(func.pg_advisory_unlock(key)))
            await lock.commit()


async def _deliver_in_order(
    rt: Runtime, webhook_id: uuid.UUID, instance_id: uuid.UUID | None
) -> int:
    vault = Vault(rt.settings.encryption_key.get_secret_value())
    allowed = webhooks.networks(rt.settings.webhook_allowed_networks)
    delivered = 0
    while True:
        async with unit_of_work(rt.sessions) as session:
            hook = await session.get(Webhook, webhook_id)
            pair = WebhookDelivery.instance_id == instance_id
            if instance_id is None:
                pair = WebhookDelivery.instance_id.is_(None)
            row = await session.scalar(
                select(WebhookDelivery)
                .where(
                    WebhookDelivery.webhook_id == webhook_id,
                    pair,
                    WebhookDelivery.status == "pending",
                )
                .order_by(WebhookDelivery.id)
                .limit(1)
            )
        if row is None or hook is None or hook.deleted_at is not None:
            return delivered
        if row.next_attempt_at > datetime.now(UTC):
            return delivered  # backing off; later deliveries of the pair wait behind it
        secret = vault.decrypt(hook.user_id, f"webhook:{hook.id}", hook.secret_ciphertext)
        sent = await _send(rt, hook.url, allowed, secret, row)
        await _record(rt, row, sent)
        if not sent.ok:
            return delivered
        delivered += 1


async def _send(
    rt: Runtime,
    url: str,
    allowed: list[webhooks.Network],
    secret: str,
    row: WebhookDelivery,
) -> Sent:
    try:
        await webhooks.check_target(url, allowed)
    except webhooks.UnsafeTarget as exc:
        return Sent(False, None, str(exc)[:255])
    body = json.dumps(row.payload, separators=(",", ":"), sort_keys=True)
    now = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": row.message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Signer(secret).sign(row.message_id, now, body),
    }
    try:
        async with httpx.AsyncClient(
            timeout=rt.settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False
        ) as client:
            response = await client.post(url, content=body.encode(), headers=headers)
    except httpx.HTTPError as exc:
        return Sent(False, None, f"{type(exc).__name__}: could not deliver"[:255])
    if response.is_success:
        return Sent(True, response.status_code, None)
    return Sent(False, response.status_code, f"the receiver answered {response.status_code}")


async def _record(rt: Runtime, row: WebhookDelivery, sent: Sent) -> None:
    attempts = row.attempts + 1
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "attempts": attempts,
        "last_status_code": sent.status,
        "last_error": sent.error,
    }
    if sent.ok:
        values |= {"status": "succeeded", "delivered_at": now}
    elif attempts >= rt.settings.webhook_max_attempts:
        values |= {"status": "failed"}
        log.warning("webhook delivery given up", delivery=row.id, attempts=attempts)
    else:
        values |= {"next_attempt_at": now + timedelta(seconds=retry_after(attempts, rt))}
    async with unit_of_work(rt.sessions) as session:
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == row.id, WebhookDelivery.status == "pending")
            .values(**values)
        )


def retry_after(attempts: int, rt: Runtime) -> float:
    """1, 2, 4, ... seconds (with jitter), at most WEBHOOK_RETRY_MAX_SECONDS."""
    ceiling = min(float(rt.settings.webhook_retry_max_seconds), 2.0 ** (attempts - 1))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret
