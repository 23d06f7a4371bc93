"""Accounts and login sessions: signup, login, refresh-token rotation with reuse detection."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from cloudbot_api.audit.service import Auditor
from cloudbot_api.auth.repository import AuthReads, AuthRepository
from cloudbot_api.auth.retry import RefreshRetries
from cloudbot_api.auth.schemas import TokenPair
from cloudbot_api.errors import ProblemError
from cloudbot_api.repository import Fields, ReadConnections
from cloudbot_api.revocation import announce_after_commit
from cloudbot_api.unit_of_work import UnitOfWork
from cloudbot_common.audit import Action
from cloudbot_common.logging import get_logger
from cloudbot_common.models import LoginSession, RefreshToken, User
from cloudbot_common.revocations import RevocationWatch
from cloudbot_common.security.jwt_tokens import TokenClaims, TokenCodec, TokenError, TokenType
from cloudbot_common.security.passwords import Passwords
from cloudbot_common.settings import Settings

log = get_logger(__name__)

INVALID_CREDENTIALS = ProblemError(401, "invalid_credentials", "Wrong email or password.")


def _invalid_refresh(detail: str = "Invalid refresh token.") -> ProblemError:
    return ProblemError(401, "invalid_refresh_token", detail)


def _email_taken() -> ProblemError:
    return ProblemError(409, "email_taken", "An account with this email already exists.")


class AuthService:
    def __init__(
        self,
        uow: UnitOfWork,
        *,
        passwords: Passwords,
        tokens: TokenCodec,
        redis: Redis,
        revocations: RevocationWatch,
        retries: RefreshRetries,
        settings: Settings,
        audit: Auditor,
    ) -> None:
        self.uow = uow
        self.audit = audit
        self.repo = AuthRepository(uow.session)
        self.passwords = passwords
        self.tokens = tokens
        self.redis = redis
        self.revocations = revocations
        self.retries = retries
        self.settings = settings

    async def signup(self, email: str, password: str) -> User:
        if await self.repo.user_by_email(email) is not None:
            raise _email_taken()
        user = User(id=uuid.uuid4(), email=email, password_hash=await self.passwords.hash(password))
        if not await self.repo.add_unless_taken(user):  # a concurrent signup won the race
            raise _email_taken()
        self.audit.record(
            Action.SIGNUP, user_id=user.id, actor="anonymous", target=f"user:{user.id}"
        )
        log.info("user signed up", user_id=str(user.id))
        return user

    async def login(self, email: str, password: str, user_agent: str | None) -> TokenPair:
        user = await self.repo.user_by_email(email)
        # Verified even when the user is unknown (against a dummy hash): same answer, same time.
        ok = await self.passwords.verify(user.password_hash if user else None, password)
        if user is None or not ok:
            if user is not None:  # the owner sees attempts on their account
                self.audit.record(Action.LOGIN_FAILED, user_id=user.id, actor="anonymous")
                self.uow.keep_on_error()
            raise INVALID_CREDENTIALS
        if self.passwords.needs_rehash(user.password_hash):
            user.password_hash = await self.passwords.hash(password)
            log.info("password rehashed with current parameters", user_id=str(user.id))
        now = datetime.now(UTC)
        login = LoginSession(
            id=uuid.uuid4(),
            user_id=user.id,
            expires_at=now + timedelta(seconds=self.settings.refresh_token_ttl_seconds),
            user_agent=(user_agent or "")[:512] or None,
        )
        await self.repo.add(login)
        self.audit.record(Action.LOGIN, user_id=user.id, actor=f"session:{login.id}")
        log.info("user logged in", user_id=str(user.id), session_id=str(login.id))
        return await self._issue_pair(user.id, login.id, now)

    def decode_refresh(self, refresh_token: str) -> TokenClaims:
        try:
            return self.tokens.decode(refresh_token, TokenType.REFRESH)
        except TokenError as exc:
            raise _invalid_refresh(f"Invalid refresh token: {exc}.") from exc

    async def refresh(self, claims: TokenClaims, refresh_token: str, client: str) -> TokenPair:
        """A new pair for a refresh token's claims. A token presented a second time ends
        its whole login session, which stays ended although the answer is an error, unless
        it is the same client retrying within REFRESH_RETRY_SECONDS (see retry.py)."""
        now = datetime.now(UTC)
        login = await self.repo.login_session_for_update(claims.session_id)
        if login is None or login.user_id != claims.user_id:
            raise _invalid_refresh()
        if login.revoked_at is not None or login.expires_at <= now:
            raise _invalid_refresh("This login session has ended.")
        token = await self.repo.refresh_token_for_update(claims.jti)
        if token is None or token.session_id != login.id:
            raise _invalid_refresh()
        if token.used_at is not None:
            if now - token.used_at <= timedelta(seconds=self.retries.window) and (
                kept := await self.retries.recall(claims.jti, refresh_token, client)
            ):
                log.info("refresh retried: the same pair again", session_id=str(login.id))
                return kept
            await self.end_session(login.id, "refresh_token_reused", now)
            self.audit.record(
                Action.REFRESH_REUSED, user_id=login.user_id, actor=f"session:{login.id}"
            )
            log.warning(
                "refresh token reused; login session revoked",
                user_id=str(login.user_id),
                session_id=str(login.id),
            )
            self.uow.keep_on_error()
            raise ProblemError(
                401,
                "refresh_token_reused",
                "This refresh token was already used; the login session has been ended.",
            )
        token.used_at = now
        login.last_used_at = now
        pair = await self._issue_pair(login.user_id, login.id, now)
        # Kept before the commit, so a concurrent retry that waited on the row lock finds it.
        await self.retries.remember(claims.jti, refresh_token, client, pair)
        return pair

    async def end_session(self, session_id: uuid.UUID, reason: str, now: datetime) -> None:
        """Revoke a login session; its access tokens stop working once this commits."""
        await self.repo.revoke_session(session_id, reason, now)
        self._announce_ended([session_id])

    def _announce_ended(self, session_ids: list[uuid.UUID]) -> None:
        announce_after_commit(
            self.uow,
            self.revocations,
            session_ids,
            detail="The login session is ended, but not every service has heard of it yet; "
            "its tokens are refused within seconds. Retry to confirm.",
        )

    async def logout_owned(self, user_id: uuid.UUID, session_id: uuid.UUID) -> None:
        """End a login session named by a refresh token, once checked to be the user's."""
        login = await self.repo.login_session_for_update(session_id)
        if login is not None and login.user_id == user_id and login.revoked_at is None:
            await self.logout(user_id, session_id)

    async def logout_all(self, user_id: uuid.UUID, *, actor: str) -> None:
        """End every login session of the account (personal access tokens stay)."""
        ended = await self.repo.revoke_all_sessions(user_id, "logout_all", datetime.now(UTC))
        self._announce_ended(ended)
        self.audit.record(Action.LOGOUT, user_id=user_id, actor=actor, everywhere=len(ended))
        log.info("user logged out everywhere", user_id=str(user_id), sessions=len(ended))

    async def logout(self, user_id: uuid.UUID, session_id: uuid.UUID) -> None:
        await self.end_session(session_id, "logout", datetime.now(UTC))
        self.audit.record(Action.LOGOUT, user_id=user_id, actor=f"session:{session_id}")
        log.info("user logged out", session_id=str(session_id))

    async def _issue_pair(
        self, user_id: uuid.UUID, session_id: uuid.UUID, now: datetime
    ) -> TokenPair:
        access = self.tokens.issue(TokenType.ACCESS, user_id, session_id, now=now)
        refresh = self.tokens.issue(TokenType.REFRESH, user_id, session_id, now=now)
        await self.repo.add(
            RefreshToken(jti=refresh.jti, session_id=session_id, expires_at=refresh.expires_at)
        )
        return TokenPair(
            access_token=access.token,
            refresh_token=refresh.token,
            expires_in=self.settings.access_token_ttl_seconds,
            refresh_expires_in=self.settings.refresh_token_ttl_seconds,
        )


class AuthQueries:
    """The account's read-only routes: no unit of work, statements on the read engine."""

    def __init__(self, reads: ReadConnections) -> None:
        self.repo = AuthReads(reads)

    async def me(self, user_id: uuid.UUID) -> Fields:
        user = await self.repo.user_by_id(user_id)
        if user is None:
            raise ProblemError(401, "unauthorized", "The account no longer exists.")
        return user
