"""Where tasks and the pending queue live: the store interface and the factory.

The handler (``orbiter._internal.background``) holds the reference API's logic and talks
to a :class:`TaskStore`; only the store knows how tasks are kept. Two stores exist:
:class:`~orbiter.store.memory.MemoryStore` (``database=None``, the reference behaviour)
and :class:`~orbiter.store.sql_store.SqlStore` (a SQLite file, durable on return).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Collection
from typing import Any, Protocol

from orbiter._internal.signal import Signal
from orbiter._internal.state import RunNodeStatus
from orbiter._internal.task import BackgroundTask, MergeMode

__all__ = ["CommittedThenCancelled", "PendingDrain", "TaskStore"]


class CommittedThenCancelled(asyncio.CancelledError):
    """A call was cancelled after its write had started, and the write then committed.

    ``result`` is what the call would have returned. The commit worker raises it (when
    asked) with the operation's result; a durable store's :meth:`TaskStore.complete`
    raises it with the task (or None) once its objects show the result, and its
    :meth:`TaskStore.recover_orphans` with the settled tasks. The handler
    turns it back into a plain ``CancelledError`` before it leaves the library
    (``asyncio.timeout`` recognises only that exact type).
    """

    def __init__(self, cancelled: asyncio.CancelledError, result: Any) -> None:
        super().__init__(*cancelled.args)
        self.result = result


class PendingDrain(Protocol):
    """What ``TaskStore.iter_pending`` returns: the queued tasks in order (an async
    iterator), and ``aclose()`` to stop early (freeing what it still holds)."""

    def __aiter__(self) -> AsyncIterator[BackgroundTask]: ...

    def __anext__(self) -> Awaitable[BackgroundTask]: ...

    def aclose(self) -> Awaitable[None]:
        """Stop the drain and free what it holds."""
        ...


class TaskStore(Protocol):
    """Keeps tasks and the pending queue. Every method that changes state is durable on
    return for a durable store; errors are :class:`~orbiter.errors.BackgroundTaskError`."""

    #: Notified whenever a wake-up result is queued through this store.
    pending_signal: Signal

    def add(self, task: BackgroundTask) -> None:
        """Store a new RUNNING task; raise ``DuplicateTaskError`` if the id exists."""
        ...

    async def complete(
        self, task_id: str, result: Any, mode: MergeMode, *, want_task: bool = True
    ) -> BackgroundTask | None:
        """Record the task's result (queueing it when ``mode`` is WAKEUP).

        Returns the task; a store may return None instead when ``want_task`` is False
        (building the object has a cost the caller does not need to pay). A caller
        cancelled while the write is under way gets :class:`CommittedThenCancelled` if
        it committed, a plain ``CancelledError`` if it never started (a write run
        together with others starts with them).
        """
        ...

    def fail(self, task_id: str, error: str) -> BackgroundTask:
        """Record the task's failure; return the task."""
        ...

    def get(self, task_id: str) -> BackgroundTask | None:
        """Return the task, or None."""
        ...

    def list_tasks(self, status: RunNodeStatus | None) -> list[BackgroundTask]:
        """Return the tasks in submission order, optionally only those with ``status``."""
        ...

    def push_pending(self, task: BackgroundTask) -> None:
        """Queue a completed task for a wake-up merge."""
        ...

    def pop_all_pending(self) -> list[BackgroundTask]:
        """Remove and return every queued task, in enqueue order."""
        ...

    def pending_count(self) -> int:
        """Number of queued tasks."""
        ...

    def has_pending(self) -> bool:
        """Whether any task is queued (cheaper than counting a long queue)."""
        ...

    def iter_pending(self, parent_task_id: str | None) -> PendingDrain:
        """Yield queued tasks (of one parent, or all) in enqueue order, each claimed so no
        other drain gets it; each is removed when the consumer asks for the next one, and
        what is still held is freed if the consumer stops early."""
        ...

    async def claim_batch(self, parent_task_id: str | None) -> tuple[str, list[BackgroundTask]]:
        """Claim every free queued task (of one parent, or all); return a claim token."""
        ...

    async def settle_batch(self, claimer: str, *, merged: bool) -> None:
        """Remove (``merged``) or free every task claimed under ``claimer``; a
        cancellation of the caller does not stop it (nothing else would end the claim)."""
        ...

    def forget_claims(self, claimer: str) -> None:
        """``claimer``'s holder is gone without settling: free its tasks at the next
        claim. Takes no lock (a garbage collector's finalizer calls it)."""
        ...

    async def recover_orphans(
        self, action: str, protect: Collection[str] = ()
    ) -> list[tuple[BackgroundTask, str]]:
        """Settle active tasks whose owner is gone (``action``: failed, timeout or adopt);
        return each settled task with the reason its owner counts as gone. A caller
        cancelled once the settling committed gets :class:`CommittedThenCancelled`
        carrying that list."""
        ...

    async def wait_pending(self, timeout: float | None) -> bool:
        """Wait until at least one task is queued; False on timeout."""
        ...

    def close(self) -> None:
        """Release the store's resources; later calls raise ``HandlerClosedError``."""
        ...

    async def aclose(self) -> None:
        """Async form of :meth:`close` (does not block the event loop)."""
        ...
