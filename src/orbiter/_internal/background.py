"""Background task handler with hot-merge and wake-up-merge patterns, durable on SQLite.

Manages long-running background tasks that produce results asynchronously. Results are
merged into the running execution (hot-merge) or queued for later retrieval (wake-up-merge)
when the main task has already completed. With ``database=`` the tasks and the pending
queue live in a SQLite file: every state change is committed when the call returns, so
queued results survive crashes and restarts. With ``database=None`` (the default) the
handler keeps everything in memory, exactly like the reference module.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from enum import StrEnum
from types import TracebackType
from typing import Any, Self

from orbiter._internal.drains import ClaimHolder, OpenDrains
from orbiter._internal.state import RunNode, RunNodeStatus, RunState
from orbiter._internal.task import HOT, WAKEUP, BackgroundTask, MergeMode
from orbiter.errors import BackgroundTaskError, InvalidValueError
from orbiter.store import CommittedThenCancelled, TaskStore
from orbiter.store.codec import Codec, JsonCodec, check_id
from orbiter.store.engine import Synchronous, check_busy_timeout, resolve_database
from orbiter.store.memory import MemoryStore
from orbiter.store.sql_store import SqlStore

__all__ = [
    "BackgroundTask",
    "BackgroundTaskError",
    "BackgroundTaskHandler",
    "MergeMode",
    "OrphanAction",
    "PendingQueue",
]

logger = logging.getLogger(__name__)

MergeCallback = Callable[[BackgroundTask, MergeMode], Awaitable[None] | None]
OrphanCallback = Callable[[BackgroundTask], Awaitable[None] | None]


class OrphanAction(StrEnum):
    """What :meth:`BackgroundTaskHandler.recover_orphans` does with an orphaned task."""

    FAIL = "fail"  # mark it FAILED with an "orphaned: ..." error
    TIMEOUT = "timeout"  # mark it TIMEOUT
    RESUBMIT = "resubmit"  # adopt it (stays RUNNING) and hand it to a callback


#: The longest wait a thread can make (about 292 years): longer intervals are refused, and
#: a longer ``wait()`` timeout waits as long as None.
_FOREVER = threading.TIMEOUT_MAX

#: Default cap on one encoded payload or result (see ``max_value_bytes``).
DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024


class PendingQueue:
    """Thread-safe queue for background results awaiting merge.

    Used in the wake-up-merge pattern: when the main task has already completed,
    background results are queued here for later retrieval and re-processing. A queue
    made with ``PendingQueue()`` lives in memory; ``handler.pending_queue`` of a durable
    handler is the file's queue, and its ``push``/``pop_all`` are committed on return.
    """

    def __init__(self) -> None:
        self._store: TaskStore = MemoryStore()

    @classmethod
    def _of(cls, store: TaskStore) -> PendingQueue:
        """The queue view of ``store`` (used by the handler)."""
        queue = cls.__new__(cls)
        queue._store = store
        return queue

    def push(self, task: BackgroundTask) -> None:
        """Add a completed task to the pending queue. Signals any waiters."""
        if not isinstance(task, BackgroundTask):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise InvalidValueError(f"push() takes a BackgroundTask, not {type(task).__name__}")
        # Ids are checked in both modes, as submit() checks them.
        check_id(task.task_id, "task_id")
        check_id(task.parent_task_id, "parent_task_id")
        self._store.push_pending(task)

    def pop_all(self) -> list[BackgroundTask]:
        """Remove and return all pending tasks, in the order they were queued."""
        return self._store.pop_all_pending()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until at least one item is available.

        Args:
            timeout: Max seconds to wait, or None for no timeout.

        Returns:
            True if items are available, False on timeout.
        """
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise InvalidValueError(
                    f"timeout must be a number of seconds or None, not {type(timeout).__name__}"
                )
            # (Compared before isnan(), which cannot take an int too large for a float.)
            if timeout < 0 or (not timeout > _FOREVER and math.isnan(timeout)):
                raise InvalidValueError(f"timeout must be >= 0 seconds, not {timeout!r}")
            if timeout > _FOREVER:
                timeout = None  # as long as None
        return await self._store.wait_pending(timeout)

    @property
    def size(self) -> int:
        """Number of pending items."""
        return self._store.pending_count()

    @property
    def empty(self) -> bool:
        """Whether the queue has no pending items."""
        return not self._store.has_pending()


