"""Endpoints the CloudBot machine itself calls: bootstrap and heartbeats. Never users."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cloudbot_api.deps import ResourcesDep, UowDep
from cloudbot_api.errors import problem_responses
from cloudbot_api.instance_agent.schemas import BootstrapIn, BootstrapOut, HeartbeatIn
from cloudbot_api.instance_agent.service import InstanceAgentService
from cloudbot_common.instance_contract import BOOTSTRAP_PATH, HEARTBEAT_PATH

router = APIRouter(tags=["instance agent"])
# Two schemes of their own, apart from the users' one, so that nobody pressing Authorize
# in Swagger is asked for a machine's token.
_bootstrap_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="BootstrapToken",
    description="The machine's single-use bootstrap token, from its user data. Not for people.",
)
_credential_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="InstanceCredential",
    description="The instance credential bootstrap handed the machine. Not for people.",
)


async def bootstrap_token(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bootstrap_bearer)],
) -> str | None:
    return creds.credentials if creds else None


async def instance_credential(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_credential_bearer)],
) -> str | None:
    return creds.credentials if creds else None


BootstrapTokenDep = Annotated[str | None, Depends(bootstrap_token)]
InstanceCredentialDep = Annotated[str | None, Depends(instance_credential)]


async def get_service(uow: UowDep, resources: ResourcesDep) -> InstanceAgentService:
    return InstanceAgentService(
        uow, vault=resources.vault, redis=resources.redis, settings=resources.settings
    )


ServiceDep = Annotated[InstanceAgentService, Depends(get_service)]


@router.post(
    BOOTSTRAP_PATH,
    response_model=BootstrapOut,
    summary="Exchange the single-use bootstrap token for configuration and a credential",
    responses=problem_responses(401, 422, 503),
)
async def bootstrap(
    token: BootstrapTokenDep, service: ServiceDep, body: BootstrapIn | None = None
) -> BootstrapOut:
    return await service.bootstrap(token, body or BootstrapIn())


@router.post(
    HEARTBEAT_PATH,
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Report desktop and agent health",
    responses=problem_responses(401, 422),
)
async def heartbeat(
    body: HeartbeatIn, token: InstanceCredentialDep, service: ServiceDep
) -> Response:
    await service.heartbeat(token, body)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
