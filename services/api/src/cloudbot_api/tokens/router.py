from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Response, status

from cloudbot_api.deps import AuditorDep, CurrentLogin, ResourcesDep, UowDep
from cloudbot_api.errors import problem_responses
from cloudbot_api.tokens.schemas import TokenCreate, TokenCreated, TokenList, TokenOut
from cloudbot_api.tokens.service import TokenService

router = APIRouter(prefix="/user/tokens", tags=["personal access tokens"])

NO_STORE = {"Cache-Control": "no-store"}


async def get_service(uow: UowDep, resources: ResourcesDep, audit: AuditorDep) -> TokenService:
    return TokenService(uow, revocations=resources.revocations, audit=audit)


ServiceDep = Annotated[TokenService, Depends(get_service)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    summary="Create a personal access token (shown once)",
    description=(
        "For programs: send it as `Authorization: Bearer <token>` to the REST API and the "
        "gateway. Only its digest is stored. Needs a login; a token cannot make tokens."
    ),
    responses=problem_responses(401, 403, 409, 413, 422),
)
async def create_token(
    body: TokenCreate, principal: CurrentLogin, service: ServiceDep, response: Response
) -> TokenCreated:
    response.headers.update(NO_STORE)
    return await service.create(principal.user_id, body, actor=principal.actor)


@router.get(
    "",
    response_model=TokenList,
    summary="Your live personal access tokens (hints only)",
    responses=problem_responses(401, 403),
)
async def list_tokens(principal: CurrentLogin, service: ServiceDep) -> TokenList:
    return TokenList(
        items=[TokenOut.model_validate(t) for t in await service.list(principal.user_id)]
    )


@router.delete(
    "/{token_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Revoke a token: refused at once on the API and the gateway",
    responses=problem_responses(401, 403, 404, 422),
)
async def revoke_token(
    token_id: uuid.UUID, principal: CurrentLogin, service: ServiceDep
) -> Response:
    await service.revoke(principal.user_id, token_id, actor=principal.actor)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
