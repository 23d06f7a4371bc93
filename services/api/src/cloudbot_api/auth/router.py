from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response, status

from cloudbot_api.auth.schemas import (
    LoginRequest,
    RefreshRequest,
    SignupRequest,
    TokenPair,
    UserOut,
)
from cloudbot_api.auth.service import AuthService
from cloudbot_api.deps import ClientAddress, CurrentPrincipal, ResourcesDep, UowDep
from cloudbot_api.errors import problem_responses

router = APIRouter(prefix="/auth", tags=["auth"])


def get_service(uow: UowDep, resources: ResourcesDep) -> AuthService:
    return AuthService(
        uow,
        passwords=resources.passwords,
        tokens=resources.tokens,
        redis=resources.redis,
        settings=resources.settings,
    )


ServiceDep = Annotated[AuthService, Depends(get_service)]


def _account_key(email: str) -> str:
    # Rate-limit keys name the account without storing its email in Redis.
    return "acct:" + hashlib.sha256(email.encode()).hexdigest()[:32]


@router.post(
    "/signup",
    status_code=status.HTTP_201_CREATED,
    response_model=UserOut,
    summary="Create an account",
    responses=problem_responses(409, 413, 422, 429),
)
async def signup(
    body: SignupRequest, service: ServiceDep, resources: ResourcesDep, client: ClientAddress
) -> UserOut:
    await resources.limiter.hit(
        resources.settings.rate_limit_signup, "signup", "ip:" + client, _account_key(body.email)
    )
    return UserOut.model_validate(await service.signup(body.email, body.password))


@router.post(
    "/login",
    response_model=TokenPair,
    summary="Log in: a new login session with an access and a refresh token",
    responses=problem_responses(401, 413, 422, 429),
)
async def login(
    body: LoginRequest,
    service: ServiceDep,
    resources: ResourcesDep,
    client: ClientAddress,
    user_agent: Annotated[str | None, Header()] = None,
) -> TokenPair:
    await resources.limiter.hit(
        resources.settings.rate_limit_login, "login", "ip:" + client, _account_key(body.email)
    )
    return await service.login(body.email, body.password, user_agent)


@router.post(
    "/refresh",
    response_model=TokenPair,
    summary="Trade a refresh token for a new pair (each refresh token works once)",
    description="Presenting an already used refresh token revokes its whole login session.",
    responses=problem_responses(401, 413, 422, 429),
)
async def refresh(
    body: RefreshRequest,
    service: ServiceDep,
    resources: ResourcesDep,
    client: ClientAddress,
) -> TokenPair:
    limit = resources.settings.rate_limit_refresh
    await resources.limiter.hit(limit, "refresh", "ip:" + client)
    claims = service.decode_refresh(body.refresh_token)
    await resources.limiter.hit(limit, "refresh", f"user:{claims.user_id}")
    return await service.refresh(claims)


@router.get(
    "/me", response_model=UserOut, summary="The signed-in user", responses=problem_responses(401)
)
async def me(principal: CurrentPrincipal, service: ServiceDep) -> UserOut:
    return UserOut.model_validate(await service.me(principal.user_id))


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="End this login session (its access and refresh tokens stop working)",
    responses=problem_responses(401),
)
async def logout(principal: CurrentPrincipal, service: ServiceDep) -> Response:
    await service.logout(principal.session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
