"""Finishing a task: the guarded update that records its result or error, as an operation
for the commit worker, which can also run many of them as one.

A task finishes once: the update only changes a task that is still active, and when it
changes nothing the operation says why (not found, or already completed) without having
written anything. Concurrent ``handle_result`` calls reach the worker as one batch; there
the completions that need no row back run *together*: one ``executemany`` for their
updates and one for their queue entries, about 3 us a completion less than a statement
each. Should any of them not apply, the group's writes are undone (a savepoint) and each
runs alone, so every caller gets its own answer.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from sqlalchemy import Update

from orbiter.errors import TaskAlreadyCompletedError, TaskNotFoundError
from orbiter.store import queries
from orbiter.store.executor import Db
from orbiter.store.queries import TaskRow
from orbiter.store.worker import Together

__all__ = ["Finish"]


class Finish:
    """The operation that finishes ``task_id`` with ``statement`` (and queues it if
    ``enqueue``). Called alone it returns the task's row if ``returning``, else None."""

    __slots__ = ("enqueue", "params", "returning", "statement", "task_id", "together")

    def __init__(
        self,
        task_id: str,
        update: Callable[[bool], Update],
        params: dict[str, Any],
        *,
        returning: bool,
        enqueue: bool,
    ) -> None:
        self.task_id = task_id
        self.statement = update(returning)
        self.params = params
        self.returning = returning
        self.enqueue = enqueue
        #: Finishes with the same ``together`` may run as one (see the module docstring);
        #: one that returns its row cannot (``executemany`` returns no rows).
        self.together: Together | None = (
            None if returning else _finish_together(self.statement, enqueue)
        )

    def __call__(self, db: Db) -> TaskRow | None:
        params = self.params
        params["now"] = db.now
        if self.returning:
            row = db.first(self.statement, params)
            changed = row is not None
        else:
            row = None
            changed = db.changes(self.statement, params) > 0
        if not changed:
            status = db.scalar(queries.task_status(), {"id": self.task_id})
            if status is None:
                raise TaskNotFoundError(self.task_id)
            raise TaskAlreadyCompletedError(self.task_id, status)
        if self.enqueue:
            db.execute(queries.enqueue(), {"task_id": self.task_id, "now": db.now})
        return None if row is None else tuple(row)


@cache
def _finish_together(statement: Update, enqueue: bool) -> Together:
    """How finishes made with ``statement`` and ``enqueue`` run as one (one function per
    kind, so the worker can tell which operations may share it)."""

    def finish_all(db: Db, finishes: list[Finish]) -> bool:
        now = db.now

        def apply() -> bool:
            values = [finish.params for finish in finishes]
            for params in values:
                params["now"] = now
            if db.changes_many(statement, values) != len(finishes):
                return False  # one is not active (or comes twice): each runs alone
            if enqueue:
                db.changes_many(
                    queries.enqueue(),
                    [{"task_id": finish.task_id, "now": now} for finish in finishes],
                )
            return True

        return db.all_or_nothing(apply)

    return finish_all
