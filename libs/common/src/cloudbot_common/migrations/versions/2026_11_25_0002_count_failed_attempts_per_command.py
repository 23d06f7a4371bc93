"""Count failed attempts per command, shared by every delivery of it

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 23:10:08.618754
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "outbox_commands",
        sa.Column("failed_attempts", sa.Integer(), server_default="0", nullable=False),
    )


def downgrade() -> None:
    op.drop_column("outbox_commands", "failed_attempts")
