"""Operator commands, run as their own process against the stored rows."""

from __future__ import annotations

import os
import subprocess

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from cloudbot_common.models import ApiKey
from cloudbot_common.security.vault import Vault, VaultError
from cloudbot_common.settings import DEV_ENCRYPTION_KEY
from tests.support.leaks import fake_key
from tests.support.processes import PYTHON
from tests.support.users import user_id


async def test_key_rotation_command_reencrypts_every_row(http, user, db_engine, api_server):
    key = fake_key()
    await http.post(
        "/api/user/api-keys", json={"provider": "mistral", "key": key}, headers=user.headers
    )
    uid = await user_id(http, user)
    old = api_server.env.get("ENCRYPTION_KEY") or os.environ.get("ENCRYPTION_KEY")
    old = old or DEV_ENCRYPTION_KEY
    new = Fernet.generate_key().decode()
    result = subprocess.run(
        [PYTHON, "-m", "cloudbot_api.admin", "rotate-encryption-key"],
        env={**os.environ, **api_server.env, "ENCRYPTION_KEY": f"{new},{old}"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "re-encrypted" in result.stdout
    assert key not in result.stdout + result.stderr
    async with db_engine.connect() as conn:
        ciphertext = await conn.scalar(select(ApiKey.ciphertext).where(ApiKey.user_id == uid))
    assert ciphertext is not None
    # Only the new key is needed now; the old one alone no longer opens it.
    assert Vault(new).decrypt(uid, "mistral", ciphertext) == key
    with pytest.raises(VaultError):
        Vault(old).decrypt(uid, "mistral", ciphertext)
