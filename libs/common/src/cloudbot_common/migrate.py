"""`python -m cloudbot_common.migrate [upgrade|downgrade|check] [revision]`.

Runs Alembic with a configuration built in code, so any service image can migrate
without an alembic.ini beside it. Creates the database first when it does not exist.
"""

from __future__ import annotations

import asyncio
import sys
from functools import lru_cache
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from cloudbot_common.settings import get_settings

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(rev)s_%%(slug)s")
    url = database_url or get_settings().database_url
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@lru_cache
def head_revision() -> str | None:
    """The newest revision in the migrations folder (what a migrated database is at)."""
    return ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_current_head()


async def ensure_database(database_url: str) -> None:
    """Create the target database if missing (connecting to the `postgres` database)."""
    url = make_url(database_url)
    admin = url.set(drivername="postgresql", database="postgres")
    conn = await asyncpg.connect(admin.render_as_string(hide_password=False))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", url.database)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{url.database}"')
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    action = args[0] if args else "upgrade"
    revision = args[1] if len(args) > 1 else ("head" if action == "upgrade" else "base")
    url = get_settings().database_url
    cfg = alembic_config(url)
    if action == "upgrade":
        asyncio.run(ensure_database(url))
        command.upgrade(cfg, revision)
    elif action == "downgrade":
        command.downgrade(cfg, revision)
    elif action == "check":
        command.check(cfg)
    else:
        raise SystemExit(f"unknown action {action!r}: use upgrade, downgrade or check")


if __name__ == "__main__":
    main()
