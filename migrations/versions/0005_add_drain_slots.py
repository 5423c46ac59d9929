"""Add drain_slots (which drain records its progress in which slot of the <db>-acks file)
and owners.records_acks (handlers that know that file: until every live handler does,
drains remove each item with a commit of its own, as before).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

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
    op.add_column(
        "owners",
        sa.Column("records_acks", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )


def downgrade() -> None:
    # Merged items of a drain that holds a slot are rows only the -acks file tells apart:
    # without the table they would be delivered again. Refuse until no drain holds one.
    held = 0 if context.is_offline_mode() else _slots_held()
    if held:
        raise RuntimeError(
            f"cannot downgrade below 0005 while {held} drain(s) hold a slot of the -acks "
            "file: let running drains finish, and open a handler once, which settles the "
            "drains of killed processes"
        )
    op.drop_column("owners", "records_acks")
    op.drop_table("drain_slots")


def _slots_held() -> int:
    # (Offline, with --sql, there is no file to look at: the script goes on as written.)
    return int(op.get_bind().execute(sa.text("SELECT count(*) FROM drain_slots")).scalar() or 0)
