"""Every SQL statement the store runs, one named function per operation.

Statements are built once (``functools.cache``) and take their values as bound
parameters (``:name``), so no value ever becomes SQL text and SQLAlchemy's compiled
cache is hit on every call.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import Delete, Insert, Select, Update, bindparam, delete, exists, func, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from orbiter.store.schema import background_tasks as tasks
from orbiter.store.schema import pending_queue as pending

__all__ = [
    "ACTIVE_STATUSES",
    "complete_task",
    "count_pending",
    "delete_pending_item",
    "delete_pending_through",
    "enqueue",
    "fail_task",
    "insert_task",
    "max_pending_seq",
    "pending_batch",
    "select_task",
    "select_tasks",
    "task_status",
    "upsert_task",
]

#: A SELECT of any columns.
AnySelect = Select[*tuple[Any, ...]]

#: Statuses from which a task may still complete.
ACTIVE_STATUSES = ("init", "running")

#: The task columns, in the order :func:`select_task` and friends return them.
TASK_COLUMNS = (
    tasks.c.task_id,
    tasks.c.parent_task_id,
    tasks.c.status,
    tasks.c.merge_mode,
    tasks.c.payload,
    tasks.c.result,
    tasks.c.error,
)


@cache
def insert_task() -> Insert:
    """Insert a new task; does nothing (rowcount 0) if the id exists."""
    return (
        sqlite_insert(tasks)
        .values(
            task_id=bindparam("task_id"),
            parent_task_id=bindparam("parent_task_id"),
            status=bindparam("status"),
            payload=bindparam("payload"),
            created_at=bindparam("now"),
            updated_at=bindparam("now"),
        )
        .on_conflict_do_nothing(index_elements=[tasks.c.task_id])
    )


@cache
def upsert_task() -> Insert:
    """Insert a task as given, or overwrite its outcome if it exists (``PendingQueue.push``)."""
    stmt = sqlite_insert(tasks).values(
        task_id=bindparam("task_id"),
        parent_task_id=bindparam("parent_task_id"),
        status=bindparam("status"),
        merge_mode=bindparam("merge_mode"),
        payload=bindparam("payload"),
        result=bindparam("result"),
        error=bindparam("error"),
        created_at=bindparam("now"),
        updated_at=bindparam("now"),
    )
    return stmt.on_conflict_do_update(
        index_elements=[tasks.c.task_id],
        set_={
            "status": stmt.excluded.status,
            "merge_mode": stmt.excluded.merge_mode,
            "result": stmt.excluded.result,
            "error": stmt.excluded.error,
            "updated_at": stmt.excluded.updated_at,
        },
    )


def _finish(**values: object) -> Update:
    return (
        tasks.update()
        .where(tasks.c.task_id == bindparam("id"), tasks.c.status.in_(ACTIVE_STATUSES))
        .values(updated_at=bindparam("now"), **values)
        .returning(tasks.c.parent_task_id, tasks.c.payload)
    )


@cache
def complete_task() -> Update:
    """Mark an active task SUCCESS with its result and merge mode; returns its row."""
    return _finish(status="success", result=bindparam("result"), merge_mode=bindparam("merge_mode"))


@cache
def fail_task() -> Update:
    """Mark an active task FAILED with its error; returns its row."""
    return _finish(status="failed", error=bindparam("error"))


@cache
def task_status() -> AnySelect:
    """The status of one task (to explain why a guarded update changed nothing)."""
    return select(tasks.c.status).where(tasks.c.task_id == bindparam("id"))


@cache
def select_task() -> AnySelect:
    """One task by id."""
    return select(*TASK_COLUMNS).where(tasks.c.task_id == bindparam("id"))


@cache
def select_tasks(
    with_status: bool,
) -> AnySelect:
    """All tasks in submission order, optionally only those with ``:status``."""
    stmt = select(*TASK_COLUMNS).order_by(tasks.c.created_at, tasks.c.task_id)
    if with_status:
        stmt = stmt.where(tasks.c.status == bindparam("status"))
    return stmt


@cache
def enqueue() -> Insert:
    """Queue a task for a wake-up merge; a task already queued stays queued once."""
    return (
        sqlite_insert(pending)
        .values(task_id=bindparam("task_id"), enqueued_at=bindparam("now"))
        .on_conflict_do_nothing(index_elements=[pending.c.task_id])
    )


@cache
def count_pending() -> AnySelect:
    """Number of queued tasks."""
    return select(func.count()).select_from(pending)


@cache
def has_pending() -> AnySelect:
    """Whether any task is queued (cheaper than a count on a long queue)."""
    return select(exists().select_from(pending))


@cache
def max_pending_seq() -> AnySelect:
    """The newest queue position, or NULL when the queue is empty."""
    return select(func.max(pending.c.seq))


@cache
def pending_batch() -> AnySelect:
    """Up to ``:limit`` queued tasks after position ``:after`` up to ``:upto``, in order."""
    return (
        select(pending.c.seq, *TASK_COLUMNS)
        .join_from(pending, tasks, pending.c.task_id == tasks.c.task_id)
        .where(pending.c.seq > bindparam("after"), pending.c.seq <= bindparam("upto"))
        .order_by(pending.c.seq)
        .limit(bindparam("limit"))
    )


@cache
def delete_pending_item() -> Delete:
    """Remove one queued task by position (its merge was acknowledged)."""
    return delete(pending).where(pending.c.seq == bindparam("seq"))


@cache
def delete_pending_through() -> Delete:
    """Remove every queued task up to position ``:upto``."""
    return delete(pending).where(pending.c.seq <= bindparam("upto"))
