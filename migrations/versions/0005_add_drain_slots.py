"""Add drain_slots: which drain records its progress in which slot of the <db>-acks file.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "drain_slots",
        sa.Column("slot", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("claimer", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("slot", name="pk_drain_slots"),
        sa.UniqueConstraint("claimer", name="uq_drain_slots_claimer"),
    )


def downgrade() -> None:
    op.drop_table("drain_slots")
