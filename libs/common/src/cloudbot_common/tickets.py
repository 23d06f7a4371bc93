"""One-time WebSocket tickets: short-lived, single-use, bound to user, instance and channel."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from enum import StrEnum

from redis.asyncio import Redis

from cloudbot_common.security.opaque import new_token, token_digest

_KEY = "cloudbot:ticket:{}"
TICKET_PREFIX = "cbt_"


class Channel(StrEnum):
    VNC = "vnc"
    CLOUDBOT = "cloudbot"


@dataclass(frozen=True, slots=True)
class Ticket:
    user_id: uuid.UUID
    session_id: uuid.UUID
    instance_id: uuid.UUID
    channel: Channel


async def issue_ticket(redis: Redis, ticket: Ticket, *, ttl_seconds: int) -> str:
    token = new_token(TICKET_PREFIX)
    payload = json.dumps(
        {
            "user_id": str(ticket.user_id),
            "session_id": str(ticket.session_id),
            "instance_id": str(ticket.instance_id),
            "channel": ticket.channel.value,
        }
    )
    await redis.set(_KEY.format(token_digest(token)), payload, ex=ttl_seconds)
    return token


async def redeem_ticket(redis: Redis, token: str) -> Ticket | None:
    """Consume a ticket atomically: a second redemption, even a concurrent one, gets None."""
    raw = await redis.getdel(_KEY.format(token_digest(token)))
    if raw is None:
        return None
    data = json.loads(raw)
    return Ticket(
        user_id=uuid.UUID(data["user_id"]),
        session_id=uuid.UUID(data["session_id"]),
        instance_id=uuid.UUID(data["instance_id"]),
        channel=Channel(data["channel"]),
    )
