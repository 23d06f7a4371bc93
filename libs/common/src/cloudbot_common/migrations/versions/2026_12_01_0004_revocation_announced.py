"""Login sessions remember whether their revocation was announced

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 00:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "login_sessions",
        sa.Column("revocation_announced_at", sa.DateTime(timezone=True), nullable=True),
    )
    # Revocations made before this column existed were announced as they were made.
    op.execute(
        "UPDATE login_sessions SET revocation_announced_at = revoked_at "
        "WHERE revoked_at IS NOT NULL"
    )
    op.create_index(
        "ix_login_sessions_unannounced",
        "login_sessions",
        ["id"],
        unique=False,
        postgresql_where=sa.text("revoked_at IS NOT NULL AND revocation_announced_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_login_sessions_unannounced",
        table_name="login_sessions",
        postgresql_where=sa.text("revoked_at IS NOT NULL AND revocation_announced_at IS NULL"),
    )
    op.drop_column("login_sessions", "revocation_announced_at")
