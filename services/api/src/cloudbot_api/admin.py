"""Operator commands: `cloudbot-admin rotate-encryption-key`.

Rotation: put a new key first in ENCRYPTION_KEY (keeping the old ones after it), deploy,
then run this to re-encrypt every stored provider key under the newest key. Afterwards the
old keys can be dropped from ENCRYPTION_KEY.
"""

from __future__ import annotations

import argparse
import asyncio

from sqlalchemy import select

from cloudbot_common.db import create_engine, create_session_factory, unit_of_work
from cloudbot_common.logging import configure_logging, get_logger
from cloudbot_common.models import ApiKey
from cloudbot_common.security.vault import Vault
from cloudbot_common.settings import get_settings

log = get_logger("cloudbot_api.admin")
BATCH = 500


async def rotate_encryption_key() -> int:
    settings = get_settings()
    vault = Vault(settings.encryption_key.get_secret_value())
    engine = create_engine(settings, pool_size=1)
    sessions = create_session_factory(engine)
    rotated = 0
    last_id = None
    try:
        while True:
            # One short transaction per batch, rows locked while they are rewritten.
            async with unit_of_work(sessions) as session:
                query = select(ApiKey).order_by(ApiKey.id).limit(BATCH).with_for_update()
                if last_id is not None:
                    query = query.where(ApiKey.id > last_id)
                rows = (await session.scalars(query)).all()
                for row in rows:
                    row.ciphertext = vault.rotate(row.ciphertext)
                rotated += len(rows)
            if len(rows) < BATCH:
                break
            last_id = rows[-1].id
    finally:
        await engine.dispose()
    return rotated


def main() -> None:
    parser = argparse.ArgumentParser(prog="cloudbot-admin")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "rotate-encryption-key", help="re-encrypt every provider key under the newest key"
    )
    args = parser.parse_args()
    settings = get_settings()
    configure_logging("admin", level=settings.log_level, json_output=settings.log_json)
    if args.command == "rotate-encryption-key":
        count = asyncio.run(rotate_encryption_key())
        log.info("provider keys re-encrypted under the newest key", count=count)
        print(f"re-encrypted {count} provider keys")


if __name__ == "__main__":
    main()
