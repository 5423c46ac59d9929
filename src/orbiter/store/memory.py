"""The in-memory store: the reference behaviour, for ``database=None``. Nothing is durable.

Like the reference's ``PendingQueue``, it is thread-safe: one lock guards the task table,
the queue and the drains' claims (it is never held across an ``await``).
"""

from __future__ import annotations

import itertools
import threading
import time
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

#: A queued item: its place in enqueue order, and the task.
_Entry = tuple[int, BackgroundTask]


def _order_of(entry: _Entry) -> int:
    return entry[0]


class MemoryStore:
    """Tasks in a dict, the pending queue in a deque; values are kept as given."""

    def __init__(self) -> None:
        self.pending_signal = Signal()
        self._tasks: dict[str, BackgroundTask] = {}
        #: Free items in enqueue order; a drain moves what it claims to ``_held``.
        self._pending: deque[_Entry] = deque()
        self._held: dict[str, deque[_Entry]] = {}  # claimer -> the items it still holds
        self._order = itertools.count()  # enqueue order, kept when items are given back
        self._drains = itertools.count(1)
        self._closed = False
        self._lock = threading.Lock()

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
        with self._lock:
            if task.task_id in self._tasks:
                raise DuplicateTaskError(task.task_id)
            self._tasks[task.task_id] = task

    async def complete(
        self, task_id: str, result: Any, mode: MergeMode, *, want_task: bool = True
    ) -> BackgroundTask:
        with self._lock:
            task = self._running_task(task_id)
            task.complete(result)
            task.merge_mode = mode
            if mode is MergeMode.WAKEUP:
                self._pending.append((next(self._order), task))
        if mode is MergeMode.WAKEUP:
            self.pending_signal.notify()
        return task

    def fail(self, task_id: str, error: str) -> BackgroundTask:
        with self._lock:
            task = self._running_task(task_id)
            task.fail(error)
        return task

    def get(self, task_id: str) -> BackgroundTask | None:
        self._check_open()
        return self._tasks.get(task_id)

    def list_tasks(self, status: RunNodeStatus | None) -> list[BackgroundTask]:
        self._check_open()
        with self._lock:
            tasks = list(self._tasks.values())
        if status is None:
            return tasks
        return [task for task in tasks if task.status == status]

    def push_pending(self, task: BackgroundTask) -> None:
        self._check_open()
        with self._lock:
            self._tasks.setdefault(task.task_id, task)
            self._pending.append((next(self._order), task))
        self.pending_signal.notify()

    def pop_all_pending(self) -> list[BackgroundTask]:
        self._check_open()
        with self._lock:
            items = [task for _, task in self._pending]
            self._pending.clear()
        return items

    def pending_count(self) -> int:
        self._check_open()
        return len(self._pending) + sum(map(len, list(self._held.values())))

    def has_pending(self) -> bool:
        return self.pending_count() > 0

    def _claim(self, parent_task_id: str | None, claimer: str) -> deque[_Entry]:
        """Move the free items (of one parent) out of the queue into ``claimer``'s hands."""
        with self._lock:
            if parent_task_id is None:
                taken = self._pending.copy()
                self._pending.clear()
            else:
                taken = deque(e for e in self._pending if e[1].parent_task_id == parent_task_id)
                rest = [e for e in self._pending if e[1].parent_task_id != parent_task_id]
                self._pending.clear()
                self._pending.extend(rest)
            self._held[claimer] = taken
            return taken

    def _release(self, claimer: str) -> None:
        """Give back what ``claimer`` still holds, each item in its enqueue place."""
        with self._lock:
            held = self._held.pop(claimer, None)
            if not held:
                return
            merged = sorted([*held, *self._pending], key=_order_of)
            self._pending.clear()
            self._pending.extend(merged)
        self.pending_signal.notify()  # items are free again: wake waiters

    async def iter_pending(
        self, parent_task_id: str | None
    ) -> AsyncGenerator[BackgroundTask, None]:
        self._check_open()
        claimer = f"drain/{next(self._drains)}"
        held = self._claim(parent_task_id, claimer)
        try:
            while held:
                yield held[0][1]
                # The consumer asked for the next item: the one it held is merged.
                held.popleft()
        finally:
            self._release(claimer)

    async def claim_batch(self, parent_task_id: str | None) -> tuple[str, list[BackgroundTask]]:
        self._check_open()
        claimer = f"batch/{next(self._drains)}"
        return claimer, [task for _, task in self._claim(parent_task_id, claimer)]

    async def settle_batch(self, claimer: str, *, merged: bool) -> None:
        if merged:
            with self._lock:
                self._held.pop(claimer, None)
        else:
            self._release(claimer)

    async def recover_orphans(
        self, action: str, protect: Collection[str] = ()
    ) -> list[tuple[BackgroundTask, str]]:
        self._check_open()
        return []  # every task lives in this process: none can be orphaned

    async def wait_pending(self, timeout: float | None) -> bool:
        """Wait for an item no drain holds (as the durable store does)."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = self.pending_signal.version
            if self._pending:  # an item no drain holds
                return True
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not await self.pending_signal.wait_for_change(seen, remaining):
                return False

    def close(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        self.close()
