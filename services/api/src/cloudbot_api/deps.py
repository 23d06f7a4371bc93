"""FastAPI dependencies, as `Annotated` aliases the routers use."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cloudbot_api.errors import ProblemError
from cloudbot_api.resources import Resources
from cloudbot_api.unit_of_work import UnitOfWork
from cloudbot_common.events import is_login_session_revoked
from cloudbot_common.security.jwt_tokens import TokenError, TokenType
from cloudbot_common.settings import Settings


def get_resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


def get_settings(resources: ResourcesDep) -> Settings:
    return resources.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_uow(resources: ResourcesDep) -> AsyncIterator[UnitOfWork]:
    async with resources.sessions() as session:
        uow = UnitOfWork(session)
        try:
            yield uow
        except BaseException:
            await uow.fail()
            raise
        await uow.commit()


# scope="function": commit before the response is sent, so a 2xx means it is stored.
UowDep = Annotated[UnitOfWork, Depends(get_uow, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="Access token from /api/auth/login")


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: uuid.UUID
    session_id: uuid.UUID


def unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


async def get_principal(
    resources: ResourcesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise unauthorized("Missing bearer token.")
    try:
        claims = resources.tokens.decode(credentials.credentials, TokenType.ACCESS)
    except TokenError as exc:
        raise unauthorized(f"Invalid access token: {exc}.") from exc
    if await is_login_session_revoked(resources.redis, claims.session_id):
        raise unauthorized("This login session has ended.")
    return Principal(user_id=claims.user_id, session_id=claims.session_id)


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


@lru_cache(maxsize=8)
def _networks(
    proxies: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def client_address(request: Request, settings: SettingsDep) -> str:
    """The client's address, believing X-Forwarded-For only from configured proxies."""
    peer = request.client.host if request.client else "unknown"
    if not settings.trusted_proxies:
        return peer
    trusted = _networks(tuple(settings.trusted_proxies))

    def is_trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in trusted)

    if not is_trusted(peer):
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            return hop
    return peer


ClientAddress = Annotated[str, Depends(client_address)]
