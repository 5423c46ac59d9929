"""The one description of the tables: shared by SQLite and PostgreSQL, and by the migrations.

Stored form (what a person sees with the ``sqlite3`` CLI):

* ``status`` and ``merge_mode`` hold the enum string values (``running``, ``hot``, ...).
* ``payload`` and ``result`` hold JSON text, so ``json_extract(result, '$.k')`` works.
  ``result`` is NULL until the task succeeds (a ``None`` result is the JSON text ``null``).
* ``created_at`` / ``updated_at`` / ``enqueued_at`` are UTC text in the form
  ``YYYY-MM-DD HH:MM:SS.ffffff`` (see :func:`orbiter.store.codec.utc_now_text`), which
  SQLite's date functions read and which sorts in time order.
"""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

__all__ = [
    "HEAD_REVISION",
    "KNOWN_REVISIONS",
    "background_tasks",
    "drain_slots",
    "metadata",
    "owners",
    "pending_queue",
]

#: Alembic revisions this code knows, oldest first; the last one is the schema it needs.
#: ``tests/test_migrations.py`` checks these against ``migrations/versions``.
KNOWN_REVISIONS: tuple[str, ...] = ("0001", "0002", "0003", "0004", "0005", "0006")
HEAD_REVISION: str = KNOWN_REVISIONS[-1]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Comparisons joined by OR, not ``status IN (...)``: SQLite builds a temporary b-tree for
# an IN list of more than two constants each time the check runs (every insert and every
# status change), several microseconds a call (migration 0006).
_STATUS_CHECK = " OR ".join(
    f"status = '{status}'" for status in ("init", "running", "success", "failed", "timeout")
)
_MERGE_MODES = "'hot', 'wakeup'"

background_tasks = Table(
    "background_tasks",
    metadata,
    Column("task_id", String, primary_key=True),
    Column("parent_task_id", String, nullable=False),
    Column("status", String(16), nullable=False),
    Column("merge_mode", String(16), nullable=True),
    Column("payload", Text, nullable=False),
    Column("result", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", String(26), nullable=False),
    Column("updated_at", String(26), nullable=False),
    # The handler that submitted the task (owners.owner_id); settles orphans.
    Column("owner_id", String, nullable=True),
    CheckConstraint(_STATUS_CHECK, name="status"),
    CheckConstraint(f"merge_mode IS NULL OR merge_mode IN ({_MERGE_MODES})", name="merge_mode"),
    Index(None, "parent_task_id"),
    Index(None, "status", "created_at"),
    Index(None, "owner_id"),
)

pending_queue = Table(
    "pending_queue",
    metadata,
    # Enqueue order: a drain yields rows by ascending seq.
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column(
        "task_id",
        String,
        ForeignKey("background_tasks.task_id", ondelete="CASCADE"),
        nullable=False,
        unique=True,
    ),
    Column("enqueued_at", String(26), nullable=False),
    # A drain holding this item: "<owner_id>/<drain number>", NULL when free.
    Column("claimed_by", String, nullable=True),
    Column("claimed_at", String(26), nullable=True),
)
# Few items are held at a time: a partial index finds them without scanning the queue.
# (Only SQLite's form is named: a postgresql_where here would import SQLAlchemy's
# PostgreSQL dialect, ~25 ms, every time a handler module is imported.)
Index(
    "ix_pending_queue_claimed_by",
    pending_queue.c.claimed_by,
    sqlite_where=pending_queue.c.claimed_by.is_not(None),
)

drain_slots = Table(
    "drain_slots",
    metadata,
    # A drain's slot in the <db>-acks file (store/drain_acks.py), taken in the transaction
    # of its first claim and given back with its last item, so a rolled-back claim takes
    # none. A slot whose drain (claimer) holds no item is free.
    Column("slot", Integer, primary_key=True, autoincrement=False),
    Column("claimer", String, nullable=False, unique=True),
)

owners = Table(
    "owners",
    metadata,
    # One row per live handler; its heartbeat renews lease_expires_at.
    Column("owner_id", String, primary_key=True),
    Column("host", String, nullable=False),
    Column("boot_id", String, nullable=True),  # tells a reboot (pids start over) apart
    Column("pid", Integer, nullable=False),
    Column("process_start", String, nullable=True),  # tells a reused pid apart
    Column("started_at", String(26), nullable=False),
    Column("heartbeat_at", String(26), nullable=False),
    Column("lease_expires_at", String(26), nullable=False),
    Column("closed_at", String(26), nullable=True),  # set by a clean close
    # 1: a handler that knows the -acks file (0: one from before it, open at the upgrade).
    Column("records_acks", Integer, nullable=False, server_default=text("0")),
)
