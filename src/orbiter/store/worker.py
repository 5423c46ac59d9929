"""The commit worker: one connection, shared commits, as few thread hand-offs as possible.

Every operation on a durable store is a function of the connection. Durable writes from
async code are queued for the worker thread, which takes everything queued, runs it in
one transaction, commits once, and only then answers each caller. So:

* 1,000 concurrent ``await handle_result(...)`` calls share a few commits (group commit),
  each still durable when it returns, and the event loop never waits on an fsync;
* a synchronous call (``submit``, ``handle_error``, ``get_task``...), and an async read or
  acknowledgement, runs its transaction right on the calling thread when the connection is
  idle (no hand-off), and otherwise joins the worker's next batch; the worker needs no
  event loop, so a sync call on the loop thread cannot deadlock with in-flight async
  writes, and one writing connection means a handler never fights itself for SQLite's
  lock;
* a blocked thread's write takes the place of the async writes of the running batch that
  have not started yet (they go on in the next batch), and a batch that starts with
  threads' writes takes at most ``MAKE_WAY_AFTER`` async ones along, so it waits for one
  commit, not for a batch of thousands, while async writes keep a share of every commit;
  a blocked read runs on a second connection, which in WAL mode does not wait for the
  writer at all.
* only the commit thread waits for another connection's lock (up to ``busy_timeout``):
  a transaction run on the calling thread waits for nothing, and an operation that finds
  the file locked there goes to the worker instead, unstarted, so an event loop never
  stops for that wait and a cancellation can still withdraw the operation.

Operations must not write before raising a :class:`BackgroundTaskError` (they check with
guarded statements first); such an error is the caller's answer and the batch goes on. Any
other error rolls the batch back, and its operations are retried one per transaction so
only the faulty one fails.

Consecutive operations of a batch that share a ``together`` function (completions, see
``finish.py``) run as one: one statement for up to ``MAX_TOGETHER`` of them.

Cancelling an async caller withdraws its operation if it has not started yet (operations
run together start together); once started, it runs to its end and the cancellation
reaches the caller after it (see :class:`_Waiter`), so a cancelled call never leaves its
effect unknown.

A process forked while a worker is open gets a copy of it without its thread and with
its connection, which SQLite does not allow a child to use. So a fork first waits (up to
``FORK_WAIT`` seconds in all) until no handler is being opened (see ``fork_gate.py``) and
no transaction runs on any open worker's connections: SQLite's own state, which the
child inherits, is then at rest. In
the child every copied worker is closed at once, its connections too, with nothing
written: its calls raise :class:`HandlerClosedError` saying to open a new handler, its
closing (or the child's exit) leaves the parent's owner row alone, and the child may open
connections of its own to the same file. (A file whose transaction was still under way
at the fork is refused in the child: see :func:`refuse_if_unsafe_after_fork`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine

from orbiter.errors import BackgroundTaskError, DatabaseError, HandlerClosedError
from orbiter.store import CommittedThenCancelled, fork_gate
from orbiter.store.executor import Db

__all__ = ["CommitWorker", "Operation", "Together"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Most operations one transaction takes; bounds a batch's latency and memory.
MAX_BATCH = 2_000

#: Async operations a batch runs before a blocked thread may take the place of the rest:
#: bounds how long a sync call waits, and guarantees async writes progress meanwhile.
MAKE_WAY_AFTER = 8

#: Most operations run together as one statement (see ``_run_next``): no more than a
#: blocked thread lets run before it joins a batch.
MAX_TOGETHER = MAKE_WAY_AFTER

Operation = Callable[[Db], T]

#: Runs a group of operations as one (an operation's ``together`` attribute): True if all
#: of them applied, else False with nothing written (each is then run alone).
Together = Callable[[Db, list[Any]], bool]

#: Taken by whoever decides an async operation's fate: the worker starting it, or the
#: caller's cancellation withdrawing it (see :class:`_Waiter`).
_START_LOCK = threading.Lock()

#: Workers not yet collected, for the fork hooks below.
_OPEN_WORKERS: weakref.WeakSet[CommitWorker] = weakref.WeakSet()

#: Seconds a fork waits, for all workers together, for transactions under way (a long
#: commit; the commit thread waits for another process's lock between transactions, see
#: ``CommitWorker._begin_when_free``) before it goes ahead anyway.
FORK_WAIT = 5.0


#: Files whose connections a forked child inherited in the middle of a transaction (the
#: fork did not wait longer): see :func:`refuse_if_unsafe_after_fork`.
_UNSAFE_IN_CHILD: set[str] = set()


#: The thread that is forking: the locks it took, by worker (several threads may fork at
#: once; each releases only what it took).
_forking = threading.local()


def _before_fork() -> None:
    deadline = time.monotonic() + FORK_WAIT  # for handlers being opened and workers together
    # What this fork takes is recorded as it is taken, so the after-fork hooks let go of
    # it even if an interrupt cut this hook short (the fork then goes on).
    held: dict[CommitWorker, list[threading.Lock]] = {}
    _forking.held, _forking.opening, _forking.gate = held, (), object()
    _forking.opening = fork_gate.wait_for_opens(_forking.gate, deadline)
    # One order for every forking thread, so two that fork at once cannot each hold a
    # lock the other waits for.
    for worker in sorted(_OPEN_WORKERS, key=id):
        held[worker] = []
        worker._hold_for_fork(deadline, held[worker])  # pyright: ignore[reportPrivateUsage]


def _after_fork_in_parent() -> None:
    # Registered twice, and each step is done once: an interrupt that arrived during the
    # fork is raised as the first call begins (and only printed), and the second does
    # the work.
    fork_gate.after_fork(getattr(_forking, "gate", None), in_child=False)
    for locks in getattr(_forking, "held", {}).values():
        while locks:
            locks.pop().release()


def _after_fork_in_child() -> None:
    global _START_LOCK  # noqa: PLW0603 - the parent's may be held, and never let go here
    _START_LOCK = threading.Lock()
    fork_gate.after_fork(None, in_child=True)
    # Files a handler was still being opened on when the wait ran out: as unsafe here as
    # those of a worker caught in a transaction.
    _UNSAFE_IN_CHILD.update(getattr(_forking, "opening", ()))
    held: dict[CommitWorker, list[threading.Lock]] = getattr(_forking, "held", {})
    for worker in list(_OPEN_WORKERS):
        at_rest = len(held.get(worker, ())) == 2  # no transaction ran on it at the fork
        worker._close_in_forked_child(at_rest=at_rest)  # pyright: ignore[reportPrivateUsage]


def refuse_if_unsafe_after_fork(path: str) -> None:
    """Refuse to open ``path`` in a forked child that inherited a connection to it in the
    middle of a transaction (one that ran longer than ``FORK_WAIT``, such as a handler's
    open waiting for another process's lock): SQLite's copied record of the file, which a
    new connection would share, shows that transaction's locks, so no connection here can
    be made safe.

    Raises:
        DatabaseError: naming the file and what to do instead.
    """
    if path in _UNSAFE_IN_CHILD:
        raise DatabaseError(
            f"{path}: this process was forked while a handler of its parent was in the "
            "middle of a transaction on this file, so SQLite cannot safely open it here; "
            "start the process with the 'spawn' method (or fork when no handler is being "
            "opened while another process holds the file's lock)"
        )


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
os.register_at_fork(after_in_parent=_after_fork_in_parent)  # see there

#: ``deciding`` is True on a thread from just before it takes ``_START_LOCK`` until it
#: has let go: a signal handler that runs there (``asyncio.run`` cancels the main task on
#: Ctrl-C) and cancels a waiter must not wait for a lock its own thread holds.
_here = threading.local()


class _Inline(enum.Enum):
    """What came of trying to run an operation on the calling thread."""

    RAN = "ran"  #: it ran (its ``outcome`` is set)
    BUSY = "busy"  #: the connection is in use in this process: nothing ran
    LOCKED = "locked"  #: another connection holds a lock it needs: nothing ran


#: The members as plain names: reading an Enum member costs ~4x a global (per call).
_RAN, _BUSY, _LOCKED = _Inline.RAN, _Inline.BUSY, _Inline.LOCKED


class _LockedElsewhere(Exception):
    """An inline transaction met another connection's lock before doing anything."""


class _Waiter(asyncio.Future[Any]):
    """An async caller's answer, which cannot be cancelled once its operation started.

    ``Task.cancel()`` cancels the future its task awaits. Before the operation starts
    (in the queue, or in a batch waiting for SQLite's lock or for its turn) that
    withdraws it: it is skipped. Operations run together (see ``_run_next``) all start
    when their group does. Once started this refuses, so asyncio lets the
    operation finish, answers the waiter and only then raises ``CancelledError`` in the
    caller, which can still read the outcome here.
    """

    started = False  # set (under _START_LOCK) right before the operation runs

    def cancel(self, msg: Any = None) -> bool:
        if getattr(_here, "deciding", False):
            # Called by a signal handler while this thread decides an operation's fate:
            # refuse, as for a started operation; the task is cancelled once it is done.
            return False
        _here.deciding = True
        try:
            with _START_LOCK:
                if self.started:
                    return False
                return super().cancel(msg)
        finally:
            _here.deciding = False


class _Answer(Generic[T]):
    """A blocked thread's answer, waited for on a bare lock that the commit thread lets
    go once the answer is in.

    Not a ``concurrent.futures.Future``: its ``result()`` waits inside a
    ``threading.Condition``, Python code in which a KeyboardInterrupt can land with the
    condition's lock taken and never let go; the commit thread, answering, would then
    wait for that lock for good, and every later call with it. A bare lock's
    ``acquire`` either takes the lock or raises, and ``with`` lets it go.

    It has the part of a ``Future`` that the commit thread uses
    (``set_running_or_notify_cancel``, ``running``, ``set_result``, ``set_exception``),
    so ``_Queued.future`` holds either.
    """

    __slots__ = ("_outcome", "_ready")

    def __init__(self) -> None:
        self._outcome: tuple[bool, Any] = (False, None)
        self._ready = threading.Lock()
        self._ready.acquire()  # let go when answered

    def set_running_or_notify_cancel(self) -> bool:
        """Always True: a blocked thread's call is never withdrawn."""
        return True

    def running(self) -> bool:
        """Always True: the caller waits until it is answered."""
        return True

    def set_result(self, value: T) -> None:
        self._outcome = (True, value)
        self._ready.release()

    def set_exception(self, error: BaseException) -> None:
        self._outcome = (False, error)
        self._ready.release()

    def result(self) -> T:
        """Wait for the answer; return the operation's value or raise its error."""
        with self._ready:
            ok, value = self._outcome
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]


