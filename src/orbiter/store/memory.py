"""The in-memory store: the reference behaviour, for ``database=None``. Nothing is durable."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncGenerator, Collection
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
        self._claims: dict[BackgroundTask, str] = {}  # task (by identity) -> the drain holding it
        #: Tasks pushed more than once: how many more copies their drain holds.
        self._extra_copies: dict[BackgroundTask, int] = {}
        self._drains = itertools.count(1)
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

    async def complete(
        self, task_id: str, result: Any, mode: MergeMode, *, want_task: bool = True
    ) -> BackgroundTask:
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
        if not self._claims:
            items = list(self._pending)
            self._pending.clear()
            return items
        items = [task for task in self._pending if task not in self._claims]
        self._pending = deque(task for task in self._pending if task in self._claims)
        return items

    def pending_count(self) -> int:
        self._check_open()
        return len(self._pending)

    def has_pending(self) -> bool:
        self._check_open()
        return bool(self._pending)

    def _claim(self, parent_task_id: str | None, claimer: str) -> list[BackgroundTask]:
        taken = [
            task
            for task in self._pending
            if task not in self._claims
            and (parent_task_id is None or task.parent_task_id == parent_task_id)
        ]
        for task in taken:
            if task in self._claims:  # queued more than once
                self._extra_copies[task] = self._extra_copies.get(task, 0) + 1
            else:
                self._claims[task] = claimer
        return taken

    def _remove(self, task: BackgroundTask, claimer: str) -> None:
        if self._claims.get(task) != claimer:
            return
        if self._pending[0] is task:  # the usual case: a drain takes the oldest first
            self._pending.popleft()
        else:
            self._pending.remove(task)
        copies = self._extra_copies.pop(task, 0) if self._extra_copies else 0
        if copies > 1:
            self._extra_copies[task] = copies - 1
        elif copies == 0:
            del self._claims[task]

    def _release(self, claimer: str) -> None:
        for key in [key for key, holder in self._claims.items() if holder == claimer]:
            del self._claims[key]
            self._extra_copies.pop(key, None)

    async def iter_pending(
        self, parent_task_id: str | None
    ) -> AsyncGenerator[BackgroundTask, None]:
        self._check_open()
        claimer = f"drain/{next(self._drains)}"
        try:
            for task in self._claim(parent_task_id, claimer):
                yield task
                # The consumer asked for the next item: the one it held is merged.
                self._remove(task, claimer)
        finally:
            self._release(claimer)

    async def claim_batch(self, parent_task_id: str | None) -> tuple[str, list[BackgroundTask]]:
        self._check_open()
        claimer = f"batch/{next(self._drains)}"
        return claimer, self._claim(parent_task_id, claimer)

    async def settle_batch(self, claimer: str, *, merged: bool) -> None:
        if merged:
            for task in [t for t in self._pending if self._claims.get(t) == claimer]:
                self._remove(task, claimer)  # each copy of a task pushed twice
        self._release(claimer)

    async def recover_orphans(
        self, action: str, protect: Collection[str] = ()
    ) -> list[tuple[BackgroundTask, str]]:
        self._check_open()
        return []  # every task lives in this process: none can be orphaned

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
