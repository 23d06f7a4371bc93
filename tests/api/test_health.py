"""Readiness tells an operator when the database is behind the code."""

import asyncio
import secrets

from cloudbot_common.migrate import head_revision
from tests.support.api import api_process
from tests.support.clients import api_client
from tests.support.databases import database_url, drop_database, migrate


async def test_readyz_reports_migrations_behind_head(base_env):
    name = f"cloudbot_behind_{secrets.token_hex(4)}"
    url = database_url(name)
    await asyncio.to_thread(migrate, url, "0001")
    try:
        with api_process({**base_env, "DATABASE_URL": url}, "api-behind") as api:
            async with api_client(api) as client:
                r = await client.get("/readyz")
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["postgres"] == "ok"
        assert checks["redis"] == "ok"
        assert checks["migrations"] == f"at 0001, head is {head_revision()}"
    finally:
        await drop_database(name)
