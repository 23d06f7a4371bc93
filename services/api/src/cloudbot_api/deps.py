"""FastAPI dependencies, as `Annotated` aliases the routers use.

Every dependency is `async def`: FastAPI runs a plain `def` dependency in a worker thread,
and that hop cost more than most of these do.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cloudbot_api.audit.service import Auditor
from cloudbot_api.errors import ProblemError
from cloudbot_api.proxies import rate_limit_address
from cloudbot_api.resources import Resources
from cloudbot_api.unit_of_work import UnitOfWork
from cloudbot_common.audit import Origin
from cloudbot_common.security import access_tokens
from cloudbot_common.security.jwt_tokens import TokenError, TokenType
from cloudbot_common.settings import Settings


async def get_resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


async def get_settings(resources: ResourcesDep) -> Settings:
    return resources.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


# Methods that only read: their unit of work runs each statement on its own (autocommit),
# which spares the BEGIN and COMMIT round trips around a single query.
_READ_ONLY_METHODS = frozenset({"GET", "HEAD"})


async def get_uow(resources: ResourcesDep, request: Request) -> AsyncIterator[UnitOfWork]:
    read_only = request.method in _READ_ONLY_METHODS
    factory = resources.read_sessions if read_only else resources.sessions
    async with factory() as session:
        uow = UnitOfWork(session)
        try:
            yield uow
        except BaseException:
            await uow.fail()
            raise
        await uow.commit()


# scope="function": commit before the response is sent, so a 2xx means it is stored.
UowDep = Annotated[UnitOfWork, Depends(get_uow, scope="function")]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="UserToken",
    description="Your access token, from POST /api/auth/login or /api/auth/refresh",
)


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking. A login (access JWT) or a personal access token; for a token,
    `session_id` is the token's id, so that tickets and gateway sessions opened with it end
    when it is revoked, as a login session's do."""

    user_id: uuid.UUID
    session_id: uuid.UUID
    token_id: uuid.UUID | None = None
    scope: str = "write"

    @property
    def actor(self) -> str:
        """How the audit log names who acted."""
        return f"token:{self.token_id}" if self.token_id else f"session:{self.session_id}"


def unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


async def get_principal(
    request: Request,
    resources: ResourcesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise unauthorized("Missing bearer token.")
    if access_tokens.is_personal_token(credentials.credentials):
        return await _token_principal(request, resources, credentials.credentials)
    try:
        claims = resources.tokens.decode(credentials.credentials, TokenType.ACCESS)
    except TokenError as exc:
        raise unauthorized(f"Invalid access token: {exc}.") from exc
    if await resources.revocations.is_revoked(claims.session_id):
        raise unauthorized("This login session has ended.")
    return Principal(user_id=claims.user_id, session_id=claims.session_id)


async def _token_principal(request: Request, resources: Resources, credential: str) -> Principal:
    async with resources.sessions() as session:
        token = await access_tokens.find_active(session, credential)
    if token is None:
        raise unauthorized("Invalid personal access token: unknown, revoked or expired.")
    if token.scope == "read" and request.method not in _SAFE_METHODS:
        raise ProblemError(
            403, "insufficient_scope", "This personal access token may only read (scope read)."
        )
    return Principal(token.user_id, token.id, token_id=token.id, scope=token.scope)


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


async def get_login(principal: CurrentPrincipal) -> Principal:
    """A person's login: the account and token routes refuse personal access tokens, so a
    leaked token cannot mint more tokens or act for the account itself."""
    if principal.token_id is not None:
        raise ProblemError(
            403,
            "login_required",
            "This route needs a login (an access token), not a personal access token.",
        )
    return principal


CurrentLogin = Annotated[Principal, Depends(get_login)]


async def client_ip(request: Request, resources: ResourcesDep) -> str:
    """The client's address, believing X-Forwarded-For only from the configured proxies."""
    peer = request.client.host if request.client else "unknown"
    return resources.proxies.client(peer, request.headers.getlist("x-forwarded-for"))


ClientIp = Annotated[str, Depends(client_ip)]


async def client_address(ip: ClientIp) -> str:
    """The client's address as rate limits count it: an IPv6 client by its /64."""
    return rate_limit_address(ip)


ClientAddress = Annotated[str, Depends(client_address)]


async def get_auditor(uow: UowDep, request: Request, client: ClientIp) -> Auditor:
    origin = Origin(
        address=client,
        user_agent=request.headers.get("user-agent"),
        request_id=getattr(request.state, "request_id", None),
    )
    return Auditor(uow, origin=origin)


AuditorDep = Annotated[Auditor, Depends(get_auditor)]
