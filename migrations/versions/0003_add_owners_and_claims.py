"""Add owners (one heartbeat row per live handler), task owners and pending-item claims.

Plain ``ADD COLUMN``/``DROP COLUMN`` (no table rebuild), so the views of 0002 stay valid.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "owners",
        sa.Column("owner_id", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("boot_id", sa.String(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("process_start", sa.String(), nullable=True),
        sa.Column("started_at", sa.String(length=26), nullable=False),
        sa.Column("heartbeat_at", sa.String(length=26), nullable=False),
        sa.Column("lease_expires_at", sa.String(length=26), nullable=False),
        sa.Column("closed_at", sa.String(length=26), nullable=True),
        sa.PrimaryKeyConstraint("owner_id", name="pk_owners"),
    )
    op.add_column("background_tasks", sa.Column("owner_id", sa.String(), nullable=True))
    op.create_index("ix_background_tasks_owner_id", "background_tasks", ["owner_id"])
    op.add_column("pending_queue", sa.Column("claimed_by", sa.String(), nullable=True))
    op.add_column("pending_queue", sa.Column("claimed_at", sa.String(length=26), nullable=True))


def downgrade() -> None:
    op.drop_column("pending_queue", "claimed_at")
    op.drop_column("pending_queue", "claimed_by")
    op.drop_index("ix_background_tasks_owner_id", table_name="background_tasks")
    op.drop_column("background_tasks", "owner_id")
    op.drop_table("owners")
