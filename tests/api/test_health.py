"""Readiness tells an operator when the database is behind the code."""

import os
import secrets
import subprocess

import asyncpg

from cloudbot_common.migrate import head_revision
from tests.api.test_instances import api_with
from tests.conftest import PG_ADMIN
from tests.support.processes import PYTHON


async def test_readyz_reports_migrations_behind_head(base_env):
    name = f"cloudbot_behind_{secrets.token_hex(4)}"
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    subprocess.run(
        [PYTHON, "-m", "cloudbot_common.migrate", "upgrade", "0001"],
        env={**os.environ, "DATABASE_URL": url},
        check=True,
    )
    try:
        async with api_with(base_env, DATABASE_URL=url) as client:
            r = await client.get("/readyz")
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["postgres"] == "ok"
        assert checks["redis"] == "ok"
        assert checks["migrations"] == f"at 0001, head is {head_revision()}"
    finally:
        conn = await asyncpg.connect(PG_ADMIN)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
