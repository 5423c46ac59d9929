"""The library's error tree: one root, :class:`BackgroundTaskError`.

Every class is a ``BackgroundTaskError`` (and so an ``OrbiterError``), so code written
against the reference API, which catches ``BackgroundTaskError``, keeps working; the
subclasses let a caller tell the cases apart without parsing messages.
"""

from __future__ import annotations

from orbiter.types import OrbiterError

__all__ = [
    "BackgroundTaskError",
    "DatabaseError",
    "DatabaseLockedError",
    "DuplicateTaskError",
    "HandlerClosedError",
    "InvalidValueError",
    "SchemaError",
    "StoredValueError",
    "TaskAlreadyCompletedError",
    "TaskNotFoundError",
]


class BackgroundTaskError(OrbiterError):
    """Raised for background task handler errors (duplicate task IDs, unknown tasks)."""


class DuplicateTaskError(BackgroundTaskError):
    """A task with this id already exists."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"Background task '{task_id}' already exists")
        self.task_id = task_id

    def __reduce__(self) -> tuple[type[DuplicateTaskError], tuple[str]]:
        return type(self), (self.task_id,)  # pickles and copies rebuild it from its id


class TaskNotFoundError(BackgroundTaskError):
    """No task with this id exists."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"Background task '{task_id}' not found")
        self.task_id = task_id

    def __reduce__(self) -> tuple[type[TaskNotFoundError], tuple[str]]:
        return type(self), (self.task_id,)


class TaskAlreadyCompletedError(BackgroundTaskError):
    """The task already reached a terminal state; a task completes once."""

    def __init__(self, task_id: str, status: str) -> None:
        super().__init__(
            f"Background task '{task_id}' already completed (status {status}); "
            "a task completes once, so this call changed nothing"
        )
        self.task_id = task_id
        self.status = status

    def __reduce__(self) -> tuple[type[TaskAlreadyCompletedError], tuple[str, str]]:
        return type(self), (self.task_id, self.status)


class InvalidValueError(BackgroundTaskError, TypeError, ValueError):
    """An argument has the wrong type or value (bad id, non-JSON payload, ...).

    It is also a ``TypeError`` and a ``ValueError`` so generic handlers catch it.
    """


class StoredValueError(BackgroundTaskError, ValueError):
    """A stored payload or result cannot be decoded (written by another codec, or edited
    by hand). The row is left as it is: nothing that could not be read is removed."""


class HandlerClosedError(BackgroundTaskError):
    """The handler was closed; open a new one to keep working."""


class DatabaseError(BackgroundTaskError):
    """The database file cannot be used (missing directory, read-only, corrupt, full...)."""


class DatabaseLockedError(DatabaseError):
    """Another connection held the write lock longer than the busy timeout."""


class SchemaError(DatabaseError):
    """The database schema is not the one this code expects (newer, older, or foreign)."""
