"""Create background_tasks and pending_queue.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "'init', 'running', 'success', 'failed', 'timeout'"
MERGE_MODES = "'hot', 'wakeup'"


def upgrade() -> None:
    op.create_table(
        "background_tasks",
        sa.Column("task_id", sa.String(), nullable=False),
        sa.Column("parent_task_id", sa.String(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("merge_mode", sa.String(length=16), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.String(length=26), nullable=False),
        sa.Column("updated_at", sa.String(length=26), nullable=False),
        sa.CheckConstraint(f"status IN ({STATUSES})", name="ck_background_tasks_status"),
        sa.CheckConstraint(
            f"merge_mode IS NULL OR merge_mode IN ({MERGE_MODES})",
            name="ck_background_tasks_merge_mode",
        ),
        sa.PrimaryKeyConstraint("task_id", name="pk_background_tasks"),
    )
    op.create_index("ix_background_tasks_parent_task_id", "background_tasks", ["parent_task_id"])
    op.create_index(
        "ix_background_tasks_status_created_at", "background_tasks", ["status", "created_at"]
    )
    op.create_table(
        "pending_queue",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(), nullable=False),
        sa.Column("enqueued_at", sa.String(length=26), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["background_tasks.task_id"],
            name="fk_pending_queue_task_id_background_tasks",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name="pk_pending_queue"),
        sa.UniqueConstraint("task_id", name="uq_pending_queue_task_id"),
    )


def downgrade() -> None:
    op.drop_table("pending_queue")
    op.drop_index("ix_background_tasks_status_created_at", table_name="background_tasks")
    op.drop_index("ix_background_tasks_parent_task_id", table_name="background_tasks")
    op.drop_table("background_tasks")
