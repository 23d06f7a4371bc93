from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from cloudbot_api.audit.schemas import AuditPage
from cloudbot_api.audit.service import AuditService
from cloudbot_api.deps import CurrentPrincipal, UowDep
from cloudbot_api.errors import problem_responses
from cloudbot_api.pagination import Before, Limit

router = APIRouter(prefix="/user/audit", tags=["audit"])


async def get_service(uow: UowDep) -> AuditService:
    return AuditService(uow)


ServiceDep = Annotated[AuditService, Depends(get_service)]


@router.get(
    "",
    response_model=AuditPage,
    summary="Your account's audit log, newest first",
    description=(
        "Security-relevant actions on your account: sign-ups and logins (failed ones too), "
        "logouts, refresh-token reuse, provider keys, personal access tokens, webhooks, "
        "instance commands and desktop or agent sessions, each with its time, actor, "
        "address, user agent and request id. Page with `before`."
    ),
    responses=problem_responses(401, 422),
)
async def audit_log(
    principal: CurrentPrincipal,
    service: ServiceDep,
    before: Before = None,
    limit: Limit = 50,
) -> AuditPage:
    return await service.page(principal.user_id, before, limit)
