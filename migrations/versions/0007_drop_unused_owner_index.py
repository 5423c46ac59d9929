"""Drop ix_background_tasks_owner_id: no query reads it, and every submit wrote to it.

Every query that looks tasks up by owner (orphan recovery, ``orbiter-bg orphans``) also
asks for active tasks only, and SQLite plans all of them on the status index, which
holds the few active tasks apart from the many finished ones. The owner index was one
b-tree page more in each ``submit``'s commit (one of about ten for a submit and its
result) and grew with every task ever submitted. Downgrading builds it again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_background_tasks_owner_id", table_name="background_tasks")


def downgrade() -> None:
    op.create_index("ix_background_tasks_owner_id", "background_tasks", ["owner_id"])
