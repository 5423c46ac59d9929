"""Every SQL statement the ``orbiter-bg`` command line runs, one named function per operation.

Like :mod:`orbiter.store.queries`, statements are built with SQLAlchemy Core from the
tables in :mod:`orbiter.store.schema`, cached, and take every value as a bound parameter
(``:name``). Timestamps compare as text: the stored form sorts in time order.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    String,
    bindparam,
    delete,
    exists,
    func,
    select,
)
from sqlalchemy.sql.dml import ReturningDelete

from orbiter.store.schema import background_tasks as tasks
from orbiter.store.schema import pending_queue as pending

__all__ = [
    "FINISHED_STATUSES",
    "count_by_status",
    "count_foreign_tasks",
    "count_pending",
    "count_purgeable",
    "count_tasks",
    "delete_purgeable_batch",
    "oldest_pending",
    "owners_of_tasks",
    "purgeable_tasks",
    "select_pending",
    "select_task_detail",
    "select_task_page",
    "task_queue_state",
    "tasks_of_parent",
]

#: A SELECT of any columns.
AnySelect = Select[*tuple[Any, ...]]

#: Statuses a task never leaves; only these may be purged.
FINISHED_STATUSES = ("success", "failed", "timeout")


def _is_pending() -> ColumnElement[bool]:
    return exists().where(pending.c.task_id == tasks.c.task_id).correlate_except(pending)


def _summary_columns() -> tuple[Any, ...]:
    return (
        tasks.c.task_id,
        tasks.c.parent_task_id,
        tasks.c.status,
        tasks.c.merge_mode,
        tasks.c.created_at,
        tasks.c.updated_at,
        _is_pending().label("is_pending"),
    )


def _task_filters(
    statuses: bool, parent: bool, older: bool, newer: bool
) -> list[ColumnElement[bool]]:
    """The WHERE terms for ``:statuses`` (a list), ``:parent``, ``:older_than`` and
    ``:newer_than`` (cut-off timestamps: created before / at or after)."""
    terms: list[ColumnElement[bool]] = []
    if statuses:
        terms.append(tasks.c.status.in_(bindparam("statuses", expanding=True)))
    if parent:
        terms.append(tasks.c.parent_task_id == bindparam("parent"))
    if older:
        terms.append(tasks.c.created_at < bindparam("older_than"))
    if newer:
        terms.append(tasks.c.created_at >= bindparam("newer_than"))
    return terms


@cache
def select_task_page(statuses: bool, parent: bool, older: bool, newer: bool) -> AnySelect:
    """Task summaries matching the filters, newest first, ``:limit`` rows after ``:offset``."""
    return (
        select(*_summary_columns())
        .where(*_task_filters(statuses, parent, older, newer))
        .order_by(tasks.c.created_at.desc(), tasks.c.task_id.desc())
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )


@cache
def count_tasks(statuses: bool, parent: bool, older: bool, newer: bool) -> AnySelect:
    """How many tasks match the filters of :func:`select_task_page`."""
    return (
        select(func.count())
        .select_from(tasks)
        .where(*_task_filters(statuses, parent, older, newer))
    )


@cache
def select_task_detail() -> AnySelect:
    """One task ``:id`` in full, with its queue position and time if it is pending."""
    return (
        select(
            *_summary_columns(),
            tasks.c.payload,
            tasks.c.result,
            tasks.c.error,
            pending.c.seq,
            pending.c.enqueued_at,
        )
        .outerjoin(pending, pending.c.task_id == tasks.c.task_id)
        .where(tasks.c.task_id == bindparam("id"))
    )


def _pending_columns() -> tuple[Any, ...]:
    return (
        pending.c.seq,
        tasks.c.task_id,
        tasks.c.parent_task_id,
        tasks.c.status,
        tasks.c.merge_mode,
        pending.c.enqueued_at,
        tasks.c.result,
        tasks.c.error,
        pending.c.claimed_by,
        pending.c.claimed_at,
    )


@cache
def select_pending(parent: bool) -> AnySelect:
    """Queued tasks in enqueue order (optionally of ``:parent``), ``:limit`` after ``:offset``."""
    stmt = select(*_pending_columns()).join_from(
        pending, tasks, pending.c.task_id == tasks.c.task_id
    )
    if parent:
        stmt = stmt.where(tasks.c.parent_task_id == bindparam("parent"))
    return stmt.order_by(pending.c.seq).limit(bindparam("limit")).offset(bindparam("offset"))


@cache
def count_pending(parent: bool) -> AnySelect:
    """Number of queued tasks, optionally only those of ``:parent``."""
    stmt = select(func.count()).select_from(pending)
    if parent:
        stmt = stmt.join(tasks, pending.c.task_id == tasks.c.task_id).where(
            tasks.c.parent_task_id == bindparam("parent")
        )
    return stmt


@cache
def oldest_pending() -> AnySelect:
    """When the oldest queued task was queued (NULL when the queue is empty)."""
    return select(func.min(pending.c.enqueued_at))


@cache
def count_by_status() -> AnySelect:
    """Rows of ``(status, count)``."""
    return select(tasks.c.status, func.count()).group_by(tasks.c.status).order_by(tasks.c.status)


@cache
def task_queue_state() -> AnySelect:
    """The status of task ``:id`` and whether it is queued (no row: no such task)."""
    return select(tasks.c.status, _is_pending().label("is_pending")).where(
        tasks.c.task_id == bindparam("id")
    )


def _purgeable() -> list[ColumnElement[bool]]:
    """Finished tasks last updated before ``:cutoff`` and not queued."""
    return [
        tasks.c.status.in_(FINISHED_STATUSES),
        tasks.c.updated_at < bindparam("cutoff"),
        ~_is_pending(),
    ]


@cache
def purgeable_tasks() -> AnySelect:
    """The tasks a purge with ``:cutoff`` would delete, oldest first."""
    return (
        select(tasks.c.task_id, tasks.c.status, tasks.c.updated_at)
        .where(*_purgeable())
        .order_by(tasks.c.updated_at, tasks.c.task_id)
    )


@cache
def count_purgeable() -> AnySelect:
    """How many tasks a purge with ``:cutoff`` would delete."""
    return select(func.count()).select_from(tasks).where(*_purgeable())


@cache
def delete_purgeable_batch() -> ReturningDelete[Any]:
    """Delete the oldest ``:batch`` purgeable tasks (conditions re-checked); returns their
    ``(task_id, updated_at)``, in no particular order (RETURNING has none)."""
    batch = (
        select(tasks.c.task_id)
        .where(*_purgeable())
        .order_by(tasks.c.updated_at, tasks.c.task_id)
        .limit(bindparam("batch"))
    )
    return (
        delete(tasks)
        .where(tasks.c.task_id.in_(batch))
        .returning(tasks.c.task_id, tasks.c.updated_at)
    )


@cache
def tasks_of_parent() -> AnySelect:
    """``(task_id, status, merge_mode)`` of every task of ``:parent``."""
    return (
        select(tasks.c.task_id, tasks.c.status, tasks.c.merge_mode)
        .where(tasks.c.parent_task_id == bindparam("parent"))
        .order_by(tasks.c.task_id)
    )


@cache
def count_foreign_tasks() -> AnySelect:
    """How many tasks have a parent id that does not start with ``:prefix``."""
    prefix: BindParameter[str] = bindparam("prefix", type_=String)
    return (
        select(func.count())
        .select_from(tasks)
        .where(func.substr(tasks.c.parent_task_id, 1, func.length(prefix)) != prefix)
    )


@cache
def owners_of_tasks() -> AnySelect:
    """The owner of each task in ``:task_ids`` (an expanding list), as (task_id, owner_id)."""
    return select(tasks.c.task_id, tasks.c.owner_id).where(
        tasks.c.task_id.in_(bindparam("task_ids", expanding=True))
    )


@cache
def active_tasks_with_owner() -> AnySelect:
    """Unfinished tasks with their owner, oldest first (for ``orbiter-bg orphans``)."""
    return (
        select(
            tasks.c.task_id,
            tasks.c.parent_task_id,
            tasks.c.status,
            tasks.c.owner_id,
            tasks.c.created_at,
        )
        .where(tasks.c.status.in_(("init", "running")))
        .order_by(tasks.c.created_at, tasks.c.task_id)
    )
