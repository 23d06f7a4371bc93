from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response, status

from cloudbot_api.auth.cookies import (
    COOKIE_PATH,
    CSRF_HEADER,
    REFRESH_COOKIE,
    check_browser_request,
    clear_refresh_cookie,
    refresh_cookie,
    set_refresh_cookie,
)
from cloudbot_api.auth.retry import RefreshRetries
from cloudbot_api.auth.schemas import (
    AccessToken,
    LoginRequest,
    RefreshRequest,
    SignupRequest,
    TokenPair,
    UserOut,
)
from cloudbot_api.auth.service import INVALID_CREDENTIALS, AuthQueries, AuthService
from cloudbot_api.deps import (
    AuditorDep,
    ClientAddress,
    CurrentLogin,
    ResourcesDep,
    UowDep,
)
from cloudbot_api.errors import ProblemError, problem_responses
from cloudbot_api.resources import Resources

router = APIRouter(prefix="/auth", tags=["auth"])


async def get_service(uow: UowDep, resources: ResourcesDep, audit: AuditorDep) -> AuthService:
    return AuthService(
        uow,
        passwords=resources.passwords,
        tokens=resources.tokens,
        redis=resources.redis,
        revocations=resources.revocations,
        retries=RefreshRetries(resources.redis, resources.settings.refresh_retry_seconds),
        settings=resources.settings,
        audit=audit,
    )


ServiceDep = Annotated[AuthService, Depends(get_service)]


async def get_queries(resources: ResourcesDep) -> AuthQueries:
    return AuthQueries(resources.read_connections)


QueriesDep = Annotated[AuthQueries, Depends(get_queries)]


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
    # Attempts count per address; only failures count per account, so the owner's logins
    # never do and an attacker at one address cannot lock the owner out from elsewhere:
    # the account's own ceiling is far higher than one address's share of it.
    limiter, settings = resources.limiter, resources.settings
    account = _account_key(body.email)
    failure_limits = (
        (settings.rate_limit_login_failures, f"{account}:ip:{client}"),
        (settings.rate_limit_login_account_failures, account),
    )
    await limiter.hit(settings.rate_limit_login, "login", "ip:" + client)
    for limit, key in failure_limits:
        await limiter.check(limit, "login-failed", key)
    try:
        return await service.login(body.email, body.password, user_agent)
    except ProblemError as exc:
        if exc.code == INVALID_CREDENTIALS.code:
            for limit, key in failure_limits:
                await limiter.count(limit, "login-failed", key)
        raise


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
    return await _rotate(body.refresh_token, service, resources, client)


async def _rotate(
    refresh_token: str, service: AuthService, resources: Resources, client: str
) -> TokenPair:
    limit = resources.settings.rate_limit_refresh
    await resources.limiter.hit(limit, "refresh", "ip:" + client)
    claims = service.decode_refresh(refresh_token)
    await resources.limiter.hit(limit, "refresh", f"user:{claims.user_id}")
    return await service.refresh(claims, refresh_token, client)


@router.get(
    "/me",
    response_model=UserOut,
    summary="The signed-in user",
    responses=problem_responses(401, 403),
)
async def me(principal: CurrentLogin, queries: QueriesDep) -> UserOut:
    return UserOut.model_validate(await queries.me(principal.user_id))


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="End this login session (its access and refresh tokens stop working)",
    responses=problem_responses(401, 403),
)
async def logout(principal: CurrentLogin, service: ServiceDep) -> Response:
    await service.logout(principal.user_id, principal.session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/logout-all",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Sign out everywhere: end every login session of this account",
    description=(
        "Every access and refresh token of the account stops working, this one's too, "
        "and its open desktop and agent connections close."
    ),
    responses=problem_responses(401, 403),
)
async def logout_all(
    principal: CurrentLogin, service: ServiceDep, resources: ResourcesDep
) -> Response:
    await service.logout_all(principal.user_id, actor=principal.actor)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    clear_refresh_cookie(response, resources.settings)
    return response


# The web console: the same login sessions, with the refresh token in a cookie.


@router.post(
    "/web/login",
    response_model=AccessToken,
    summary="Log in from the web console: the refresh token is set as an HttpOnly cookie",
    description=(
        f"Like `/auth/login`, but the refresh token goes into the `{REFRESH_COOKIE}` "
        f"cookie (HttpOnly, SameSite=Strict, path `{COOKIE_PATH}`) and only the access "
        f"token is in the answer. Needs the `{CSRF_HEADER}` header and an `Origin` the "
        "API trusts. Programs use `/auth/login`."
    ),
    responses=problem_responses(401, 403, 413, 422, 429),
)
async def web_login(
    body: LoginRequest,
    request: Request,
    response: Response,
    service: ServiceDep,
    resources: ResourcesDep,
    client: ClientAddress,
    user_agent: Annotated[str | None, Header()] = None,
) -> AccessToken:
    check_browser_request(request, resources.settings)
    pair = await login(body, service, resources, client, user_agent)
    set_refresh_cookie(response, pair.refresh_token, resources.settings)
    return AccessToken.of(pair)


@router.post(
    "/web/refresh",
    response_model=AccessToken,
    summary="A new access token for the web console, from its refresh cookie",
    description=(
        f"Needs the `{CSRF_HEADER}` header and an `Origin` the API trusts. The cookie is "
        "rotated like a refresh token; a reused one ends its login session."
    ),
    responses=problem_responses(401, 403, 429),
)
async def web_refresh(
    request: Request,
    response: Response,
    service: ServiceDep,
    resources: ResourcesDep,
    client: ClientAddress,
) -> AccessToken:
    settings = resources.settings
    check_browser_request(request, settings)
    try:
        pair = await _rotate(refresh_cookie(request), service, resources, client)
    except ProblemError as exc:
        if exc.status != status.HTTP_401_UNAUTHORIZED:
            raise
        # A cookie that no longer works is dropped, so the page shows its sign-in form.
        gone = Response()
        clear_refresh_cookie(gone, settings)
        headers = {**(exc.headers or {}), "Set-Cookie": gone.headers["set-cookie"]}
        raise ProblemError(exc.status, exc.code, exc.detail, headers=headers, **exc.extra) from exc
    set_refresh_cookie(response, pair.refresh_token, settings)
    return AccessToken.of(pair)


@router.post(
    "/web/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Sign the web console out: end the cookie's login session and drop the cookie",
    responses=problem_responses(403),
)
async def web_logout(request: Request, service: ServiceDep, resources: ResourcesDep) -> Response:
    settings = resources.settings
    check_browser_request(request, settings)
    token = request.cookies.get(REFRESH_COOKIE)
    if token:
        try:
            claims = service.decode_refresh(token)
        except ProblemError:
            pass  # nothing to end; the cookie is dropped all the same
        else:
            await service.logout_owned(claims.user_id, claims.session_id)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    clear_refresh_cookie(response, settings)
    return response
