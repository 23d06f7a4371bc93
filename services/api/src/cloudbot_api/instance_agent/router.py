"""Endpoints the CloudBot machine itself calls: bootstrap and heartbeats. Never users."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cloudbot_api.deps import ResourcesDep, UowDep
from cloudbot_api.errors import ProblemError, problem_responses
from cloudbot_api.instance_agent.config import render_config
from cloudbot_api.instance_agent.repository import InstanceAgentRepository
from cloudbot_api.instance_agent.schemas import BootstrapOut, HeartbeatIn
from cloudbot_common.instance_contract import (
    BOOTSTRAP_PATH,
    CREDENTIAL_PREFIX,
    HEARTBEAT_PATH,
)
from cloudbot_common.logging import get_logger
from cloudbot_common.models import InstanceState
from cloudbot_common.providers import Provider
from cloudbot_common.security.opaque import agent_credential, new_token, token_digest
from cloudbot_common.security.vault import VaultError

router = APIRouter(tags=["instance agent"])
log = get_logger(__name__)
_bearer = HTTPBearer(auto_error=False, description="Bootstrap token or instance credential")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

HEARTBEAT_INTERVAL_SECONDS = 30
_GONE = (InstanceState.TERMINATING, InstanceState.TERMINATED, InstanceState.FAILED)


def _refuse(code: str) -> ProblemError:
    return ProblemError(
        401, code, "Not a valid credential.", headers={"WWW-Authenticate": "Bearer"}
    )


@router.post(
    BOOTSTRAP_PATH,
    response_model=BootstrapOut,
    summary="Exchange the single-use bootstrap token for configuration and a credential",
    responses=problem_responses(401),
)
async def bootstrap(creds: BearerDep, uow: UowDep, resources: ResourcesDep) -> BootstrapOut:
    if creds is None:
        raise _refuse("invalid_bootstrap_token")
    repo = InstanceAgentRepository(uow.session)
    instance = await repo.by_bootstrap_digest_for_update(token_digest(creds.credentials))
    now = datetime.now(UTC)
    if (
        instance is None
        or instance.bootstrap_expires_at is None
        or instance.bootstrap_expires_at <= now
        or instance.state in _GONE
    ):
        raise _refuse("invalid_bootstrap_token")
    credential = new_token(CREDENTIAL_PREFIX)
    instance.bootstrap_token_hash = None  # single use
    instance.bootstrap_expires_at = None
    instance.credential_hash = token_digest(credential)

    keys: dict[Provider, str] = {}
    for row in await repo.owner_keys(instance.owner_id):
        try:
            keys[Provider(row.provider)] = resources.vault.decrypt(
                row.user_id, row.provider, row.ciphertext
            )
        except (VaultError, ValueError):
            log.warning("stored key unusable; left out", provider=row.provider)
    settings = resources.settings
    agent_token = agent_credential(settings.agent_token_secret.get_secret_value(), instance.id)
    log.info("instance bootstrapped", instance_id=str(instance.id), providers=sorted(keys))
    return BootstrapOut(
        instance_id=instance.id,
        credential=credential,
        agent_token=agent_token,
        config=render_config(instance, keys, agent_token),
        heartbeat_url=settings.public_api_url.rstrip("/") + HEARTBEAT_PATH,
        heartbeat_interval_seconds=HEARTBEAT_INTERVAL_SECONDS,
    )


@router.post(
    HEARTBEAT_PATH,
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Report desktop and agent health",
    responses=problem_responses(401, 422),
)
async def heartbeat(body: HeartbeatIn, creds: BearerDep, uow: UowDep) -> Response:
    if creds is None:
        raise _refuse("invalid_instance_credential")
    repo = InstanceAgentRepository(uow.session)
    instance = await repo.by_credential_digest(token_digest(creds.credentials))
    if instance is None or instance.state in _GONE:
        raise _refuse("invalid_instance_credential")
    instance.desktop_healthy = body.desktop
    instance.agent_healthy = body.agent
    instance.last_heartbeat_at = datetime.now(UTC)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
