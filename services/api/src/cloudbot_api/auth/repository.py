from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import bindparam, select, update

from cloudbot_api.repository import Fields, Query, ReadRepository, Repository
from cloudbot_common.models import LoginSession, RefreshToken, User


class AuthRepository(Repository):
    async def user_by_email(self, email: str) -> User | None:
        result = await self.session.scalars(select(User).where(User.email == email))
        return result.one_or_none()

    async def refresh_token_for_update(self, jti: uuid.UUID) -> RefreshToken | None:
        result = await self.session.scalars(
            select(RefreshToken).where(RefreshToken.jti == jti).with_for_update()
        )
        return result.one_or_none()

    async def login_session_for_update(self, session_id: uuid.UUID) -> LoginSession | None:
        result = await self.session.scalars(
            select(LoginSession).where(LoginSession.id == session_id).with_for_update()
        )
        return result.one_or_none()

    async def revoke_session(self, session_id: uuid.UUID, reason: str, now: datetime) -> None:
        await self.session.execute(
            update(LoginSession)
            .where(LoginSession.id == session_id, LoginSession.revoked_at.is_(None))
            .values(revoked_at=now, revoked_reason=reason)
        )

    async def revoke_all_sessions(
        self, user_id: uuid.UUID, reason: str, now: datetime
    ) -> list[uuid.UUID]:
        """Revoke every live login session of the user; returns their ids."""
        result = await self.session.scalars(
            update(LoginSession)
            .where(
                LoginSession.user_id == user_id,
                LoginSession.revoked_at.is_(None),
                LoginSession.expires_at > now,
            )
            .values(revoked_at=now, revoked_reason=reason)
            .returning(LoginSession.id)
        )
        return list(result.all())


_USER_BY_ID = Query.of(
    select(User.id, User.email, User.created_at).where(User.id == bindparam("user_id"))
)


class AuthReads(ReadRepository):
    async def user_by_id(self, user_id: uuid.UUID) -> Fields | None:
        """The account as `UserOut` shows it."""
        return await self.first(_USER_BY_ID, user_id=user_id)
