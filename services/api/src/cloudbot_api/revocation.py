"""Announcing a committed revocation (a login session ended, a personal access token
revoked) to every service, failing closed: if Redis will not take it, the request answers
503 `revocation_pending` rather than report a success while the access tokens and gateway
sessions live on. They are refused here at once all the same, and everywhere within
seconds (see `cloudbot_common.revocations`)."""

from __future__ import annotations

import uuid

from cloudbot_api.errors import ProblemError
from cloudbot_api.unit_of_work import UnitOfWork
from cloudbot_common.logging import get_logger
from cloudbot_common.revocations import REDIS_FAILURES, RevocationWatch

log = get_logger(__name__)


def announce_after_commit(
    uow: UnitOfWork,
    revocations: RevocationWatch,
    ids: list[uuid.UUID],
    *,
    detail: str,
    remember_seconds: int | None = None,
) -> None:
    """Once the revocation of `ids` has committed, tell every service; if that fails,
    answer 503 with `detail` (what happens to the revoked tokens meanwhile)."""

    async def announce() -> None:
        try:
            await revocations.announce(ids, remember_seconds=remember_seconds)
        except REDIS_FAILURES as exc:
            log.error("revocation committed but not yet announced", error=type(exc).__name__)
            raise ProblemError(
                503, "revocation_pending", detail, headers={"Retry-After": "5"}
            ) from None

    if ids:
        uow.after_commit(announce, required=True)
