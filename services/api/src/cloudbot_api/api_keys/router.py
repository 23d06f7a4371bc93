from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status

from cloudbot_api.api_keys.schemas import ApiKeyCreate, ApiKeyOut, ApiKeyReplace
from cloudbot_api.api_keys.service import ApiKeyService
from cloudbot_api.deps import AuditorDep, CurrentPrincipal, ResourcesDep, UowDep
from cloudbot_api.errors import problem_responses
from cloudbot_common.providers import Provider

router = APIRouter(prefix="/user/api-keys", tags=["api keys"])


async def get_service(uow: UowDep, resources: ResourcesDep, audit: AuditorDep) -> ApiKeyService:
    return ApiKeyService(uow, vault=resources.vault, audit=audit)


ServiceDep = Annotated[ApiKeyService, Depends(get_service)]


@router.get(
    "",
    response_model=list[ApiKeyOut],
    summary="Stored providers with masked hints",
    responses=problem_responses(401),
)
async def list_keys(principal: CurrentPrincipal, service: ServiceDep) -> list[ApiKeyOut]:
    return [ApiKeyOut.model_validate(k) for k in await service.list(principal.user_id)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyOut,
    summary="Store a provider's API key (encrypted)",
    responses=problem_responses(401, 409, 413, 422),
)
async def create_key(
    body: ApiKeyCreate, principal: CurrentPrincipal, service: ServiceDep
) -> ApiKeyOut:
    return ApiKeyOut.model_validate(
        await service.create(principal.user_id, body.provider, body.key, actor=principal.actor)
    )


@router.put(
    "/{provider}",
    response_model=ApiKeyOut,
    summary="Store or replace the key for a provider",
    responses=problem_responses(401, 413, 422),
)
async def replace_key(
    provider: Provider, body: ApiKeyReplace, principal: CurrentPrincipal, service: ServiceDep
) -> ApiKeyOut:
    return ApiKeyOut.model_validate(
        await service.put(principal.user_id, provider, body.key, actor=principal.actor)
    )


@router.delete(
    "/{provider}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a stored key",
    responses=problem_responses(401, 404, 422),
)
async def delete_key(
    provider: Provider, principal: CurrentPrincipal, service: ServiceDep
) -> Response:
    await service.delete(principal.user_id, provider, actor=principal.actor)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
