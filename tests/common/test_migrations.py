"""Migrations: up, down to nothing, up again, and agreement with the models."""

import asyncio
import os
import secrets
import subprocess

import asyncpg

from tests.support.databases import database_url, drop_database
from tests.support.processes import PYTHON


def migrate(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "cloudbot_common.migrate", *args],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
    )


async def tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {r["tablename"] for r in rows}


def test_upgrade_downgrade_upgrade_and_models_agree():
    name = f"cloudbot_migrations_{secrets.token_hex(4)}"
    url = database_url(name)
    try:
        # upgrade creates the database itself.
        assert migrate(url, "upgrade", "head").returncode == 0
        assert {"users", "instances", "outbox_commands", "api_keys"} <= asyncio.run(tables(url))
        check = migrate(url, "check")
        assert check.returncode == 0, check.stderr
        down = migrate(url, "downgrade", "base")
        assert down.returncode == 0, down.stderr
        assert asyncio.run(tables(url)) == {"alembic_version"}
        assert migrate(url, "upgrade", "head").returncode == 0
        assert migrate(url, "check").returncode == 0
    finally:
        asyncio.run(drop_database(name))
