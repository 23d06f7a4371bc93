"""Opaque random tokens (bootstrap tokens, instance credentials, tickets) and their digests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from datetime import datetime

from cloudbot_common.instance_contract import AGENT_PREFIX, BOOTSTRAP_PREFIX


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


def bootstrap_token(secret: str, instance_id: uuid.UUID, expires_at: datetime) -> str:
    """The token an instance's machine presents, once, to fetch its configuration.

    Derived from the instance and the token's expiry rather than drawn at random: a launch
    retried after a crash, which may not see the first attempt's machine yet, carries the
    same token, so whichever machine is finally adopted can bootstrap (and on EC2 the same
    ClientToken returns the first machine instead of making another). Only the digest is
    stored; a new expiry makes a new token.
    """
    stamp = round(expires_at.timestamp() * 1_000_000).to_bytes(8, "big")  # microseconds
    mac = hmac.new(secret.encode(), b"bootstrap:" + instance_id.bytes + stamp, hashlib.sha256)
    return BOOTSTRAP_PREFIX + base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()
