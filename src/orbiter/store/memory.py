"""The in-memory store: the reference behaviour, for ``database=None``. Nothing is durable."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from orbiter._internal.signal import Signal
from orbiter._internal.state import TERMINAL_STATUSES, RunNodeStatus
from orbiter._internal.task import BackgroundTask, MergeMode
from orbiter.errors import (
    DuplicateTaskError,
    HandlerClosedError,
    TaskAlreadyCompletedError,
    TaskNotFoundError,
)

__all__ = ["MemoryStore"]


class MemoryStore:
    """Tasks in a dict, the pending queue in a deque; values are kept as given."""

    def __init__(self) -> None:
        self.pending_signal = Signal()
        self._tasks: dict[str, BackgroundTask] = {}
        self._pending: deque[BackgroundTask] = deque()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise HandlerClosedError("the handler is closed")

    def _running_task(self, task_id: str) -> BackgroundTask:
        self._check_open()
        task = self._tasks.get(task_id)
        if task is None:
            raise TaskNotFoundError(task_id)
        if task.status in TERMINAL_STATUSES:
            raise TaskAlreadyCompletedError(task_id, task.status.value)
        return task

    def add(self, task: BackgroundTask) -> None:
        self._check_open()
        if task.task_id in self._tasks:
            raise DuplicateTaskError(task.task_id)
        self._tasks[task.task_id] = task

    async def complete(self, task_id: str, result: Any, mode: MergeMode) -> BackgroundTask:
        task = self._running_task(task_id)
        task.complete(result)
        task.merge_mode = mode
        if mode is MergeMode.WAKEUP:
            self._pending.append(task)
            self.pending_signal.notify()
        return task

    def fail(self, task_id: str, error: str) -> BackgroundTask:
        task = self._running_task(task_id)
        task.fail(error)
        return task

    def get(self, task_id: str) -> BackgroundTask | None:
        self._check_open()
        return self._tasks.get(task_id)

    def list_tasks(self, status: RunNodeStatus | None) -> list[BackgroundTask]:
        self._check_open()
        if status is None:
            return list(self._tasks.values())
        return [task for task in self._tasks.values() if task.status == status]

    def push_pending(self, task: BackgroundTask) -> None:
        self._check_open()
        self._tasks.setdefault(task.task_id, task)
        self._pending.append(task)
        self.pending_signal.notify()

    def pop_all_pending(self) -> list[BackgroundTask]:
        self._check_open()
        items = list(self._pending)
        self._pending.clear()
        return items

    def pending_count(self) -> int:
        self._check_open()
        return len(self._pending)

    async def iter_pending(self) -> AsyncIterator[BackgroundTask]:
        self._check_open()
        for _ in range(len(self._pending)):
            if not self._pending:
                break
            task = self._pending[0]
            yield task
            # The consumer asked for the next item: the one it held is merged.
            if self._pending and self._pending[0] is task:
                self._pending.popleft()

    async def wait_pending(self, timeout: float | None) -> bool:
        self._check_open()
        seen = self.pending_signal.version
        if self._pending:
            return True
        return await self.pending_signal.wait_for_change(seen, timeout)

    def close(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        self.close()
