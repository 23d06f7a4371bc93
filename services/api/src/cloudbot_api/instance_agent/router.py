"""Endpoints the CloudBot machine itself calls: bootstrap and heartbeats. Never users."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cloudbot_api.deps import ResourcesDep, UowDep
from cloudbot_api.errors import problem_responses
from cloudbot_api.instance_agent.schemas import BootstrapOut, HeartbeatIn
from cloudbot_api.instance_agent.service import InstanceAgentService
from cloudbot_common.instance_contract import BOOTSTRAP_PATH, HEARTBEAT_PATH

router = APIRouter(tags=["instance agent"])
_bearer = HTTPBearer(auto_error=False, description="Bootstrap token or instance credential")


async def bearer_token(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    return creds.credentials if creds else None


BearerToken = Annotated[str | None, Depends(bearer_token)]


async def get_service(uow: UowDep, resources: ResourcesDep) -> InstanceAgentService:
    return InstanceAgentService(
        uow, vault=resources.vault, redis=resources.redis, settings=resources.settings
    )


ServiceDep = Annotated[InstanceAgentService, Depends(get_service)]


@router.post(
    BOOTSTRAP_PATH,
    response_model=BootstrapOut,
    summary="Exchange the single-use bootstrap token for configuration and a credential",
    responses=problem_responses(401),
)
async def bootstrap(token: BearerToken, service: ServiceDep) -> BootstrapOut:
    return await service.bootstrap(token)


@router.post(
    HEARTBEAT_PATH,
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Report desktop and agent health",
    responses=problem_responses(401, 422),
)
async def heartbeat(body: HeartbeatIn, token: BearerToken, service: ServiceDep) -> Response:
    await service.heartbeat(token, body)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
