"""Personal access tokens: opaque, prefixed, stored only as their digest, checked against
the database on every use so that a revocation holds at once on every replica."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cloudbot_common.models import PersonalAccessToken
from cloudbot_common.security.opaque import new_token, token_digest

PREFIX = "cbp_"
# last_used_at is a hint for people, not a counter: written at most this often per token.
_TOUCH_EVERY = timedelta(minutes=1)


def is_personal_token(credential: str) -> bool:
    return credential.startswith(PREFIX)


def mint() -> tuple[str, str, str]:
    """A new token: (the token, shown once; its digest, stored; a hint that names it)."""
    token = new_token(PREFIX)
    return token, token_digest(token), token[: len(PREFIX) + 4] + "..." + token[-4:]


async def find_active(session: AsyncSession, credential: str) -> PersonalAccessToken | None:
    """The live token `credential` is, or None (unknown, revoked or expired)."""
    row = await session.scalar(
        select(PersonalAccessToken).where(
            PersonalAccessToken.token_digest == token_digest(credential)
        )
    )
    now = datetime.now(UTC)
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and row.expires_at <= now:
        return None
    if row.last_used_at is None or now - row.last_used_at > _TOUCH_EVERY:
        await session.execute(
            update(PersonalAccessToken)
            .where(PersonalAccessToken.id == row.id)
            .values(last_used_at=now)
        )
        await session.commit()
    return row
