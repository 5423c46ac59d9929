"""The in-memory store: the reference behaviour, for ``database=None``. Nothing is durable.

Like the reference's ``PendingQueue``, it is thread-safe: one lock guards the task table,
the queue and the drains' claims (it is never held across an ``await``).
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Collection, Iterable, Iterator
from operator import itemgetter
from typing import Any

from orbiter._internal.signal import Signal
from orbiter._internal.state import TERMINAL_STATUSES, RunNodeStatus
from orbiter._internal.task import WAKEUP, BackgroundTask, MergeMode
from orbiter.errors import (
    DuplicateTaskError,
    HandlerClosedError,
    TaskAlreadyCompletedError,
    TaskNotFoundError,
)
from orbiter.store import PendingDrain

__all__ = ["MemoryStore"]


class _Queue:
    """Queued tasks, and beside them each one's place in enqueue order (kept so items a
    drain gives back return to their places). Two deques rather than one of (place,
    task) pairs: a pair is an object the garbage collector walks, and a long queue of
    them made every collection, and so every call, slower."""

    __slots__ = ("places", "tasks")

    def __init__(self, entries: Iterable[tuple[int, BackgroundTask]] = ()) -> None:
        self.places: deque[int] = deque()
        self.tasks: deque[BackgroundTask] = deque()
        for place, task in entries:
            self.places.append(place)
            self.tasks.append(task)

    def entries(self) -> Iterator[tuple[int, BackgroundTask]]:
        return zip(self.places, self.tasks, strict=True)


#: How often a waiter looks again for items of dropped drains while drains hold items.
HELD_POLL_SECONDS = 0.05


class MemoryStore:
    """Tasks in a dict, the pending queue in a deque; values are kept as given."""

    def __init__(self) -> None:
        self.pending_signal = Signal()
        self._tasks: dict[str, BackgroundTask] = {}
        #: Free items in enqueue order; a drain moves what it claims to ``_held``.
        self._pending = _Queue()
        self._held: dict[str, _Queue] = {}  # claimer -> the items it still holds
        self._places = itertools.count()
        self._drains = itertools.count(1)
        self._closed = False
        self._lock = threading.Lock()
        #: Drains that were dropped unclosed: their items go back at the next claim (a
        #: finalizer may run inside a locked region, so it only appends here).
        self._dropped: deque[str] = deque()

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
        # setdefault checks and inserts in one step: no lock needed.
        if self._tasks.setdefault(task.task_id, task) is not task:
            raise DuplicateTaskError(task.task_id)

    async def complete(
        self, task_id: str, result: Any, mode: MergeMode, *, want_task: bool = True
    ) -> BackgroundTask:
        self._lock.acquire()  # once per call: acquire/release costs half of ``with``
        try:
            task = self._running_task(task_id)
            task.complete(result)
            task.merge_mode = mode
            if mode is WAKEUP:
                self._enqueue(task)
        finally:
            self._lock.release()
        if mode is WAKEUP:
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
            self._enqueue(task)
        self.pending_signal.notify()

    def pop_all_pending(self) -> list[BackgroundTask]:
        self._check_open()
        with self._lock:
            self._give_back_dropped()
            items = list(self._pending.tasks)
            self._pending = _Queue()
        return items

    def pending_count(self) -> int:
        self._check_open()
        with self._lock:  # a claim moves items between the two: count them at one moment
            return len(self._pending.tasks) + sum(len(queue.tasks) for queue in self._held.values())

    def has_pending(self) -> bool:
        return self.pending_count() > 0

    def _enqueue(self, task: BackgroundTask) -> None:
        """Append ``task`` to the free items (called holding the lock)."""
        self._pending.places.append(next(self._places))
        self._pending.tasks.append(task)

    def _claim(self, parent_task_id: str | None, claimer: str) -> _Queue:
        """Move the free items (of one parent) out of the queue into ``claimer``'s hands."""
        with self._lock:
            self._give_back_dropped()
            if parent_task_id is None:
                taken, self._pending = self._pending, _Queue()
            else:
                entries = list(self._pending.entries())
                taken = _Queue(e for e in entries if e[1].parent_task_id == parent_task_id)
                self._pending = _Queue(e for e in entries if e[1].parent_task_id != parent_task_id)
            self._held[claimer] = taken
            return taken

    def _release(self, claimer: str) -> None:
        """Give back what ``claimer`` still holds, each item in its enqueue place."""
        with self._lock:
            freed = self._give_back(claimer)
        if freed:
            self.pending_signal.notify()  # items are free again: wake waiters

    def _give_back(self, claimer: str) -> bool:
        """:meth:`_release` holding the lock; whether any item was freed."""
        held = self._held.pop(claimer, None)
        if held is None or not held.tasks:
            return False
        both = [*held.entries(), *self._pending.entries()]
        self._pending = _Queue(sorted(both, key=itemgetter(0)))
        return True

    def _give_back_dropped(self) -> None:
        """Give back the items of drains dropped unclosed (called holding the lock)."""
        while self._dropped:
            self._give_back(self._dropped.popleft())

    def forget_claims(self, claimer: str) -> None:
        """``claimer`` was dropped without freeing its items: free them soon (no lock
        taken, so a garbage collector's finalizer may call this anywhere)."""
        self._dropped.append(claimer)

    def iter_pending(self, parent_task_id: str | None) -> PendingDrain:
        claimer = f"drain/{next(self._drains)}"
        drain = self._drain(claimer, parent_task_id)
        # A drain dropped where nothing can close it (its loop was closed first) gives
        # back what it holds once it is gone.
        weakref.finalize(drain, self.forget_claims, claimer)
        return drain

    async def _drain(
        self, claimer: str, parent_task_id: str | None
    ) -> AsyncGenerator[BackgroundTask, None]:
        self._check_open()
        held = self._claim(parent_task_id, claimer)
        places, tasks = held.places, held.tasks
        try:
            while tasks:
                yield tasks[0]
                # The consumer asked for the next item: the one it held is merged.
                tasks.popleft()
                places.popleft()
        finally:
            self._release(claimer)

    async def claim_batch(self, parent_task_id: str | None) -> tuple[str, list[BackgroundTask]]:
        self._check_open()
        claimer = f"batch/{next(self._drains)}"
        return claimer, list(self._claim(parent_task_id, claimer).tasks)

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
            if self._dropped:
                with self._lock:
                    self._give_back_dropped()
            if self._pending.tasks:  # an item no drain holds
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            step = remaining
            if self._held:
                # Held items come back unannounced when their drain is dropped unclosed
                # (its finalizer only notes it: it may wake nobody), so look again soon.
                step = HELD_POLL_SECONDS if step is None else min(step, HELD_POLL_SECONDS)
            await self.pending_signal.wait_for_change(seen, step)

    def close(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        self.close()
