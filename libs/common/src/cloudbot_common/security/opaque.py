"""Opaque random tokens (bootstrap tokens, instance credentials, tickets) and their digests."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

from cloudbot_common.instance_contract import AGENT_PREFIX


def new_token(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What is stored in place of a token: looking it up needs the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def agent_credential(secret: str, instance_id: uuid.UUID) -> str:
    """The credential an instance's agent expects on its WebSocket.

    Derived rather than stored: the gateway recomputes it per connection and the instance
    receives it once, at bootstrap. Rotating AGENT_TOKEN_SECRET rotates every credential.
    """
    mac = hmac.new(secret.encode(), b"agent:" + instance_id.bytes, hashlib.sha256)
    return AGENT_PREFIX + mac.hexdigest()
