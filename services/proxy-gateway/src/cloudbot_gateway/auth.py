"""Who is asking: the Origin allow-list and the two kinds of credential.

Programs send `Authorization: Bearer <access token>` (a login's JWT, or a personal access
token, checked against the database); browsers, which cannot set headers on a WebSocket,
send `?ticket=<one-time ticket>`. An access token in the URL is refused, since
URLs end up in proxy logs and browser history. Nothing here logs a credential or a URL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from http import HTTPStatus

from redis.asyncio import Redis
from websockets.datastructures import Headers

from cloudbot_common.db import SessionFactory
from cloudbot_common.revocations import RevocationWatch
from cloudbot_common.security import access_tokens
from cloudbot_common.security.jwt_tokens import TokenCodec, TokenError, TokenType
from cloudbot_common.tickets import Channel, redeem_ticket
from cloudbot_gateway.refusals import Refusal

# Query parameters that would carry a bearer credential in the URL.
_URL_TOKEN_PARAMS = frozenset({"access_token", "token", "jwt", "bearer", "authorization"})
_JWT_PREFIX = "eyJ"


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: uuid.UUID
    session_id: uuid.UUID
    via: str  # "bearer", "token" (a personal access token) or "ticket"


def _unauthorized(code: str, detail: str) -> Refusal:
    return Refusal(HTTPStatus.UNAUTHORIZED, code, detail)


class Authenticator:
    def __init__(
        self,
        codec: TokenCodec,
        redis: Redis,
        sessions: SessionFactory,
        allowed_origins: list[str],
        *,
        revocations: RevocationWatch,
    ) -> None:
        self._codec = codec
        self._redis = redis
        self._sessions = sessions
        self._revocations = revocations
        self._origins = frozenset(allowed_origins)

    def check_origin(self, headers: Headers) -> None:
        """Browsers always send Origin; programs send none and are let through to the
        credential check (a program has no ambient cookies a foreign page could ride on)."""
        origins = headers.get_all("Origin")
        if not origins:
            return
        if len(origins) > 1 or origins[0] not in self._origins:
            raise Refusal(HTTPStatus.FORBIDDEN, "origin_not_allowed", "Origin not allowed.")

    async def authenticate(
        self,
        headers: Headers,
        query: dict[str, list[str]],
        instance_id: uuid.UUID,
        channel: Channel,
    ) -> Principal:
        if not _URL_TOKEN_PARAMS.isdisjoint(k.lower() for k in query):
            raise _unauthorized(
                "token_in_url", "Access tokens are not accepted in the URL; use a ticket."
            )
        authorizations = headers.get_all("Authorization")
        if authorizations:
            principal = await self._bearer(authorizations)
        else:
            principal = await self._ticket(query.get("ticket"), instance_id, channel)
        if await self._revocations.is_revoked(principal.session_id):
            raise _unauthorized("session_revoked", "The login session has ended.")
        return principal

    async def _bearer(self, authorizations: list[str]) -> Principal:
        scheme, _, token = authorizations[0].partition(" ")
        if len(authorizations) > 1 or scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("invalid_credential", "Malformed Authorization header.")
        if access_tokens.is_personal_token(token.strip()):
            # Checked against the database: a revoked token is refused at once.
            async with self._sessions() as session:
                row = await access_tokens.find_active(session, token.strip())
            if row is None:
                raise _unauthorized(
                    "invalid_credential", "Unknown, revoked or expired personal access token."
                )
            if row.scope != "write":  # a desktop or agent session drives the machine
                raise Refusal(
                    HTTPStatus.FORBIDDEN,
                    "insufficient_scope",
                    "A personal access token with scope write is needed here.",
                )
            return Principal(row.user_id, row.id, "token")
        try:
            claims = self._codec.decode(token.strip(), TokenType.ACCESS)
        except TokenError as exc:
            raise _unauthorized("invalid_credential", str(exc)) from None
        return Principal(claims.user_id, claims.session_id, "bearer")

    async def _ticket(
        self, values: list[str] | None, instance_id: uuid.UUID, channel: Channel
    ) -> Principal:
        if not values:
            raise _unauthorized(
                "no_credential", "Send Authorization: Bearer <access token> or ?ticket=."
            )
        if len(values) > 1 or values[0].startswith(_JWT_PREFIX):
            raise _unauthorized(
                "token_in_url", "Access tokens are not accepted in the URL; use a ticket."
            )
        # Redeeming consumes the ticket whatever happens next: a ticket shown for the wrong
        # instance or channel is as spent as one that got through.
        ticket = await redeem_ticket(self._redis, values[0])
        if ticket is None or ticket.instance_id != instance_id or ticket.channel is not channel:
            raise _unauthorized(
                "ticket_invalid",
                "The ticket is unknown, expired or used, or not for this instance and channel.",
            )
        return Principal(ticket.user_id, ticket.session_id, "ticket")