@dataclass(slots=True, eq=False)
class _Queued(Generic[T]):
    """One operation and whoever waits for it: a thread (``future``) or a coroutine
    (``waiter``, an asyncio future resolved on its own loop)."""

    run: Operation[T]
    writes: bool
    relaxed: bool
    future: Future[T] | _Answer[T] | None = None
    waiter: _Waiter | None = None
    outcome: tuple[bool, Any] = (False, None)

    def wanted(self) -> bool:
        """False if the caller gave up (cancelled) before the batch took the operation.

        A thread's call can no longer be withdrawn after this; a coroutine's can, until
        :meth:`start`.
        """
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        return self.waiter is None or not self.waiter.cancelled()

    def start(self) -> bool:
        """Called right before the operation runs: False if its coroutine was cancelled
        meanwhile (it is then skipped); once True, the caller can no longer withdraw it."""
        waiter = self.waiter
        if waiter is None or waiter.started:
            return True
        _here.deciding = True
        try:
            with _START_LOCK:
                if waiter.cancelled():
                    return False
                waiter.started = True
                return True
        finally:
            _here.deciding = False


class CommitWorker:
    """Runs operations on a private connection, in shared transactions.

    Args:
        engine: Where the connection comes from (configured by ``engine.py``).
        translate: Maps a driver exception to the error callers should see.
        synchronous: The connection's ``PRAGMA synchronous`` level.
        name: The thread's name (shows in debuggers and ``py-spy``).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        translate: Callable[[BaseException], BaseException],
        synchronous: str = "FULL",
        name: str = "orbiter-bg-commit",
    ) -> None:
        self._engine = engine
        self._synchronous = synchronous
        #: The connection's ``PRAGMA synchronous`` right now (None: not known).
        self._level: str | None = synchronous
        self._translate = translate
        # The queues and ``_closed`` are guarded by ``_lock``, taken only by ``with`` on a
        # bare lock, and the worker sleeps on ``_signals``: both are C code, which a
        # KeyboardInterrupt cannot leave half done (a ``threading.Condition``'s methods
        # are Python code, and one landing inside them left its lock held for good).
        self._lock = threading.Lock()
        #: Blocked threads' operations (and other urgent ``submit``\ s): served first.
        self._urgent: deque[_Queued[Any]] = deque()
        #: Async operations, and ``submit``\ s that are not urgent, in call order.
        self._queue: deque[_Queued[Any]] = deque()
        self._signals: queue.SimpleQueue[None] = queue.SimpleQueue()  # one per enqueue
        self._connection_lock = threading.Lock()  # whoever runs a transaction holds it
        self._batch_taken = False  # the commit thread holds a batch it has not finished
        self._closed = False
        self._forked = False  # this is a forked child's copy (see the module docstring)
        #: Durable async writes made during the current turn of each event loop, handed
        #: on together at the end of the turn (see ``acall``).
        self._staged: dict[asyncio.AbstractEventLoop, list[_Queued[Any]]] = {}
        self._async_writes = 0  # durable async writes between their call and their return
        self._reader_lock = threading.Lock()  # whoever reads on the second connection
        self._reader: Db | None = None  # opened on first use, see _read_aside
        self._reader_pooled: Any = None
        #: Transactions committed so far (each may hold many operations).
        self.commits = 0
        try:
            self._pooled = engine.raw_connection()
        except Exception as exc:
            engine.dispose()
            raise translate(exc) from exc
        self._db = Db(self._pooled.driver_connection)  # type: ignore[arg-type]
        #: How long (seconds) the commit thread waits for another connection's lock: the
        #: connection's ``busy_timeout`` as the engine set it up. The connection itself
        #: waits for nothing (see :meth:`_begin_when_free`).
        self._patience: float = self._db.raw.execute("PRAGMA busy_timeout").fetchone()[0] / 1000
        self._db.raw.execute("PRAGMA busy_timeout=0")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        _OPEN_WORKERS.add(self)

    def refuse_if_closed(self) -> None:
        """Raise :class:`HandlerClosedError` if the worker is closed (or a forked copy)."""
        if self._closed:
            raise self._closed_error()

    def _closed_error(self) -> HandlerClosedError:
        if self._forked:
            return HandlerClosedError(
                "the handler was opened by the parent of this forked process; a child "
                "must open a BackgroundTaskHandler of its own"
            )
        return HandlerClosedError("the handler is closed")

    def _hold_for_fork(self, deadline: float, held: list[threading.Lock]) -> None:
        """Wait (until ``deadline``, a ``time.monotonic()``) until no transaction runs on
        this worker's connections; add the locks taken, which keep it so, to ``held``."""
        for lock in (self._connection_lock, self._reader_lock):
            if lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                held.append(lock)

    def _close_in_forked_child(self, *, at_rest: bool) -> None:
        """Close this copy in a forked child without touching what the parent owns.

        Its connections are closed right away, in SQLite too: a connection the child
        opens to the same file would otherwise share SQLite's per-process record of the
        file with these copies, which claims locks the child does not hold (the parent
        does), and the parent, closing last as far as the locks show, would delete the
        log the child writes to. Closing them changes nothing on disk: the fork left no
        transaction open, and the parent's lock keeps SQLite from checkpointing here.
        Had a transaction been under way (the fork stopped waiting after ``FORK_WAIT``),
        closing would roll it back in the log index the parent shares; the copies are
        then left alone and the file refused in this process instead.
        """
        self._forked = self._closed = True
        self._lock = threading.Lock()  # the parent's may be held
        self._signals = queue.SimpleQueue()
        self._connection_lock = threading.Lock()
        self._reader_lock = threading.Lock()
        self._urgent.clear()  # the parent's callers wait for these, not the child's
        self._queue.clear()
        self._staged.clear()
        # (A transaction can be open with its lock free: one an interrupt kept from
        # ending, which the next run would have ended.)
        if not at_rest or _in_transaction(self._db) or _in_transaction(self._reader):
            # Closing would roll back in the log index the parent shares.
            _UNSAFE_IN_CHILD.add(str(self._engine.url.database))
            return
        for pooled in (self._pooled, self._reader_pooled):
            if pooled is not None:
                with contextlib.suppress(Exception):  # closed already (a closed handler)
                    pooled.close()
        self._reader_pooled = self._reader = None

    # -- callers' side -------------------------------------------------------------

    def _enqueue(self, item: _Queued[Any], *, first: bool = False) -> None:
        with self._lock:
            self.refuse_if_closed()
            (self._urgent if first else self._queue).append(item)
            # A signal for every enqueue, not only into an empty queue: a KeyboardInterrupt
            # between an earlier caller's append and its signal must not leave the worker
            # asleep with work queued (every later call would wait behind it).
            self._signals.put(None)

    def _enqueue_all(self, items: list[_Queued[Any]]) -> None:
        with self._lock:
            self.refuse_if_closed()
            self._queue.extend(items)
            self._signals.put(None)

    def submit(
        self, run: Operation[T], *, writes: bool = True, relaxed: bool = False, urgent: bool = True
    ) -> Future[T]:
        """Queue ``run``; the future resolves after the transaction holding it commits.

        ``relaxed`` operations (acknowledgements whose loss only means a redelivery) may
        commit with ``synchronous=NORMAL``: safe against a process crash, not power loss.
        A batch is relaxed only if every operation in it is. An ``urgent`` operation (a
        blocked thread's, perhaps the event loop's) goes first: it joins the running or
        very next batch instead of waiting behind queued async writes.
        """
        future: Future[T] = Future()
        self._enqueue(_Queued(run, writes, relaxed, future=future), first=urgent)
        return future

    def _run_inline(self, item: _Queued[T]) -> _Inline:
        """Run ``item`` on the calling thread when the connection is idle (no hand-off).

        Returns ``BUSY`` when the worker is busy or has work queued, and ``LOCKED`` when
        another connection (another process) holds a lock the transaction needs: an
        inline transaction does not wait for it (an async caller's event loop would stop,
        and its cancellation could not withdraw the write); the caller queues the item
        for the commit thread, which waits up to ``busy_timeout``. Nothing ran then.

        The lock is taken by a ``with``, which a KeyboardInterrupt cannot split from its
        release (an ``acquire`` followed by ``try`` can be, leaving it held for good); in
        the rare case another thread takes it between the look and the ``with``, this
        call waits for that transaction (or for one of its tries for another process's
        lock) and then runs.
        """
        # The queues first, then _batch_taken: the commit thread sets it before it empties
        # them, so an operation queued before this call is seen in one or the other (and
        # this call does not commit before it, even while the commit thread lets go of
        # the connection between tries for another process's lock).
        if self._urgent or self._queue or self._batch_taken or self._connection_lock.locked():
            return _BUSY
        with self._connection_lock:
            self.refuse_if_closed()
            try:
                self._execute([item], inline=True)
            except _LockedElsewhere:
                return _LOCKED
            return _RAN

    def _read_aside(self, run: Operation[T], *, wait: bool = False) -> _Queued[T] | None:
        """Run the read ``run`` on a second connection while the main one is busy.

        In WAL mode a reader does not wait for the writer: a ``get_task`` made while a
        batch of writes is committing answers at once, from the last committed state
        (which holds every call that has returned). Returns None when the second
        connection is itself busy, unless ``wait`` (a blocked thread's read, which then
        waits for the read under way there rather than queue behind writes that may wait
        for another process's lock); the caller then queues. (The lock is taken by a
        ``with``, as in :meth:`_run_inline`.)
        """
        if not wait and self._reader_lock.locked():
            return None
        with self._reader_lock:
            self.refuse_if_closed()
            if self._reader is None:
                try:
                    self._reader_pooled = self._engine.raw_connection()
                except Exception as exc:
                    raise self._translate(exc) from exc
                self._reader = Db(self._reader_pooled.driver_connection)
            item: _Queued[T] = _Queued(run, False, False)
            raw = self._reader.raw
            _end_transaction(raw)  # one a KeyboardInterrupt kept the last read from ending
            try:
                self._reader.begin("BEGIN")
                item.outcome = (True, run(self._reader))
            except BackgroundTaskError as exc:
                item.outcome = (False, exc)
            except Exception as exc:
                item.outcome = (False, self._translate(exc))
            finally:
                _end_transaction(raw)  # a read has nothing to commit
            return item

    def _close_reader(self) -> None:
        with self._reader_lock:
            if self._reader_pooled is not None:
                self._reader_pooled.close()
                self._reader_pooled = self._reader = None

    def _run_now(
        self, run: Operation[T], writes: bool, relaxed: bool, *, blocking: bool = False
    ) -> _Queued[T] | None:
        """Run ``run`` without queueing if possible: inline when the connection is idle,
        or, for a read, on the second connection (a ``blocking`` caller's read always
        runs there then). None when it has to be queued."""
        item: _Queued[T] = _Queued(run, writes, relaxed)
        ran = self._run_inline(item)
        if ran is _RAN:
            return item
        if not writes and (blocking or ran is _BUSY):
            return self._read_aside(run, wait=blocking)
        return None

    def call(self, run: Operation[T], *, writes: bool = True, relaxed: bool = False) -> T:
        """Run ``run`` and block until it has committed; return its result.

        When nothing else is running, the transaction runs right here on the calling
        thread; a read that finds the connection busy runs on a second one (see
        :meth:`_read_aside`); a write otherwise joins the running or next batch.
        """
        if self.on_commit_thread:
            raise RuntimeError("a store operation called itself from the commit worker")
        done = self._run_now(run, writes, relaxed, blocking=True)
        if done is not None:
            return _result(done)
        answer: _Answer[T] = _Answer()
        self._enqueue(_Queued(run, writes, relaxed, future=answer), first=True)
        return answer.result()

    async def acall(
        self,
        run: Operation[T],
        *,
        writes: bool = True,
        relaxed: bool = False,
        report_committed: bool = False,
    ) -> T:
        """Run ``run`` and return once it has committed.

        Reads and relaxed writes (no fsync) run inline when the connection is idle (reads
        also on the second connection when it is not). Durable writes made during one turn
        of the event loop are handed on together at its end, in the order they were made:
        a lone one commits inline if the connection is idle (blocking the loop for one
        commit, as a sync call does); several, or any while the worker is busy, go to the
        worker thread, where they share one commit and the loop does not wait. A write
        made when no other callback is ready to run in the turn (a lone caller, as in a
        sequential loop of calls) cannot have company, so it commits at once and then
        yields to the loop for one turn, where a hand-on at the end of the turn would
        cost two turns and a future. Nothing inline waits for another process's lock:
        an operation that finds the file locked goes to the worker thread (see
        :meth:`_run_inline`).

        If the caller is cancelled before the operation starts, it never runs; once
        started, the cancellation is raised once the operation has finished, as a
        :class:`CommittedThenCancelled` carrying its result if ``report_committed`` and
        the operation succeeded.
        """
        if not writes or relaxed:
            done = self._run_now(run, writes, relaxed)
            if done is not None:
                return _result(done)
            return await self._handoff(run, writes, relaxed, report_committed)
        loop = asyncio.get_running_loop()
        staged = self._staged.get(loop)
        if staged is None and not self._async_writes and _alone_in_turn(loop):
            # No other callback runs in this turn, so no other write can join this one:
            # what the end of the turn would do (a lone write, inline), done right away.
            done = self._run_now(run, writes, relaxed)
            if done is not None:
                try:
                    # Still give the loop its turn (timers, I/O, a timeout's cancel), as
                    # the hand-on would: a loop of calls must not hold the loop.
                    await asyncio.sleep(0)
                except asyncio.CancelledError as cancelled:
                    _report(done.outcome, cancelled, report_committed)
                    raise
                return _result(done)
        waiter = _Waiter(loop=loop)
        if staged is None:
            self.refuse_if_closed()
            self._staged[loop] = staged = []
            loop.call_soon(self._hand_on_staged, loop)
        staged.append(_Queued(run, writes, relaxed, waiter=waiter))
        self._async_writes += 1
        try:
            return await waiter  # type: ignore[no-any-return]
        except asyncio.CancelledError as cancelled:
            _report(_outcome(waiter), cancelled, report_committed)
            raise
        finally:
            self._async_writes -= 1

    def _hand_on_staged(self, loop: asyncio.AbstractEventLoop) -> None:
        """At the end of a loop turn: run the turn's lone durable write inline, or queue
        the turn's writes for the worker (one batch, in call order)."""
        staged = self._staged.pop(loop)
        try:
            # Inline only if no earlier async write is still on its way: a later call
            # must not commit (and queue its result) before an earlier one.
            lone = len(staged) == 1 and self._async_writes == 1
            if lone and self._run_inline(staged[0]) is _RAN:
                _settle(staged)
                return
            self._enqueue_all(staged)
        except BaseException as exc:  # closed meanwhile, or the inline run itself failed
            for item in staged:
                if item.waiter is not None and not item.waiter.done():
                    item.waiter.set_exception(exc)

    async def _handoff(
        self, run: Operation[T], writes: bool, relaxed: bool, report_committed: bool = False
    ) -> T:
        """Queue ``run`` for the worker thread and wait for its answer."""
        waiter = _Waiter(loop=asyncio.get_running_loop())
        self._enqueue(_Queued(run, writes, relaxed, waiter=waiter))
        try:
            return await waiter  # type: ignore[no-any-return]
        except asyncio.CancelledError as cancelled:
            _report(_outcome(waiter), cancelled, report_committed)
            raise

    async def acall_to_end(self, run: Operation[T], *, relaxed: bool = False) -> T:
        """Run ``run`` on the worker thread and return once it has committed; cancelling
        the caller does not stop it (for operations nothing else would redo, like ending
        a claim): the cancellation is raised once ``run`` has finished, so what the caller
        does next sees its effect.

        Its waiter counts as started from the outset, so it cannot be withdrawn: asyncio
        holds a cancellation back until the waiter is answered (see :class:`_Waiter`). (Not
        a ``concurrent.futures.Future``, whose lock handling on this thread is Python code
        a KeyboardInterrupt could leave with the lock held, hanging the commit thread.)
        """
        waiter = _Waiter(loop=asyncio.get_running_loop())
        waiter.started = True
        self._enqueue(_Queued(run, True, relaxed, waiter=waiter))
        try:
            return await waiter  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            if waiter.done() and (failure := waiter.exception()) is not None:
                # The caller is told it was cancelled, not of this: say it here.
                logger.warning("an operation a cancelled call left to finish failed: %s", failure)
            raise

    def close(self) -> None:
        """Finish what is queued, then close the connection and stop the thread (also
        when another thread is closing it already)."""
        with self._lock:
            self._closed = True
        # Every time: a close cut short by a KeyboardInterrupt before its signal must not
        # leave the next one waiting for a worker that sleeps.
        self._signals.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def on_commit_thread(self) -> bool:
        """Whether the caller is the commit thread itself (which must not wait on it)."""
        return threading.current_thread() is self._thread

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def forked(self) -> bool:
        """Whether this is a forked child's copy of a parent's worker (closed)."""
        return self._forked

    # -- the worker thread ---------------------------------------------------------

    def _run(self) -> None:
        signals = self._signals
        try:
            while True:
                # Signals first, then the queues: an operation queued after the look
                # below signals after it, so the wait below cannot miss it.
                while not signals.empty():
                    signals.get_nowait()
                with self._lock:
                    if self._urgent or self._queue:
                        # Set before the queues empty (see _run_inline).
                        self._batch_taken = True
                        batch = self._take_batch()
                    elif self._closed:
                        return
                    else:
                        batch = None
                if batch is None:
                    signals.get()
                    continue
                try:
                    with self._connection_lock:
                        done = self._execute(batch)
                finally:
                    self._batch_taken = False
                _deliver(done)
                del batch, done  # let the finished operations (and what they hold) go
        finally:
            self._close_reader()
            with self._connection_lock:
                self._pooled.close()
                self._engine.dispose()

    def _take_batch(self) -> list[_Queued[Any]]:
        """The next batch (called holding ``_lock``): everything queued, up to
        ``MAX_BATCH``, blocked threads' operations first. While threads wait, only the
        first ``MAKE_WAY_AFTER`` async operations go along with theirs: a sync call then
        waits for no more async writes than when it makes way into a running
        transaction, and async writes still have a share of every commit while threads
        keep calling."""
        batch = _take(self._urgent, MAX_BATCH)
        return batch + _take(self._queue, MAKE_WAY_AFTER if batch else MAX_BATCH)

    def _make_way(self, items: list[_Queued[Any]], ran: int) -> bool:
        """Let blocked threads into the running transaction (called between operations).

        The async operations of ``items[ran:]`` (not started) go back to the front of the
        queue for the next batch, and the threads' operations take their place, so a sync
        call waits for one commit, not for the rest of a large batch of async writes.
        """
        with self._lock:
            # Threads' operations only: queued async ones must not pass those sent back.
            joining = _take(self._urgent, MAX_BATCH)
            if not joining:
                return False
            waiting = items[ran:]
            self._queue.extendleft(reversed([item for item in waiting if item.future is None]))
            del items[ran:]
            # Threads' operations already started (``wanted``) stay in this transaction.
            items.extend(item for item in waiting if item.future is not None)
            items.extend(item for item in joining if item.wanted())
            return True

    def _execute(self, batch: list[_Queued[Any]], *, inline: bool = False) -> list[_Queued[Any]]:
        """Run ``batch`` in one transaction, setting each item's ``outcome``.

        Returns the operations that ran (and so must be answered): callers who gave up
        are left out, and blocked threads may have taken the place of some async
        operations, which went back to the queue (see :meth:`_make_way`). An ``inline``
        run raises :class:`_LockedElsewhere` where the commit thread would wait for
        another connection's lock.
        """
        items = [item for item in batch if item.wanted()]
        if not items:
            return items
        if not inline and not all(item.writes for item in items):
            reads = [item for item in items if not item.writes]
            if len(reads) < len(items):
                # Reads first, in a transaction of their own, answered at once: they
                # need no write lock, so they neither wait for one that another process
                # holds nor fail with the writes when it is not let go in time.
                self._run_batch(reads)
                _deliver(reads)
                items = [item for item in items if item.writes]
        self._run_batch(items, inline=inline)
        return items

    def _run_batch(self, items: list[_Queued[Any]], *, inline: bool = False) -> None:
        relax = self._synchronous == "FULL" and all(item.relaxed for item in items)
        raw = self._db.raw
        _end_transaction(raw)  # one a KeyboardInterrupt kept the last run from ending
        try:
            # Switch the level only when it changes (a drain's acknowledgements come in
            # runs): a durable batch always commits at the handler's level.
            level = "NORMAL" if relax else self._synchronous
            if level != self._level:
                self._level = None  # unknown until the switch has run
                raw.execute(f"PRAGMA synchronous={level}")
                self._level = level
            self._transaction(items, may_make_way=not relax, inline=inline)
        except BaseException as exc:
            # Also a KeyboardInterrupt landing here on the main thread (an inline run):
            # a transaction left open would hold SQLite's write lock until the next call.
            _end_transaction(raw)
            if not isinstance(exc, Exception):
                raise
            if inline and _met_lock(exc):
                # Met at the BEGIN (see above), before the operation has done anything:
                # the commit thread can run it from the start.
                raise _LockedElsewhere from exc
            if len(items) == 1 or isinstance(exc, sqlite3.OperationalError):
                # One operation failed alone, or the database itself did (locked, full,
                # I/O, read-only): retrying one by one would only repeat the wait.
                error = self._translate(exc)
                for item in items:
                    item.outcome = (False, error)
                return
            logger.debug("batch of %d failed (%s); retrying one by one", len(items), exc)
            for item in items:
                self._run_batch([item], inline=inline)
            return
        self.commits += 1

    def _transaction(self, items: list[_Queued[Any]], *, may_make_way: bool, inline: bool) -> None:
        """Run ``items`` in one transaction. In a write transaction that is not relaxed,
        blocked threads may join between operations once ``MAKE_WAY_AFTER`` of its async
        operations have run (``items`` is then changed in place to what actually ran)."""
        raw = self._db.raw
        writes = False
        async_left = 0
        for item in items:
            writes = writes or item.writes
            if item.future is None:
                async_left += 1
        may_make_way = may_make_way and writes
        async_ran = 0
        try:
            # Begin with the locks the transaction needs: the write lock for writes, and a
            # read snapshot either way (so that no later statement meets a lock). The
            # connection waits for no other connection's lock (its busy_timeout is 0): an
            # inline begin fails at once, and its caller queues the operation; the commit
            # thread waits (see _begin_when_free).
            try:
                self._db.begin("BEGIN IMMEDIATE" if writes else "BEGIN")
                if not writes:
                    raw.execute("PRAGMA schema_version")  # takes the read snapshot now
            except sqlite3.OperationalError as exc:
                if inline or not _met_lock(exc):
                    raise
                _end_transaction(raw)
                self._begin_when_free(writes)
            ran = 0
            while ran < len(items):
                if (
                    may_make_way
                    and self._urgent
                    and (async_ran >= MAKE_WAY_AFTER or (ran and not async_left))
                    and self._make_way(items, ran)
                ):
                    may_make_way = False  # once per transaction: it must end soon
                    if ran == len(items):
                        break
                    async_left = 0  # what is left are threads' operations
                # A blocked thread may join once MAKE_WAY_AFTER async operations ran: a
                # group run together does not reach past that point.
                joinable_later = may_make_way and async_ran < MAKE_WAY_AFTER
                most = MAKE_WAY_AFTER - async_ran if joinable_later else MAX_TOGETHER
                end = self._run_next(items, ran, most)
                for item in items[ran:end]:
                    if item.future is None:
                        async_ran += 1
                        async_left -= 1
                ran = end
            raw.execute("COMMIT")
        except BaseException:
            _end_transaction(raw)
            raise

    def _begin_when_free(self, writes: bool) -> None:
        """On the commit thread: try to begin until another connection lets go of the
        lock, up to ``busy_timeout``, with the pauses SQLite's own busy handler takes.

        The connection is let go during each pause: a caller that found it idle and is
        about to take it (a plain thread, the event loop) waits for one try, not for the
        whole wait, and a fork need not wait for it.
        """
        raw = self._db.raw
        deadline = time.monotonic() + self._patience
        for pause in itertools.chain(_LOCK_PAUSES, itertools.repeat(_LOCK_PAUSES[-1])):
            left = deadline - time.monotonic()
            if left > 0:
                # The commit thread holds the connection lock here (see _run); no
                # transaction is open, so another thread may use the connection meanwhile.
                self._connection_lock.release()
                try:
                    time.sleep(min(pause, left))
                finally:
                    self._connection_lock.acquire()
            try:
                self._db.begin("BEGIN IMMEDIATE" if writes else "BEGIN")
                if not writes:
                    raw.execute("PRAGMA schema_version")
                return
            except sqlite3.OperationalError as exc:
                _end_transaction(raw)
                if left <= 0 or not _met_lock(exc):
                    raise

    def _run_next(self, items: list[_Queued[Any]], at: int, most: int) -> int:
        """Run ``items[at]``, and with it the operations right after it that can run
        together with it (the same ``together`` attribute: one statement for up to
        ``most`` of them, see ``finish.py``); return the index after the last one taken."""
        first = items[at]
        together = _together_of(first)
        if together is None:
            if first.start():  # else cancelled while waiting for its turn: skipped
                self._run_alone(first)
            return at + 1
        end, last = at + 1, min(len(items), at + most)
        while end < last and _together_of(items[end]) is together:
            end += 1
        started = [item for item in items[at:end] if item.start()]
        if len(started) > 1 and together(self._db, [item.run for item in started]):
            for item in started:
                item.outcome = (True, None)
            return end
        for item in started:  # alone; or together, one did not apply and nothing was written
            self._run_alone(item)
        return end

    def _run_alone(self, item: _Queued[Any]) -> None:
        try:
            item.outcome = (True, item.run(self._db))
        except BackgroundTaskError as exc:
            item.outcome = (False, exc)


