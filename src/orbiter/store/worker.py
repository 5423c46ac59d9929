"""The commit worker: one thread, one connection, shared commits.

Every operation on a durable store is a function of a connection, queued here. The
worker takes everything queued, runs it in one transaction, commits once, and only then
answers each caller. So:

* 1,000 concurrent ``await handle_result(...)`` calls share a few commits (group commit),
  each still durable when it returns;
* a synchronous call (``submit`` on the event-loop thread, or with no loop at all) just
  blocks on its answer; the worker needs no event loop, so it cannot deadlock with the
  caller's in-flight async writes, and since all of a handler's statements go through one
  connection they never fight each other for SQLite's lock.

Operations must not write before raising a :class:`BackgroundTaskError` (they check with
guarded statements first); such an error is the caller's answer and the batch goes on. Any
other error rolls the batch back, and its operations are retried one per transaction so
only the faulty one fails.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine

from orbiter.errors import BackgroundTaskError, HandlerClosedError
from orbiter.store.engine import run_pragma

__all__ = ["CommitWorker", "Operation"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Most operations one transaction takes; bounds a batch's latency and memory.
MAX_BATCH = 2_000

Operation = Callable[[Connection], T]


@dataclass(slots=True)
class _Queued(Generic[T]):
    run: Operation[T]
    writes: bool
    relaxed: bool
    future: Future[T] = field(default_factory=Future[Any])


class CommitWorker:
    """Runs queued operations on a private connection, in shared transactions.

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
        self._translate = translate
        self._queue: deque[_Queued[Any]] = deque()
        self._wakeup = threading.Condition(threading.Lock())
        self._closed = False
        #: Transactions committed so far (each may hold many operations).
        self.commits = 0
        self._started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.result()

    # -- callers' side -------------------------------------------------------------

    def submit(self, run: Operation[T], *, writes: bool = True, relaxed: bool = False) -> Future[T]:
        """Queue ``run``; the future resolves after the transaction holding it commits.

        ``relaxed`` operations (acknowledgements whose loss only means a redelivery) may
        commit with ``synchronous=NORMAL``: safe against a process crash, not power loss.
        A batch is relaxed only if every operation in it is.
        """
        item = _Queued(run, writes, relaxed)
        with self._wakeup:
            if self._closed:
                raise HandlerClosedError("the handler is closed")
            self._queue.append(item)
            if len(self._queue) == 1:
                self._wakeup.notify()
        return item.future

    def call(self, run: Operation[T], *, writes: bool = True) -> T:
        """Run ``run`` and block until it has committed; return its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("a store operation called itself from the commit worker")
        return self.submit(run, writes=writes).result()

    async def acall(self, run: Operation[T], *, writes: bool = True, relaxed: bool = False) -> T:
        """Run ``run`` without blocking the event loop; return once it has committed."""
        return await asyncio.wrap_future(self.submit(run, writes=writes, relaxed=relaxed))

    def close(self) -> None:
        """Finish what is queued, then close the connection and stop the thread."""
        with self._wakeup:
            if self._closed:
                return
            self._closed = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- the worker thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            connection = self._engine.connect()
        except BaseException as exc:
            self._started.set_exception(self._translate(exc))
            return
        self._started.set_result(None)
        try:
            while True:
                with self._wakeup:
                    while not self._queue and not self._closed:
                        self._wakeup.wait()
                    if not self._queue:
                        return
                    count = min(len(self._queue), MAX_BATCH)
                    batch = [self._queue.popleft() for _ in range(count)]
                self._run_batch(connection, batch)
                del batch  # let the finished operations (and what they hold) go
        finally:
            connection.close()
            self._engine.dispose()

    def _run_batch(self, connection: Connection, batch: list[_Queued[Any]]) -> None:
        items = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not items:
            return
        relax = self._synchronous == "FULL" and all(item.relaxed for item in items)
        try:
            if relax:
                run_pragma(connection, "PRAGMA synchronous=NORMAL")
            try:
                outcomes = self._transaction(connection, items)
            finally:
                if relax:
                    run_pragma(connection, "PRAGMA synchronous=FULL")
        except Exception as exc:
            _end_transaction(connection)
            if len(items) == 1:
                items[0].future.set_exception(self._translate(exc))
                return
            logger.debug("batch of %d failed (%s); retrying one by one", len(items), exc)
            for item in items:
                self._run_batch(connection, [item])
            return
        self.commits += 1
        for item, (ok, value) in zip(items, outcomes, strict=True):
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(value)

    @staticmethod
    def _transaction(connection: Connection, items: list[_Queued[Any]]) -> list[tuple[bool, Any]]:
        writes = any(item.writes for item in items)
        connection.info["begin"] = "BEGIN IMMEDIATE" if writes else "BEGIN"
        outcomes: list[tuple[bool, Any]] = []
        with connection.begin():
            for item in items:
                try:
                    outcomes.append((True, item.run(connection)))
                except BackgroundTaskError as exc:
                    outcomes.append((False, exc))
        return outcomes


def _end_transaction(connection: Connection) -> None:
    """Make sure no transaction is left open after a failure (a failed COMMIT can leave
    one, e.g. on a full disk)."""
    try:
        dbapi = connection.connection.dbapi_connection
        if dbapi is not None and dbapi.in_transaction:
            dbapi.rollback()
    except Exception:  # the connection itself may be broken; the next batch will say so
        logger.debug("rollback after a failed batch failed", exc_info=True)
