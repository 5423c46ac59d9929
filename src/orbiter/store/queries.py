"""Every SQL statement the store runs, one named function per operation.

Statements are built once (``functools.cache``) and take their values as named bound
parameters (``bindparam("name")``; :mod:`orbiter.store.executor` binds them in order to
``?`` placeholders), so no value ever becomes SQL text and each statement compiles once.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Delete,
    Insert,
    Select,
    Update,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    select,
)
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from orbiter.store.schema import background_tasks as tasks
from orbiter.store.schema import drain_slots, owners
from orbiter.store.schema import pending_queue as pending

__all__ = [
    "ACTIVE_STATUSES",
    "TaskRow",
    "acknowledge_all_claimed",
    "acknowledge_claimed",
    "acknowledge_claimed_upto",
    "claim_pending",
    "claimed_items",
    "claimers",
    "claimers_of_owner",
    "close_owner",
    "complete_task",
    "count_claimed_upto",
    "count_pending",
    "delete_owner",
    "delete_pending_item",
    "enqueue",
    "fail_task",
    "free_slot",
    "has_free_pending",
    "has_pending",
    "insert_pushed_task",
    "insert_task",
    "max_pending_seq",
    "owner_has_active_tasks",
    "owners_of_active_tasks",
    "owners_without_acks",
    "pending_item_of_task",
    "record_heartbeat",
    "release_claims",
    "release_claims_of_owner",
    "select_owners",
    "select_task",
    "select_tasks",
    "settle_orphans",
    "slot_claimers",
    "slot_of_claimer",
    "take_slot",
    "taken_slots",
    "task_status",
]

#: A SELECT of any columns.
AnySelect = Select[*tuple[Any, ...]]

#: A task row as the task queries return it (see ``TASK_COLUMNS``).
TaskRow = Sequence[Any]

#: Statuses from which a task may still complete.
ACTIVE_STATUSES = ("init", "running")


def _is_active() -> ColumnElement[bool]:
    """``status IN ('init', 'running')`` with one plain parameter per value (no expanding
    parameter, so the statement compiles once to fixed SQL text)."""
    return tasks.c.status.in_([literal(status) for status in ACTIVE_STATUSES])


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


def _task_row(*optional: str) -> SqliteInsert:
    """An INSERT of a task row: its id, parent, status, payload and owner as bound
    parameters of the same names, plus the ``optional`` columns, stamped ``:now``."""
    columns = ("task_id", "parent_task_id", "status", "payload", "owner_id", *optional)
    stamps: dict[str, Any] = {"created_at": bindparam("now"), "updated_at": bindparam("now")}
    return sqlite_insert(tasks).values({name: bindparam(name) for name in columns} | stamps)


@cache
def insert_task() -> Insert:
    """Insert a new task; does nothing (rowcount 0) if the id exists."""
    return _task_row().on_conflict_do_nothing(index_elements=[tasks.c.task_id])


@cache
def insert_pushed_task() -> Insert:
    """Store a task pushed to the queue (``PendingQueue.push``): a new id is stored as
    given; a stored task that is still active takes the pushed outcome; a stored task
    that already completed keeps its own (a task completes once)."""
    stmt = _task_row("merge_mode", "result", "error")
    return stmt.on_conflict_do_update(
        index_elements=[tasks.c.task_id],
        set_={
            "status": stmt.excluded.status,
            "merge_mode": stmt.excluded.merge_mode,
            "result": stmt.excluded.result,
            "error": stmt.excluded.error,
            "updated_at": stmt.excluded.updated_at,
        },
        where=_is_active(),
    )


def _sql_text(value: str) -> ColumnElement[str]:
    """``value`` written into the SQL as a quoted constant (it is one of ours, never a
    caller's), so it need not be bound on every execution."""
    return literal_column("'" + value.replace("'", "''") + "'")


def _finish(returning: bool, status: str, **values: object) -> Update:
    """The guarded update that finishes task ``:id`` with ``status``.

    Its constants (the new status, the active ones) are written into the SQL: finishing
    runs thousands of times a second, and each bound constant costs a merge of the
    parameters and a bind per call. Found by its key either way. (Queries that must be
    planned on an index other than the key keep their statuses as parameters: see
    :func:`_is_active`.)
    """
    stmt = (
        tasks.update()
        .where(
            tasks.c.task_id == bindparam("id"),
            tasks.c.status.in_([_sql_text(active) for active in ACTIVE_STATUSES]),
        )
        .values(updated_at=bindparam("now"), status=_sql_text(status), **values)
    )
    return stmt.returning(tasks.c.parent_task_id, tasks.c.payload) if returning else stmt


@cache
def complete_task(returning: bool = True) -> Update:
    """Mark an active task SUCCESS with its result and merge mode; returns its parent id
    and payload if ``returning`` (building a task object needs them; RETURNING costs
    about a third of the statement, so callers that need no object leave it out)."""
    return _finish(
        returning,
        status="success",
        result=bindparam("result"),
        merge_mode=bindparam("merge_mode"),
    )


@cache
def fail_task(returning: bool = True) -> Update:
    """Mark an active task FAILED with its error; see :func:`complete_task`."""
    return _finish(returning, status="failed", error=bindparam("error"))


@cache
def task_status() -> AnySelect:
    """The status of one task (to explain why a guarded update changed nothing)."""
    return select(tasks.c.status).where(tasks.c.task_id == bindparam("id"))


@cache
def task_parent() -> AnySelect:
    """The run (``parent_task_id``) of one task."""
    return select(tasks.c.parent_task_id).where(tasks.c.task_id == bindparam("id"))


@cache
def select_task() -> AnySelect:
    """One task by id."""
    return select(*TASK_COLUMNS).where(tasks.c.task_id == bindparam("id"))


@cache
def select_tasks(
    with_status: bool,
) -> AnySelect:
    """All tasks in the order they were stored (submitted, or pushed when new), as the
    in-memory handler lists them, optionally only those with ``:status``.

    By SQLite's ``rowid``, not ``created_at``: tasks submitted in one transaction share a
    timestamp, and the clock may step back."""
    stmt = select(*TASK_COLUMNS).order_by(literal_column(f"{tasks.name}.rowid"))
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
def count_claimed_upto() -> AnySelect:
    """Number of items ``:claimer`` holds up to ``:seq``."""
    return (
        select(func.count())
        .select_from(pending)
        .where(pending.c.claimed_by == bindparam("claimer"), pending.c.seq <= bindparam("seq"))
    )


@cache
def has_free_pending() -> AnySelect:
    """Whether any queued task is free to drain (not held by a drain)."""
    return select(exists().where(pending.c.claimed_by.is_(None)))


@cache
def has_pending() -> AnySelect:
    """Whether any task is queued (cheaper than a count on a long queue)."""
    return select(exists().select_from(pending))


@cache
def max_pending_seq() -> AnySelect:
    """The newest queue position, or NULL when the queue is empty."""
    return select(func.max(pending.c.seq))


@cache
def record_heartbeat() -> Insert:
    """Register owner ``:owner_id`` or renew its lease (alive until ``:lease_expires_at``).

    An upsert, so a heartbeat also puts back an owner row that another process removed
    while this owner was stalled past its lease."""
    columns = ("owner_id", "host", "boot_id", "pid", "process_start", "lease_expires_at")
    stamps: dict[str, Any] = {
        "started_at": bindparam("now"),
        "heartbeat_at": bindparam("now"),
        "records_acks": literal(1),
    }
    stmt = sqlite_insert(owners).values({name: bindparam(name) for name in columns} | stamps)
    return stmt.on_conflict_do_update(
        index_elements=[owners.c.owner_id],
        set_={
            "heartbeat_at": stmt.excluded.heartbeat_at,
            "lease_expires_at": stmt.excluded.lease_expires_at,
        },
    )


@cache
def close_owner() -> Update:
    """A clean close: the owner is gone, provably, from now on."""
    return (
        owners.update()
        .where(owners.c.owner_id == bindparam("id"))
        .values(closed_at=bindparam("now"), heartbeat_at=bindparam("now"))
    )


@cache
def select_owners() -> AnySelect:
    """Every owner row (one per handler that has not been cleaned up)."""
    return select(owners)


@cache
def owners_of_active_tasks() -> AnySelect:
    """The distinct owners of tasks that have not finished (NULL for unknown)."""
    return select(tasks.c.owner_id).where(_is_active()).distinct()


@cache
def owner_has_active_tasks() -> AnySelect:
    """Whether owner ``:id`` still has unfinished tasks."""
    return select(exists().where(tasks.c.owner_id == bindparam("id"), _is_active()))


@cache
def settle_orphans(action: str) -> Update:
    """Finish the active tasks of one gone owner (``:owner``; NULL matches unowned tasks).

    ``action`` is ``"failed"`` or ``"timeout"`` (status, with ``:error``) or ``"adopt"``
    (the task stays active and becomes ``:me``'s). Returns the settled rows.
    """
    stmt = tasks.update().where(
        _is_active(),
        tasks.c.owner_id.is_not_distinct_from(bindparam("owner")),
    )
    if action == "adopt":
        stmt = stmt.values(owner_id=bindparam("me"), updated_at=bindparam("now"))
    else:
        stmt = stmt.values(status=action, error=bindparam("error"), updated_at=bindparam("now"))
    return stmt.returning(*TASK_COLUMNS)


@cache
def delete_owner() -> Delete:
    """Forget a gone owner once nothing refers to it."""
    return delete(owners).where(owners.c.owner_id == bindparam("id"))


# -- claims on pending items ---------------------------------------------------------------


@cache
def claimers() -> AnySelect:
    """The distinct drains holding pending items."""
    return select(pending.c.claimed_by).where(pending.c.claimed_by.is_not(None)).distinct()


@cache
def release_claims() -> Update:
    """Free every item held by one drain (``:claimer``): it stopped without merging them."""
    return (
        pending.update()
        .where(pending.c.claimed_by == bindparam("claimer"))
        .values(claimed_by=None, claimed_at=None)
    )


@cache
def release_claims_of_owner() -> Update:
    """Free every item held by any drain of one owner (``:prefix`` is ``<owner_id>/%``)."""
    return (
        pending.update()
        .where(pending.c.claimed_by.like(bindparam("prefix")))
        .values(claimed_by=None, claimed_at=None)
    )


@cache
def claim_pending(by_parent: bool) -> Update:
    """Claim up to ``:limit`` free items after ``:after`` up to ``:upto``, in order, for
    ``:claimer`` (optionally only those of parent ``:parent``)."""
    free = (
        select(pending.c.seq)
        .where(
            pending.c.seq > bindparam("after"),
            pending.c.seq <= bindparam("upto"),
            pending.c.claimed_by.is_(None),
        )
        .order_by(pending.c.seq)
        .limit(bindparam("limit"))
    )
    if by_parent:
        free = free.join_from(pending, tasks, pending.c.task_id == tasks.c.task_id).where(
            tasks.c.parent_task_id == bindparam("parent")
        )
    return (
        pending.update()
        .where(pending.c.seq.in_(free.scalar_subquery()))
        .values(claimed_by=bindparam("claimer"), claimed_at=bindparam("now"))
    )


@cache
def claimed_items() -> AnySelect:
    """The items ``:claimer`` holds, in enqueue order, with their tasks."""
    return (
        select(pending.c.seq, *TASK_COLUMNS)
        .join_from(pending, tasks, pending.c.task_id == tasks.c.task_id)
        .where(pending.c.claimed_by == bindparam("claimer"))
        .order_by(pending.c.seq)
    )


@cache
def acknowledge_claimed() -> Delete:
    """Remove one item ``:claimer`` holds (its merge is done)."""
    return delete(pending).where(
        pending.c.seq == bindparam("seq"), pending.c.claimed_by == bindparam("claimer")
    )


@cache
def acknowledge_claimed_upto() -> Delete:
    """Remove the items ``:claimer`` holds up to ``:seq`` (merged, in enqueue order)."""
    return delete(pending).where(
        pending.c.claimed_by == bindparam("claimer"), pending.c.seq <= bindparam("seq")
    )


@cache
def claimers_of_owner() -> AnySelect:
    """The distinct drains of one owner (``:prefix`` is ``<owner_id>/%``) holding items."""
    return (
        select(pending.c.claimed_by)
        .where(pending.c.claimed_by.like(bindparam("prefix")))
        .distinct()
    )


@cache
def pending_item_of_task() -> AnySelect:
    """The queue row (``seq``, ``claimed_by``) of task ``:task_id``, if it is queued."""
    return select(pending.c.seq, pending.c.claimed_by).where(
        pending.c.task_id == bindparam("task_id")
    )


@cache
def delete_pending_item() -> Delete:
    """Remove queue row ``:seq``."""
    return delete(pending).where(pending.c.seq == bindparam("seq"))


@cache
def slot_of_claimer() -> AnySelect:
    """The ack-file slot of drain ``:claimer`` (no row: none)."""
    return select(drain_slots.c.slot).where(drain_slots.c.claimer == bindparam("claimer"))


@cache
def taken_slots() -> AnySelect:
    """Every ack-file slot taken."""
    return select(drain_slots.c.slot)


@cache
def slot_claimers() -> AnySelect:
    """The drains that hold an ack-file slot."""
    return select(drain_slots.c.claimer)


@cache
def owners_without_acks() -> AnySelect:
    """Owner rows, not closed, of handlers from before the -acks file."""
    return select(owners).where(owners.c.records_acks == 0, owners.c.closed_at.is_(None))


@cache
def take_slot() -> Insert:
    """Give ack-file slot ``:slot`` to drain ``:claimer``."""
    return insert(drain_slots).values(slot=bindparam("slot"), claimer=bindparam("claimer"))


@cache
def free_slot() -> Delete:
    """Give back the slot of drain ``:claimer``."""
    return delete(drain_slots).where(drain_slots.c.claimer == bindparam("claimer"))


@cache
def acknowledge_all_claimed() -> Delete:
    """Remove every item ``:claimer`` holds (a batch merge succeeded)."""
    return delete(pending).where(pending.c.claimed_by == bindparam("claimer"))
