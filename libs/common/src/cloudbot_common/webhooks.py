"""Webhooks: which targets are acceptable, and the deliveries a machine's event owes.

A delivery row is written in the same transaction as the event it reports (the state
change, or an idle warning), so an event that happened is delivered at least once and one
that was rolled back never is. The provisioner's delivery task sends them, signed in the
Standard Webhooks format, in order per webhook and machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common.models import Instance, InstanceEvent, Webhook, WebhookDelivery

STATE_CHANGED = "instance.state_changed"
IDLE_WARNING = "instance.idle_warning"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsafeTarget(ValueError):
    """A webhook URL the control plane will not call; the message says why."""


def networks(cidrs: list[str]) -> list[Network]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_target(url: str, allowed: list[Network]) -> None:
    """Refuse URLs that would make the control plane call into its own network: hosts
    that resolve to a private, loopback, link-local or otherwise non-public address (all
    of its addresses, not just the first), unless an operator allowed that network; and
    plain http except to such an allowed network. Checked when a webhook is made and again
    before every delivery (the name may resolve elsewhere by then)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UnsafeTarget("The URL must be http(s)://host/...")
    if parts.username or parts.password:
        raise UnsafeTarget("The URL must not carry credentials.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeTarget("The URL's port is not valid.") from exc
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, port, type=socket.SOCK_STREAM
        )
    except OSError as exc:
        raise UnsafeTarget(f"The host {parts.hostname} does not resolve.") from exc
    addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
    for ip in addresses:
        in_allowed = any(ip in net for net in allowed)
        if not in_allowed and not _public(ip):
            raise UnsafeTarget(
                f"The host {parts.hostname} resolves to a private, loopback or link-local "
                "address; webhooks go to public addresses only."
            )
        if parts.scheme == "http" and not in_allowed:
            raise UnsafeTarget("Webhook URLs must use https.")


async def enqueue(
    session: AsyncSession,
    instance: Instance,
    entry: InstanceEvent,
    event_type: str,
    **extra: Any,
) -> int:
    """Stage one delivery of `entry` per live webhook of the instance's owner, in the
    caller's transaction. Returns how many."""
    hooks = (
        await session.scalars(
            select(Webhook.id).where(
                Webhook.user_id == instance.owner_id, Webhook.deleted_at.is_(None)
            )
        )
    ).all()
    if not hooks:
        return 0
    payload = _payload(instance, entry, event_type, extra)
    for webhook_id in hooks:
        session.add(
            WebhookDelivery(
                webhook_id=webhook_id,
                instance_id=instance.id,
                # Stable across retries, unique per webhook: receivers deduplicate on it.
                message_id=f"msg_{entry.id}_{webhook_id.hex[:12]}",
                event_type=event_type,
                payload=payload,
                status="pending",
                attempts=0,
            )
        )
    return len(hooks)


def _payload(
    instance: Instance, entry: InstanceEvent, event_type: str, extra: dict[str, Any]
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "instance_id": str(instance.id),
        "name": instance.name,
        "state": instance.state,
        "reason": entry.reason,
        "event_id": entry.id,
        **extra,
    }
    return {
        "type": event_type,
        "timestamp": datetime.now(UTC).isoformat(),
        "data": data,
    }


def delivery_lock_key(webhook_id: uuid.UUID, instance_id: uuid.UUID | None) -> int:
    """The advisory lock that keeps one webhook's deliveries about one machine in order."""
    raw = webhook_id.bytes[:4] + (instance_id.bytes[:4] if instance_id else b"\0" * 4)
    return int.from_bytes(raw, "big", signed=True)
