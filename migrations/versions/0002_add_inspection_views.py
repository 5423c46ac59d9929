"""Add the inspection views v_tasks and v_pending (for the sqlite3 CLI).

Views only: no table changes, so ``schema.py``'s metadata does not mention them.

Caution for later revisions: SQLite checks every view when a table is renamed, so an
Alembic batch operation that rebuilds ``background_tasks`` or ``pending_queue`` (copy,
drop, ``ALTER TABLE ... RENAME``) fails with "error in view v_tasks: no such table" while
these views exist. Such a revision must drop the views first and create them again after.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Timestamps are stored as UTC text ``YYYY-MM-DD HH:MM:SS.ffffff``; the views show them to
# the second and compute durations in seconds with julianday() (days, as a real number).
V_TASKS = """
CREATE VIEW v_tasks (
    task_id, parent_task_id, status, merge_mode, created_utc, updated_utc,
    duration_s, age_s, is_pending, payload, result, error
) AS
SELECT
    t.task_id,
    t.parent_task_id,
    t.status,
    t.merge_mode,
    strftime('%Y-%m-%d %H:%M:%S', t.created_at),
    strftime('%Y-%m-%d %H:%M:%S', t.updated_at),
    CASE WHEN t.status IN ('success', 'failed', 'timeout')
        THEN round((julianday(t.updated_at) - julianday(t.created_at)) * 86400.0, 3)
    END,
    round((julianday('now') - julianday(t.created_at)) * 86400.0, 1),
    EXISTS (SELECT 1 FROM pending_queue AS p WHERE p.task_id = t.task_id),
    t.payload,
    t.result,
    t.error
FROM background_tasks AS t
"""

V_PENDING = """
CREATE VIEW v_pending (
    seq, task_id, parent_task_id, status, merge_mode, enqueued_utc, waiting_s, result, payload
) AS
SELECT
    p.seq,
    t.task_id,
    t.parent_task_id,
    t.status,
    t.merge_mode,
    strftime('%Y-%m-%d %H:%M:%S', p.enqueued_at),
    round((julianday('now') - julianday(p.enqueued_at)) * 86400.0, 1),
    t.result,
    t.payload
FROM pending_queue AS p
JOIN background_tasks AS t ON t.task_id = p.task_id
ORDER BY p.seq
"""


def upgrade() -> None:
    op.execute(V_TASKS)
    op.execute(V_PENDING)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS v_pending")
    op.execute("DROP VIEW IF EXISTS v_tasks")