class BackgroundTaskHandler:
    """Manages background tasks with hot-merge and wake-up-merge patterns.

    **Hot-merge**: when the main task is still running and a background task completes,
    the result is merged directly into the active execution state (``on_merge``
    callbacks run with ``MergeMode.HOT``).

    **Wake-up-merge**: when the main task has already completed (or paused), background
    results are queued in a :class:`PendingQueue`; ``drain_pending()`` yields them when a
    checkpoint is restored, running the callbacks with ``MergeMode.WAKEUP``.

    Args:
        state: Optional ``RunState`` for tracking background task nodes.
        database: A SQLite file path or a SQLAlchemy URL (``sqlite+aiosqlite:///...``);
            None keeps everything in memory.
        synchronous: ``"FULL"`` (default: a returned call survives power loss) or
            ``"NORMAL"`` (survives a process crash; faster, as commits skip the fsync).
        auto_migrate: Upgrade an older schema at open (default); False refuses instead,
            naming the command to run. A newer schema is always refused.
        busy_timeout: Seconds to wait for another process holding the write lock (0 to
            about 24.8 days, what SQLite can hold). The handler's commit thread waits;
            an async call's event loop does not.
        codec: Encodes payloads and results as JSON text (default: strict JSON).
        max_value_bytes: Largest encoded payload or result accepted (a longer
            ``handle_error`` text is stored truncated to about this size).
        poll_interval: How often ``pending_queue.wait()`` looks for results that other
            processes queued, in seconds.
        heartbeat_interval: How often this handler renews its lease, in seconds.
        lease_timeout: Seconds without a heartbeat after which other processes treat this
            handler as gone (its running tasks become orphans; items it was draining are
            freed). A handler on the same host is known gone at once when its process exits.

    Raises:
        DatabaseError: the database cannot be opened (the message says why).
        SchemaError: its schema is newer, foreign, or older with ``auto_migrate=False``.
    """

    def __init__(
        self,
        state: RunState | None = None,
        *,
        database: str | os.PathLike[str] | None = None,
        synchronous: str = "FULL",
        auto_migrate: bool = True,
        busy_timeout: float = 30.0,
        codec: Codec | None = None,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        poll_interval: float = 0.05,
        heartbeat_interval: float = 5.0,
        lease_timeout: float = 30.0,
    ) -> None:
        if state is not None and not isinstance(state, RunState):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise InvalidValueError(f"state must be a RunState or None, not {type(state).__name__}")
        if (
            isinstance(max_value_bytes, bool)
            or not isinstance(max_value_bytes, int)
            or max_value_bytes < 1
        ):
            raise InvalidValueError(
                f"max_value_bytes must be a positive int, not {max_value_bytes!r}"
            )
        for name, seconds in (
            ("poll_interval", poll_interval),
            ("heartbeat_interval", heartbeat_interval),
            ("lease_timeout", lease_timeout),
        ):
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not 0 < seconds <= _FOREVER
            ):
                raise InvalidValueError(
                    f"{name} must be > 0 and at most {_FOREVER:.0f} seconds, not {seconds!r}"
                )
        check_busy_timeout(busy_timeout)
        if codec is not None and not (
            callable(getattr(codec, "dumps", None)) and callable(getattr(codec, "loads", None))
        ):
            raise InvalidValueError(
                f"codec must have dumps(value) -> str and loads(text) methods, not "
                f"{type(codec).__name__}"
            )
        if lease_timeout <= heartbeat_interval:
            raise InvalidValueError(
                f"lease_timeout ({lease_timeout}) must exceed heartbeat_interval "
                f"({heartbeat_interval}), or live handlers would look gone"
            )
        self._state = state
        self._merge_callbacks: list[MergeCallback] = []
        #: Work a cancelled call left to finish: hot merges (see handle_result) and
        #: resubmissions (see recover_orphans).
        self._detached: set[asyncio.Task[None]] = set()
        #: Writes under way whose cancelled caller may still detach work (see _finishing).
        self._finishing_writes: set[asyncio.Future[None]] = set()
        self._open_drains = OpenDrains()
        self._store: TaskStore
        if database is None:
            self._store = MemoryStore()
        else:
            level: Synchronous
            if isinstance(synchronous, str) and synchronous.upper() == "FULL":
                level = "FULL"
            elif isinstance(synchronous, str) and synchronous.upper() == "NORMAL":
                level = "NORMAL"
            else:
                raise InvalidValueError(
                    f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}"
                )
            self._store = SqlStore(
                resolve_database(database),
                synchronous=level,
                busy_timeout=busy_timeout,
                auto_migrate=auto_migrate,
                codec=codec or JsonCodec(),
                max_value_bytes=max_value_bytes,
                poll_interval=poll_interval,
                heartbeat_interval=heartbeat_interval,
                lease_timeout=lease_timeout,
            )
        self._pending = PendingQueue._of(self._store)

    # -- lifecycle -------------------------------------------------------------------

    async def aclose(self) -> None:
        """Finish queued writes and release the database. Safe to call twice."""
        loop, me = asyncio.get_running_loop(), asyncio.current_task()
        try:
            # Detached work may still use the handler, and a write under way may still
            # detach some (a caller cancelled as ``aclose`` began): wait until neither is
            # left (``asyncio.wait`` never cancels them).
            while waiting := [
                *(w for w in self._finishing_writes if w.get_loop() is loop),
                *(t for t in self._detached if t.get_loop() is loop and t is not me),
            ]:
                await asyncio.wait(waiting)
        finally:
            await self._store.aclose()

    def close(self) -> None:
        """Synchronous form of :meth:`aclose`."""
        self._store.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the reference API -------------------------------------------------------------

    def submit(
        self,
        task_id: str,
        parent_task_id: str,
        *,
        payload: Any = None,
    ) -> BackgroundTask:
        """Register a new background task.

        Creates a BackgroundTask, marks it as started, and optionally creates a tracking
        RunNode in the state. Durable handlers have committed the task on return.

        Returns:
            The created ``BackgroundTask``.

        Raises:
            BackgroundTaskError: If a task with this ID already exists (here or in the
                file), or an argument is invalid (nothing is written then).
        """
        check_id(task_id, "task_id")
        check_id(parent_task_id, "parent_task_id")
        task = BackgroundTask(task_id, parent_task_id, payload=payload)
        task.start()
        self._store.add(task)
        logger.debug("background task %r submitted (parent %r)", task_id, parent_task_id)
        if self._state is not None:
            self._state.new_node(agent_name=f"bg:{task_id}").start()
        return task

    async def handle_result(
        self,
        task_id: str,
        result: Any,
        *,
        is_main_running: bool = True,
    ) -> MergeMode:
        """Handle a background task's completion.

        Routes to hot-merge (``on_merge`` callbacks run now) or wake-up-merge (the result
        is queued; callbacks run when it is drained) based on whether the main task is
        still running. Durable handlers have committed the result (and its queue entry)
        before the callbacks run.

        Cancelling the call before a durable handler has started its write stores
        nothing. Once the write has started, the cancellation waits for its commit, the
        task then shows the result, and a hot merge's ``on_merge``
        callbacks still run, in a task of their own, so the merge is not lost and the
        cancellation is not held up by them (``aclose`` waits for them).

        Returns:
            The ``MergeMode`` that was applied.

        Raises:
            BackgroundTaskError: If the task ID is not found, the task already completed,
                or the result cannot be stored (nothing is written then).
        """
        check_id(task_id, "task_id")
        mode = HOT if is_main_running else WAKEUP
        merge_now = mode is HOT and bool(self._merge_callbacks)
        try:
            if merge_now:  # a cancelled caller detaches the merge: aclose waits for it
                with self._finishing():
                    task = await self._store.complete(task_id, result, mode, want_task=True)
            else:
                task = await self._store.complete(task_id, result, mode, want_task=False)
        except CommittedThenCancelled as committed:
            self._succeeded(task_id)
            if merge_now:
                self._detach(self._notify_merge(committed.result, mode))
            raise asyncio.CancelledError(*committed.args) from None
        logger.debug("background task %r completed: %s merge", task_id, mode)
        if self._state is not None:  # checked here too: this is the per-call path
            self._succeeded(task_id)
        if merge_now:
            assert task is not None
            await self._notify_merge(task, mode)
        return mode

    def handle_error(self, task_id: str, error: str) -> None:
        """Record a background task failure.

        Raises:
            BackgroundTaskError: If the task ID is not found or the task already completed.
        """
        check_id(task_id, "task_id")
        if not isinstance(error, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise InvalidValueError(f"error must be a str, not {type(error).__name__}")
        task = self._store.fail(task_id, error)
        logger.warning("background task %r failed: %s", task_id, task.error)
        if node := self._node(task_id):
            node.fail(task.error or error)  # as stored (a runaway text is truncated)

    async def drain_pending(
        self, parent_task_id: str | None = None
    ) -> AsyncGenerator[BackgroundTask, None]:
        """Yield all pending background tasks (wake-up-merge pattern).

        Used when restoring from a checkpoint to process any background results that
        arrived while the main task was paused. Items come in enqueue order; each one's
        ``on_merge`` callbacks run (``MergeMode.WAKEUP``) just before it is yielded.

        An item leaves the queue when the consumer asks for the next one. If the process
        dies, or the consumer's loop raises or breaks, while it holds item *k*, the next
        drain yields *k* again and everything after it, never anything before: delivery
        is at-least-once for the item in hand, so merge idempotently by ``task_id``.
        Items a drain holds are claimed: concurrent drains (other coroutines or processes)
        never receive the same item while its holder is alive. A new drain first waits,
        briefly, for this handler's drains that were stopped early to close (see
        ``orbiter._internal.drains``), so it starts at the item they held.

        Args:
            parent_task_id: Only drain the results of this run (default: all runs).

        Yields:
            Each pending BackgroundTask with its result.
        """
        if parent_task_id is not None:
            check_id(parent_task_id, "parent_task_id")
        await self._open_drains.wait_for_closing(parent_task_id)
        with self._open_drains.opened(parent_task_id):
            async with contextlib.aclosing(self._store.iter_pending(parent_task_id)) as pending:
                async for task in pending:
                    if self._merge_callbacks:
                        await self._notify_merge(task, MergeMode.WAKEUP)
                    yield task

    @contextlib.asynccontextmanager
    async def restore_pending(
        self, parent_task_id: str | None = None
    ) -> AsyncIterator[list[BackgroundTask]]:
        """Take a run's pending results as one batch, all or nothing (checkpoint restore).

        ``async with handler.restore_pending("run-1") as results:`` claims every pending
        result of the run (so no other drain takes them), runs the ``on_merge`` callbacks
        (``MergeMode.WAKEUP``), and hands the list to the block. When the block finishes,
        all of them leave the queue in one commit; if it raises (or the process dies),
        every one stays pending for the next restore.

        Args:
            parent_task_id: The run to restore (default: every run's results).
        """
        if parent_task_id is not None:
            check_id(parent_task_id, "parent_task_id")
        await self._open_drains.wait_for_closing(parent_task_id)
        with self._open_drains.opened(parent_task_id):
            claimer, tasks = await self._store.claim_batch(parent_task_id)
            # Should this restore be dropped unfinished where nothing can end it (its
            # loop closed), its claims are freed once it is collected.
            held = ClaimHolder()
            weakref.finalize(held, self._store.forget_claims, claimer)
            merged = False
            try:
                for task in tasks:
                    await self._notify_merge(task, MergeMode.WAKEUP)
                yield tasks
                merged = True
            finally:
                await self._store.settle_batch(claimer, merged=merged)

    async def recover_orphans(
        self,
        action: OrphanAction | str = "fail",
        *,
        resubmit: OrphanCallback | None = None,
    ) -> list[BackgroundTask]:
        """Settle running tasks whose owner is gone; a task with a live owner is untouched.

        An owner is gone when its process has provably exited (same host), its handler
        was closed, or it stopped renewing its lease (any host). Safe to run at any time,
        from several processes at once: each orphan is settled exactly once.

        Args:
            action: ``"fail"`` (FAILED, with an ``orphaned: ...`` error), ``"timeout"``
                (TIMEOUT), or ``"resubmit"`` (this handler adopts the task, which stays
                RUNNING, and ``resubmit(task)`` is awaited to restart the work from its
                payload; if it raises, the task is marked FAILED).
            resubmit: The callback for ``"resubmit"``.

        Cancelled once its write has started, the recovery still completes: the settled
        tasks are resubmitted (or their nodes marked) in a task of their own.

        Returns:
            The settled tasks.
        """
        try:
            chosen = OrphanAction(action)
        except ValueError:
            raise InvalidValueError(
                f"action must be one of {[a.value for a in OrphanAction]}, not {action!r}"
            ) from None
        if (chosen is OrphanAction.RESUBMIT) != (resubmit is not None):
            raise InvalidValueError("pass resubmit= exactly when action is 'resubmit'")
        if resubmit is not None and not callable(resubmit):
            raise InvalidValueError(
                f"resubmit must be a callable taking the task, not {type(resubmit).__name__}"
            )
        status = {
            OrphanAction.FAIL: "failed",
            OrphanAction.TIMEOUT: "timeout",
            OrphanAction.RESUBMIT: "adopt",
        }[chosen]
        try:
            with self._finishing():
                settled = await self._store.recover_orphans(status)
        except CommittedThenCancelled as committed:
            # Settled (adopted) in the file: the rest must follow, or adopted tasks
            # would stay RUNNING under this live handler and never be redone.
            self._detach(self._after_recovery(committed.result, chosen, resubmit))
            raise asyncio.CancelledError(*committed.args) from None
        await self._after_recovery(settled, chosen, resubmit)
        return [task for task, _ in settled]

    async def _after_recovery(
        self,
        settled: list[tuple[BackgroundTask, str]],
        action: OrphanAction,
        resubmit: OrphanCallback | None,
    ) -> None:
        """Log each settled orphan, then resubmit it or mark its run-state node."""
        for task, reason in settled:
            logger.warning(
                "orphaned background task %r settled (%s): %s", task.task_id, action.value, reason
            )
            if resubmit is not None:
                await self._resubmit(task, resubmit)
            else:
                self._mark_node(task)

    async def _resubmit(self, task: BackgroundTask, resubmit: OrphanCallback) -> None:
        try:
            outcome = resubmit(task)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as exc:
            logger.exception("resubmitting orphaned background task %r failed", task.task_id)
            self.handle_error(task.task_id, f"orphaned; resubmit failed: {exc}")

    def _node(self, task_id: str) -> RunNode | None:
        """The run-state node tracking ``task_id`` (``"bg:<task_id>"``), if any."""
        return None if self._state is None else self._state.find_node(f"bg:{task_id}")

    @contextlib.contextmanager
    def _finishing(self) -> Iterator[None]:
        """Mark a write whose caller, if cancelled once it started, hands the rest of its
        work to :meth:`_detach` (right after this block, in the same step): ``aclose``
        waits until it is over."""
        over = asyncio.get_running_loop().create_future()
        self._finishing_writes.add(over)
        try:
            yield
        finally:
            self._finishing_writes.discard(over)
            over.set_result(None)

    def _detach(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task of its own: its caller was cancelled (``aclose`` waits)."""
        task = asyncio.get_running_loop().create_task(work)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    def _succeeded(self, task_id: str) -> None:
        """Mark the run-state node of ``task_id`` SUCCESS, if there is one."""
        if self._state is not None and (node := self._node(task_id)):
            node.succeed()

    def _mark_node(self, task: BackgroundTask) -> None:
        node = self._node(task.task_id)
        if node is None:
            return
        if task.status is RunNodeStatus.TIMEOUT:
            node.timeout()
        elif task.status is RunNodeStatus.FAILED:
            node.fail(task.error or "orphaned")

    def on_merge(self, callback: Any) -> None:
        """Register a callback for merge events.

        The callback is called with ``(task, merge_mode)`` whenever a background result is
        merged (hot, or wake-up when drained). An async callable is awaited; a plain one is
        called. A failing callback is logged and the others still run.
        """
        if not callable(callback):
            raise InvalidValueError(f"on_merge() takes a callable, not {type(callback).__name__}")
        self._merge_callbacks.append(callback)

    def get_task(self, task_id: str) -> BackgroundTask | None:
        """Retrieve a background task by ID; None if not found."""
        check_id(task_id, "task_id")
        return self._store.get(task_id)

    def list_tasks(self, *, status: RunNodeStatus | None = None) -> list[BackgroundTask]:
        """List background tasks in submission order, optionally filtered by status."""
        if status is not None and not isinstance(status, RunNodeStatus):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise InvalidValueError(
                f"status must be a RunNodeStatus or None, not {status!r} "
                f"({type(status).__name__}); e.g. RunNodeStatus.RUNNING"
            )
        return self._store.list_tasks(status)

    @property
    def pending_queue(self) -> PendingQueue:
        """Access the pending queue for wake-up-merge tasks."""
        return self._pending

    # -- internals ---------------------------------------------------------------------

    async def _notify_merge(self, task: BackgroundTask, mode: MergeMode) -> None:
        """Run every merge callback; a failing one is logged and the rest still run."""
        for callback in list(self._merge_callbacks):
            try:
                outcome = callback(task, mode)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                logger.exception(
                    "merge callback %r failed for background task %r (%s merge)",
                    callback,
                    task.task_id,
                    mode.value,
                )
