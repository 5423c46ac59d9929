"""The in-memory bar: the spec's API as a plain dict of tasks and a list of pending ones.

Only what the reference behaviour needs (duplicate and unknown ids raise, a finished task
cannot finish again, callbacks run on merge), with no validation, locking or storage layer.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import StrEnum
from typing import Any


class MergeMode(StrEnum):
    """How a result was merged."""

    HOT = "hot"
    WAKEUP = "wakeup"


class Status(StrEnum):
    """A task's lifecycle state."""

    INIT = "init"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"


class Task:
    """One background task."""

    def __init__(self, task_id: str, parent_task_id: str, *, payload: Any = None) -> None:
        self.task_id = task_id
        self.parent_task_id = parent_task_id
        self.payload = payload
        self.result: Any = None
        self.error: str | None = None
        self.status = Status.INIT
        self.merge_mode: MergeMode | None = None

    @property
    def is_complete(self) -> bool:
        """Whether the task reached SUCCESS or FAILED."""
        return self.status in (Status.SUCCESS, Status.FAILED)


Callback = Callable[[Task, MergeMode], Awaitable[None] | None]


class DictListHandler:
    """Tasks in a dict, pending results in a list."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}
        self._pending: list[Task] = []
        self._callbacks: list[Callback] = []

    def submit(self, task_id: str, parent_task_id: str, *, payload: Any = None) -> Task:
        """Register a RUNNING task; a duplicate id raises."""
        if task_id in self._tasks:
            raise KeyError(f"duplicate task {task_id!r}")
        task = Task(task_id, parent_task_id, payload=payload)
        task.status = Status.RUNNING
        self._tasks[task_id] = task
        return task

    def _running(self, task_id: str) -> Task:
        task = self._tasks[task_id]
        if task.is_complete:
            raise KeyError(f"task {task_id!r} already finished")
        return task

    async def handle_result(
        self, task_id: str, result: Any, *, is_main_running: bool = True
    ) -> MergeMode:
        """Complete a task: merge now (HOT) or queue it (WAKEUP)."""
        task = self._running(task_id)
        task.status = Status.SUCCESS
        task.result = result
        mode = MergeMode.HOT if is_main_running else MergeMode.WAKEUP
        task.merge_mode = mode
        if mode is MergeMode.WAKEUP:
            self._pending.append(task)
        else:
            await self._notify(task, mode)
        return mode

    def handle_error(self, task_id: str, error: str) -> None:
        """Record a failure."""
        task = self._running(task_id)
        task.status = Status.FAILED
        task.error = error

    async def drain_pending(self) -> AsyncIterator[Task]:
        """Yield and remove the queued tasks, oldest first."""
        pending, self._pending = self._pending, []
        for task in pending:
            await self._notify(task, MergeMode.WAKEUP)
            yield task

    def on_merge(self, callback: Callback) -> None:
        """Register a merge callback."""
        self._callbacks.append(callback)

    def get_task(self, task_id: str) -> Task | None:
        """The task, or None."""
        return self._tasks.get(task_id)

    def list_tasks(self, *, status: Status | None = None) -> list[Task]:
        """All tasks, or those with ``status``."""
        if status is None:
            return list(self._tasks.values())
        return [task for task in self._tasks.values() if task.status == status]

    async def _notify(self, task: Task, mode: MergeMode) -> None:
        for callback in self._callbacks:
            outcome = callback(task, mode)
            if inspect.isawaitable(outcome):
                await outcome
