"""A refresh retried after a lost answer gets the same new pair.

Each refresh keeps the pair it issued in Redis for REFRESH_RETRY_SECONDS, under the used
token's id, encrypted with a key derived from the used refresh token itself (which Redis
never holds), together with a digest of the client it was given to. The same token from
the same client within that window decrypts it; anything else is a reuse and ends the
login session.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.asyncio import Redis

from cloudbot_api.auth.schemas import TokenPair
from cloudbot_common.logging import get_logger
from cloudbot_common.revocations import REDIS_FAILURES

log = get_logger(__name__)

_KEY = "cloudbot:refresh-retry:{}"


def _box(refresh_token: str) -> Fernet:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"cloudbot refresh retry"
    ).derive(refresh_token.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def _client_digest(client: str) -> str:
    return hashlib.sha256(client.encode()).hexdigest()


class RefreshRetries:
    def __init__(self, redis: Redis, window_seconds: int) -> None:
        self._redis = redis
        self.window = window_seconds

    async def remember(
        self, jti: uuid.UUID, refresh_token: str, client: str, pair: TokenPair
    ) -> None:
        """Keep `pair`, issued for `refresh_token`, for a retry by `client`. Best effort:
        without it, a retry is a reuse (the safe side)."""
        if self.window <= 0:
            return
        sealed = _box(refresh_token).encrypt(
            json.dumps({"client": _client_digest(client), "pair": pair.model_dump()}).encode()
        )
        try:
            await self._redis.set(_KEY.format(jti), sealed.decode(), ex=self.window)
        except REDIS_FAILURES as exc:
            log.warning("refresh kept for no retry", error=type(exc).__name__)

    async def recall(self, jti: uuid.UUID, refresh_token: str, client: str) -> TokenPair | None:
        """The pair issued for `refresh_token`, if `client` asks again within the window."""
        if self.window <= 0:
            return None
        try:
            sealed = await self._redis.get(_KEY.format(jti))
        except REDIS_FAILURES:
            return None
        if sealed is None:
            return None
        try:
            kept = json.loads(_box(refresh_token).decrypt(sealed.encode()))
        except InvalidToken:
            return None
        if kept["client"] != _client_digest(client):
            return None
        return TokenPair.model_validate(kept["pair"])
