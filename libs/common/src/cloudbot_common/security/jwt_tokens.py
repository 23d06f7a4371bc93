"""Access and refresh JWTs: HS256 with separate secrets, a key id, and strict checks."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import jwt

from cloudbot_common.settings import Settings

ALGORITHM = "HS256"
# Clock skew between replicas that an expiry check forgives.
LEEWAY_SECONDS = 5
_REQUIRED = ["exp", "iat", "iss", "aud", "sub", "jti", "typ", "sid"]
# Access tokens verified lately, by their exact text: a client sends the same token with
# every request for its whole life, and verifying it again costs more than the rest of a
# small request's authentication. Only the expiry depends on the time; it is checked on
# every use. Keys change only with a restart, so a verdict never goes stale otherwise.
_VERIFIED_CACHE_SIZE = 4096


class TokenType(StrEnum):
    ACCESS = "access"
    REFRESH = "refresh"


class TokenError(Exception):
    """The token is not acceptable. Its message is safe to show; it never quotes the token."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: uuid.UUID
    session_id: uuid.UUID
    jti: uuid.UUID
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    jti: uuid.UUID
    expires_at: datetime


class TokenCodec:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._kid = settings.jwt_key_id
        # kid -> secret, per token type. Only the current kid signs; older kids verify.
        self._keys: dict[TokenType, dict[str, str]] = {
            TokenType.ACCESS: {
                kid: s.get_secret_value() for kid, s in settings.jwt_previous_access_secrets.items()
            }
            | {self._kid: settings.jwt_access_secret.get_secret_value()},
            TokenType.REFRESH: {self._kid: settings.jwt_refresh_secret.get_secret_value()},
        }
        self._verified: dict[str, TokenClaims] = {}
        self._ttl = {
            TokenType.ACCESS: timedelta(seconds=settings.access_token_ttl_seconds),
            TokenType.REFRESH: timedelta(seconds=settings.refresh_token_ttl_seconds),
        }

    def issue(
        self,
        typ: TokenType,
        user_id: uuid.UUID,
        session_id: uuid.UUID,
        *,
        now: datetime | None = None,
    ) -> IssuedToken:
        now = now or datetime.now(UTC)
        jti = uuid.uuid4()
        expires_at = now + self._ttl[typ]
        claims: dict[str, Any] = {
            "iss": self._settings.jwt_issuer,
            "aud": self._settings.jwt_audience,
            "sub": str(user_id),
            "sid": str(session_id),
            "jti": str(jti),
            "typ": typ.value,
            "iat": now,
            "exp": expires_at,
        }
        token = jwt.encode(
            claims, self._keys[typ][self._kid], algorithm=ALGORITHM, headers={"kid": self._kid}
        )
        return IssuedToken(token=token, jti=jti, expires_at=expires_at)

    def decode(self, token: str, typ: TokenType) -> TokenClaims:
        if typ is not TokenType.ACCESS:
            return self._decode(token, typ)
        claims = self._verified.get(token)
        if claims is None:
            claims = self._decode(token, typ)
            if len(self._verified) >= _VERIFIED_CACHE_SIZE:
                del self._verified[next(iter(self._verified))]  # the oldest entry
            self._verified[token] = claims
        elif claims.expires_at.timestamp() + LEEWAY_SECONDS <= time.time():
            del self._verified[token]
            raise TokenError("token expired")
        return claims

    def _decode(self, token: str, typ: TokenType) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError("malformed token") from exc
        if header.get("alg") != ALGORITHM:
            raise TokenError("unexpected token algorithm")
        secret = self._keys[typ].get(str(header.get("kid")))
        if secret is None:
            raise TokenError("unknown signing key")
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                audience=self._settings.jwt_audience,
                issuer=self._settings.jwt_issuer,
                options={"require": _REQUIRED},
                leeway=LEEWAY_SECONDS,
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenError("token expired") from exc
        except jwt.PyJWTError as exc:
            raise TokenError("invalid token") from exc
        if claims.get("typ") != typ.value:
            raise TokenError("wrong token type")
        try:
            return TokenClaims(
                user_id=uuid.UUID(claims["sub"]),
                session_id=uuid.UUID(claims["sid"]),
                jti=uuid.UUID(claims["jti"]),
                expires_at=datetime.fromtimestamp(claims["exp"], UTC),
            )
        except (ValueError, TypeError) as exc:
            raise TokenError("invalid token claims") from exc
