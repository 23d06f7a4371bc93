"""Personal access tokens: made and shown once, listed by hint, revoked at once everywhere
(the API checks the database on every use; the gateway closes the token's sessions on the
revocation's event, and re-checks the database for them every 30 seconds)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cloudbot_api.audit.service import Auditor
from cloudbot_api.errors import ProblemError
from cloudbot_api.revocation import announce_after_commit
from cloudbot_api.tokens.repository import TokenRepository
from cloudbot_api.tokens.schemas import TokenCreate, TokenCreated, TokenOut
from cloudbot_api.unit_of_work import UnitOfWork
from cloudbot_common.audit import Action
from cloudbot_common.logging import get_logger
from cloudbot_common.models import PersonalAccessToken
from cloudbot_common.revocations import RevocationWatch
from cloudbot_common.security import access_tokens

log = get_logger(__name__)

MAX_TOKENS_PER_USER = 50
# How long the revocation marker outlives the revocation: long enough for every ticket and
# gateway session opened with the token to see it (they are closed on the event at once).
_REVOCATION_MARKER_SECONDS = 24 * 3600


class TokenService:
    def __init__(self, uow: UnitOfWork, *, revocations: RevocationWatch, audit: Auditor) -> None:
        self.uow = uow
        self.repo = TokenRepository(uow.session)
        self.revocations = revocations
        self.audit = audit

    async def list(self, user_id: uuid.UUID) -> Sequence[PersonalAccessToken]:
        return await self.repo.live_for_user(user_id)

    async def create(self, user_id: uuid.UUID, body: TokenCreate, *, actor: str) -> TokenCreated:
        if len(await self.repo.live_for_user(user_id)) >= MAX_TOKENS_PER_USER:
            raise ProblemError(
                409,
                "too_many_tokens",
                f"At most {MAX_TOKENS_PER_USER} tokens per account; revoke one first.",
            )
        token, digest, hint = access_tokens.mint()
        now = datetime.now(UTC)
        row = PersonalAccessToken(
            id=uuid.uuid4(),
            user_id=user_id,
            name=body.name,
            scope=body.scope,
            token_digest=digest,
            hint=hint,
            expires_at=now + timedelta(days=body.expires_in_days) if body.expires_in_days else None,
        )
        await self.repo.add(row)
        await self.repo.save(row)
        self.audit.record(
            Action.TOKEN_CREATED,
            user_id=user_id,
            actor=actor,
            target=f"token:{row.id}",
            name=row.name,
            scope=row.scope,
        )
        log.info("personal access token created", user_id=str(user_id), token_id=str(row.id))
        return TokenCreated(token=token, **TokenOut.model_validate(row).model_dump())

    async def revoke(self, user_id: uuid.UUID, token_id: uuid.UUID, *, actor: str) -> None:
        if not await self.repo.revoke(user_id, token_id, datetime.now(UTC)):
            raise ProblemError(404, "token_not_found", "No such token.")
        self.audit.record(
            Action.TOKEN_REVOKED, user_id=user_id, actor=actor, target=f"token:{token_id}"
        )

        # Tickets and gateway sessions opened with the token carry its id as their session:
        # announcing it ends them on every replica, as a logout does. If it cannot be
        # announced, the answer is 503, not a success while those sessions live on.
        announce_after_commit(
            self.uow,
            self.revocations,
            [token_id],
            detail="The token is revoked and refused by the API, but not every service has "
            "heard of it yet: the desktop and agent sessions opened with it end within "
            "30 seconds.",
            remember_seconds=_REVOCATION_MARKER_SECONDS,
        )
        log.info("personal access token revoked", user_id=str(user_id), token_id=str(token_id))