#: Seconds between the commit thread's tries for another connection's lock: those of
#: SQLite's own busy handler, the last one repeated.
_LOCK_PAUSES = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.025, 0.025, 0.05, 0.05, 0.1)

#: Loop classes known to schedule every callback through ``BaseEventLoop._ready``.
_STOCK_LOOPS: frozenset[type] = frozenset(
    {asyncio.SelectorEventLoop, getattr(asyncio, "ProactorEventLoop", asyncio.SelectorEventLoop)}
)


def _alone_in_turn(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the running task is alone in this turn of ``loop``: no other callback is
    ready to run, and no cancellation of the task is pending.

    Only asyncio's own loops are read (their ready queue, ``_ready``); for any other loop
    (uvloop, Qt's, a subclass) the answer is False and writes take the end-of-turn
    hand-on, which is just as correct, only slower for a lone caller. A task with a
    cancellation requested also takes the hand-on, so its write is withdrawn unstarted.
    """
    if type(loop) not in _STOCK_LOOPS or loop._ready:  # type: ignore[attr-defined]
        return False
    task = asyncio.current_task(loop)
    return task is not None and not task.cancelling()


def _take(items: deque[_Queued[Any]], most: int) -> list[_Queued[Any]]:
    """Remove and return the first ``most`` of ``items`` (all if fewer)."""
    return [items.popleft() for _ in range(min(most, len(items)))]


def _together_of(item: _Queued[Any]) -> Together | None:
    """How ``item``'s operation runs together with others of its kind, if it can."""
    return getattr(item.run, "together", None)


def _outcome(waiter: _Waiter) -> tuple[bool, Any]:
    """A waiter's answer as an operation's ``outcome``; (False, None) if there is none."""
    if not waiter.done() or waiter.cancelled():
        return (False, None)
    error = waiter.exception()
    return (False, error) if error is not None else (True, waiter.result())


def _report(
    outcome: tuple[bool, Any], cancelled: asyncio.CancelledError, report_committed: bool
) -> None:
    """On a caller's cancellation: raise :class:`CommittedThenCancelled` if asked to and
    the operation ran and succeeded (the caller then re-raises ``cancelled`` otherwise)."""
    ok, value = outcome
    if report_committed and ok:
        raise CommittedThenCancelled(cancelled, value) from None


def _result(item: _Queued[T]) -> T:
    ok, value = item.outcome
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _deliver(batch: list[_Queued[Any]]) -> None:
    """Answer every caller of a committed batch: threads directly, coroutines with one
    wake-up per event loop (not one per caller)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Queued[Any]]] = {}
    for item in batch:
        if item.future is not None:
            if item.future.running():
                ok, value = item.outcome
                if ok:
                    item.future.set_result(value)
                else:
                    item.future.set_exception(value)
        elif item.waiter is not None:
            by_loop.setdefault(item.waiter.get_loop(), []).append(item)
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, items)


def _settle(items: list[_Queued[Any]]) -> None:
    """On the waiters' loop: resolve each waiter still waiting."""
    for item in items:
        waiter = item.waiter
        if waiter is None or waiter.done():
            continue
        ok, value = item.outcome
        if ok:
            waiter.set_result(value)
        else:
            waiter.set_exception(value)


def _in_transaction(db: Db | None) -> bool:
    """Whether ``db``'s connection has a transaction open (False once it is closed)."""
    try:
        return db is not None and db.raw.in_transaction
    except sqlite3.Error:  # closed
        return False


def _met_lock(error: Exception) -> bool:
    """Whether ``error`` is SQLite's "database is locked" (another connection's lock)."""
    return (
        isinstance(error, sqlite3.OperationalError)
        and error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
    )


def _end_transaction(raw: sqlite3.Connection) -> None:
    """Make sure no transaction is left open after a failure (a failed COMMIT can leave
    one, e.g. on a full disk)."""
    try:
        if raw.in_transaction:
            raw.rollback()
    except Exception:  # the connection itself may be broken; the next batch will say so
        logger.debug("rollback after a failed batch failed", exc_info=True)
