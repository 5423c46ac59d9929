"""The commit worker's scheduling, on a real SQLite file: a blocked thread's write does
not wait for a large batch of async writes, a blocked read does not wait for the writer,
and a failing batch that holds a thread's operation is retried without losing anyone."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from orbiter._internal.background import BackgroundTaskHandler
from orbiter.errors import DatabaseError
from orbiter.store.engine import create_sync_engine, resolve_database
from orbiter.store.executor import Db
from orbiter.store.worker import MAKE_WAY_AFTER, CommitWorker, _Queued
from tests.conftest import run_helper

WAIT = 10.0  # seconds a test waits for another thread before it fails


@pytest.fixture
def worker(db_path: Path) -> Iterator[CommitWorker]:
    with sqlite3.connect(db_path) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE log (name TEXT NOT NULL)")
    engine = create_sync_engine(resolve_database(db_path))
    commit_worker = CommitWorker(engine, translate=lambda exc: DatabaseError(str(exc)))
    yield commit_worker
    commit_worker.close()


def _log(name: str, db: Db) -> str:
    db.raw.execute("INSERT INTO log (name) VALUES (?)", (name,))
    return name


def _committed(db_path: Path) -> list[str]:
    """What another connection sees: the committed rows, in insertion order."""
    with sqlite3.connect(db_path) as reader:
        return [row[0] for row in reader.execute("SELECT name FROM log ORDER BY rowid")]


def _wait_until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.001)


def _async_batch_joined_by(
    worker: CommitWorker, thread: threading.Thread, count: int
) -> asyncio.Future[list[str]]:
    """``count`` async writes ("async-0"...) queued as one batch; while its first one runs,
    ``thread`` starts, and its sync call queues behind the running batch."""

    def first_async_write(db: Db) -> str:
        if thread.ident is None:  # not again when the batch is retried
            thread.start()
            _wait_until(lambda: len(worker._urgent) == 1, "the thread's call")
        return _log("async-0", db)

    writes = [worker._handoff(first_async_write, True, False)]
    writes += [worker._handoff(partial(_log, f"async-{k}"), True, False) for k in range(1, count)]
    return asyncio.gather(*writes)


def _join_started(thread: threading.Thread) -> None:
    _wait_until(lambda: thread.ident is not None, "the thread to start")
    thread.join(WAIT)
    assert not thread.is_alive()


async def test_a_blocked_threads_write_takes_the_place_of_queued_async_writes(
    worker: CommitWorker, db_path: Path
) -> None:
    sync_result: list[str] = []

    def sync_caller() -> None:
        sync_result.append(worker.call(partial(_log, "sync")))

    thread = threading.Thread(target=sync_caller)
    gathered = _async_batch_joined_by(worker, thread, 200)
    await asyncio.get_running_loop().run_in_executor(None, _join_started, thread)
    assert sync_result == ["sync"]
    # The thread's write ran once MAKE_WAY_AFTER async writes had (so they progress),
    # before the rest of the batch, which still completes, in order, in a later commit.
    assert await gathered == [f"async-{k}" for k in range(200)]
    before, after = range(MAKE_WAY_AFTER), range(MAKE_WAY_AFTER, 200)
    assert _committed(db_path) == [
        *(f"async-{k}" for k in before),
        "sync",
        *(f"async-{k}" for k in after),
    ]


async def test_a_threads_write_queued_while_async_writes_are_owed_waits_for_few(
    worker: CommitWorker, db_path: Path
) -> None:
    # Transactions are counted by the commits before them: operations that see the same
    # count ran in the same transaction.
    ran: dict[str, int] = {}

    def write(name: str, db: Db) -> str:
        ran[name] = worker.commits
        return _log(name, db)

    second = threading.Thread(target=worker.call, args=(partial(write, "sync-2"),))

    def first_sync_write(db: Db) -> str:
        # Runs in the async batch it made way into; the second call queues meanwhile and
        # finds the rest of that batch owed the next one.
        if second.ident is None:
            second.start()
            _wait_until(lambda: len(worker._urgent) == 1, "the second thread's call")
        return write("sync-1", db)

    first = threading.Thread(target=worker.call, args=(first_sync_write,))

    def first_async_write(db: Db) -> str:
        if first.ident is None:
            first.start()
            _wait_until(lambda: len(worker._urgent) == 1, "the first thread's call")
        return write("async-0", db)

    writes = [worker._handoff(first_async_write, True, False)]
    writes += [worker._handoff(partial(write, f"async-{k}"), True, False) for k in range(1, 200)]
    assert await asyncio.gather(*writes) == [f"async-{k}" for k in range(200)]
    for thread in (first, second):
        await asyncio.get_running_loop().run_in_executor(None, _join_started, thread)

    sharing = [name for name, count in ran.items() if count == ran["sync-2"] and name != "sync-2"]
    assert sharing == [f"async-{k}" for k in range(MAKE_WAY_AFTER, 2 * MAKE_WAY_AFTER)]
    assert _committed(db_path) == [
        *(f"async-{k}" for k in range(MAKE_WAY_AFTER)),
        "sync-1",
        "sync-2",
        *(f"async-{k}" for k in range(MAKE_WAY_AFTER, 200)),
    ]


async def test_async_writes_have_a_share_of_every_commit_while_threads_keep_calling(
    worker: CommitWorker,
) -> None:
    ran: dict[str, int] = {}  # operation -> transactions committed before it ran

    def write(name: str, db: Db) -> str:
        ran[name] = worker.commits
        return _log(name, db)

    stop = threading.Event()

    def hammer(index: int) -> None:
        calls = itertools.count()
        while not stop.is_set():
            worker.call(partial(write, f"sync-{index}-{next(calls)}"))

    threads = [threading.Thread(target=hammer, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    try:
        _wait_until(lambda: len(ran) > 30, "the threads to be writing")
        # Made in one turn of the loop, so they are queued together, before any runs.
        names = [f"async-{k}" for k in range(400)]
        done = await asyncio.wait_for(
            asyncio.gather(*(worker.acall(partial(write, name)) for name in names)), WAIT
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)
    assert done == names
    with_async = {ran[name] for name in names}
    # From the first to the last, no commit went by without async writes (a batch of
    # threads' calls takes the first MAKE_WAY_AFTER queued ones along).
    assert with_async == set(range(min(with_async), max(with_async) + 1))
    assert len(with_async) <= len(names) // MAKE_WAY_AFTER + 1


async def test_a_blocked_read_does_not_wait_for_the_writer(
    worker: CommitWorker, db_path: Path
) -> None:
    worker.call(partial(_log, "committed"))
    release = threading.Event()

    def slow_write(db: Db) -> str:
        _log("uncommitted", db)
        release.wait(WAIT)
        return "slow"

    slow = asyncio.ensure_future(worker._handoff(slow_write, True, False))
    await asyncio.sleep(0.05)  # the worker is inside slow_write, holding the connection
    try:
        seen = worker.call(
            lambda db: [row[0] for row in db.raw.execute("SELECT name FROM log")], writes=False
        )
        # Answered while the write is still running, from the committed state.
        assert not slow.done()
        assert seen == ["committed"]
    finally:
        release.set()
    assert await slow == "slow"
    assert _committed(db_path) == ["committed", "uncommitted"]


async def test_a_threads_operation_that_fails_in_a_shared_batch_fails_alone(
    worker: CommitWorker, db_path: Path
) -> None:
    thread_errors: list[BaseException] = []

    def broken(db: Db) -> str:
        _log("half-written", db)
        raise ValueError("a bug in an operation")

    def sync_caller() -> None:
        try:
            worker.call(broken)
        except BaseException as exc:
            thread_errors.append(exc)

    thread = threading.Thread(target=sync_caller)
    gathered = _async_batch_joined_by(worker, thread, 10)
    # The thread's operation joins the running batch and makes it fail; the batch is
    # retried one operation per transaction, so only the faulty one fails.
    assert await gathered == [f"async-{k}" for k in range(10)]
    await asyncio.get_running_loop().run_in_executor(None, _join_started, thread)
    assert len(thread_errors) == 1
    assert isinstance(thread_errors[0], DatabaseError)
    assert "a bug in an operation" in str(thread_errors[0])
    assert worker.call(partial(_log, "after")) == "after"
    assert _committed(db_path) == [f"async-{k}" for k in range(10)] + ["after"]


async def test_async_writes_progress_while_threads_write_back_to_back(
    worker: CommitWorker, db_path: Path
) -> None:
    stop = threading.Event()
    sync_calls = [0, 0]

    def slow_write(name: str, db: Db) -> str:
        time.sleep(0.001)  # a slow statement or fsync keeps a thread's call queued
        return _log(name, db)

    def hammer(index: int) -> None:
        while not stop.is_set():
            worker.call(partial(slow_write, f"sync-{index}"))
            sync_calls[index] += 1

    threads = [threading.Thread(target=hammer, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    try:
        _wait_until(lambda: min(sync_calls) > 10, "both threads to be writing")
        # Threads' calls go first, but queued async writes are owed the next batch:
        # they must not wait for the threads to stop.
        done = await asyncio.wait_for(
            asyncio.gather(*(worker.acall(partial(_log, f"async-{k}")) for k in range(5))),
            WAIT,
        )
        assert not stop.is_set()
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT)
    assert done == [f"async-{k}" for k in range(5)]


async def test_a_later_async_write_never_commits_before_an_earlier_one(
    worker: CommitWorker, db_path: Path
) -> None:
    # Another thread's call runs inline, so the worker takes A and waits for the
    # connection; B, made in a later loop turn, must queue behind A, not run inline.
    worker._connection_lock.acquire()
    try:
        first = asyncio.ensure_future(worker.acall(partial(_log, "A")))
        await asyncio.sleep(0)  # A is staged
        await asyncio.sleep(0)  # A's turn ended: it was handed on (the connection is busy)
        assert not worker._staged
        # The worker takes A and waits for the connection.
        _wait_until(lambda: not worker._queue, "the worker to take A")
        second = asyncio.ensure_future(worker.acall(partial(_log, "B")))
        await asyncio.sleep(0)  # B's turn ends: it is handed on
    finally:
        worker._connection_lock.release()
    assert list(await asyncio.gather(first, second)) == ["A", "B"]
    assert _committed(db_path) == ["A", "B"]


def test_relaxed_operations_commit_at_normal_and_durable_ones_at_full(
    worker: CommitWorker,
) -> None:
    def level(db: Db) -> int:
        _log("x", db)
        return int(db.raw.execute("PRAGMA synchronous").fetchone()[0])

    full, normal = 2, 1
    assert worker.call(level) == full
    assert worker.call(level, relaxed=True) == normal
    assert worker.call(level, relaxed=True) == normal
    assert worker.call(level) == full  # a durable write after relaxed ones: FULL again


def _count_hand_ons(worker: CommitWorker, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The loops of every end-of-turn hand-on the worker makes from now on."""
    hand_ons: list[object] = []
    original = worker._hand_on_staged

    def counted(loop: asyncio.AbstractEventLoop) -> None:
        hand_ons.append(loop)
        original(loop)

    monkeypatch.setattr(worker, "_hand_on_staged", counted)
    return hand_ons


async def test_a_lone_async_write_commits_at_once_when_nothing_else_is_ready(
    worker: CommitWorker, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no other callback ready in the turn, nothing could join the write: it commits
    # right away on the calling thread, without the end-of-turn hand-on.
    hand_ons = _count_hand_ons(worker, monkeypatch)
    threads: list[threading.Thread] = []

    def log_where(name: str, db: Db) -> str:
        threads.append(threading.current_thread())
        return _log(name, db)

    commits = worker.commits
    assert await worker.acall(partial(log_where, "alone")) == "alone"
    assert _committed(db_path) == ["alone"]  # durable on return
    assert worker.commits == commits + 1
    assert threads == [threading.current_thread()]
    assert hand_ons == []

    # Writes made in one turn still share the end-of-turn hand-on and one commit.
    names = [f"w{k}" for k in range(20)]
    assert await asyncio.gather(*(worker.acall(partial(_log, n)) for n in names)) == names
    assert _committed(db_path) == ["alone", *names]
    assert len(hand_ons) == 1
    assert worker.commits == commits + 2


async def test_a_lone_async_writes_error_reaches_its_caller_and_the_next_write_works(
    worker: CommitWorker, db_path: Path
) -> None:
    def broken(db: Db) -> None:
        db.raw.execute("INSERT INTO missing_table VALUES (1)")

    with pytest.raises(DatabaseError, match="missing_table"):
        await worker.acall(broken)
    assert await worker.acall(partial(_log, "after")) == "after"
    assert _committed(db_path) == ["after"]


async def test_a_loop_of_lone_async_writes_still_lets_the_event_loop_turn(
    worker: CommitWorker, db_path: Path
) -> None:
    # Each write commits at once, then yields one turn: timers, I/O and a timeout's
    # cancellation still get their turn between calls.
    ticks = 0

    async def ticker() -> None:  # waits on a timer, so it is not in the ready queue
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    written = 0
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                for k in range(20_000):
                    await worker.acall(partial(_log, f"w{k}"))
                    written += 1
    finally:
        ticking.cancel()
    assert 0 < written < 20_000
    assert ticks > 0
    # What returned is committed; a write the timeout interrupted may be too.
    assert len(_committed(db_path)) in (written, written + 1)


async def test_a_write_made_with_a_cancellation_pending_is_withdrawn(
    worker: CommitWorker, db_path: Path
) -> None:
    async def cancel_self_then_write() -> None:
        current = asyncio.current_task()
        assert current is not None
        current.cancel()
        await worker.acall(partial(_log, "never"))

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(cancel_self_then_write())
    assert _committed(db_path) == []


class _CustomLoop(asyncio.SelectorEventLoop):
    """A loop class that is not asyncio's own: its scheduling is not assumed."""


def test_other_loop_classes_hand_on_at_the_end_of_the_turn(
    worker: CommitWorker, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hand_ons = _count_hand_ons(worker, monkeypatch)
    with asyncio.Runner(loop_factory=_CustomLoop) as runner:
        assert runner.run(worker.acall(partial(_log, "custom"))) == "custom"
    assert _committed(db_path) == ["custom"]
    assert len(hand_ons) == 1


@pytest.mark.parametrize("where", ["in the operation", "right after BEGIN"])
def test_a_keyboard_interrupt_inside_a_transaction_rolls_it_back(
    worker: CommitWorker, db_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # Ctrl-C lands inside a sync call's transaction (run inline, on the main thread): the
    # write is undone and SQLite's write lock let go at once.
    def interrupted(db: Db) -> None:
        _log("half", db)
        raise KeyboardInterrupt

    if where == "right after BEGIN":
        begin = Db.begin

        def begin_then_interrupt(db: Db, sql: str) -> None:
            begin(db, sql)
            raise KeyboardInterrupt

        monkeypatch.setattr(Db, "begin", begin_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        worker.call(interrupted if where == "in the operation" else partial(_log, "half"))
    monkeypatch.undo()
    other = sqlite3.connect(db_path, timeout=0)  # would fail at once on a held lock
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert worker.call(partial(_log, "next")) == "next"
    assert _committed(db_path) == ["next"]


def test_a_call_after_an_enqueue_cut_short_before_its_signal_still_runs(
    worker: CommitWorker, db_path: Path
) -> None:
    # A KeyboardInterrupt between an enqueue's append and its signal leaves an operation
    # queued with the worker asleep; the next call must wake it rather than queue behind.
    with worker._lock:  # what the interrupted caller managed to do
        worker._queue.append(_Queued(partial(_log, "orphaned"), True, False, future=Future()))
    done: list[str] = []
    caller = threading.Thread(target=lambda: done.append(worker.call(partial(_log, "next"))))
    caller.start()
    caller.join(WAIT)
    assert done == ["next"]
    _wait_until(lambda: "orphaned" in _committed(db_path), "the queued operation to run")
    assert sorted(_committed(db_path)) == ["next", "orphaned"]


@pytest.mark.parametrize("mode", ["queued", "inline"])
def test_a_storm_of_keyboard_interrupts_leaves_no_lock_held(db_path: Path, mode: str) -> None:
    # Real SIGINTs every 50-300 us for 4 s land all over sync calls (queued behind a held
    # connection, or run inline beside another writer), also inside the lock handling;
    # each KeyboardInterrupt is caught and the calls go on. Before the queue lock and a
    # blocked caller's wait were bare locks taken by ``with`` (a Condition's and a
    # Future's are Python code), this left a lock held within a few seconds, and every
    # later call and close() hung.
    report = json.loads(run_helper("interrupt_storm.py", str(db_path), "4", mode, timeout=90))
    assert report["interrupts"] > 100  # the storm did land
    assert report["leaked"] is None
    assert report["submit_after"] is True
    assert report["close"] is True


def test_an_interrupt_inside_any_condition_during_a_call_to_end_leaves_the_worker_free(
    worker: CommitWorker, db_path: Path
) -> None:
    # A call to the end (a drain ending its claims) that waited through a
    # concurrent.futures.Future entered a threading.Condition on the loop thread; a
    # KeyboardInterrupt right after its lock was taken left it held, and the commit
    # thread hung answering. Here one is raised at the end of every Condition.__enter__
    # this thread runs during the call (none, now).
    enter = threading.Condition.__enter__.__code__
    main = threading.current_thread()

    def interrupt_on_entry(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is enter and threading.current_thread() is main:

            def on_return(frame: Any, event: str, arg: Any) -> Any:
                if event == "return":
                    sys.settrace(None)
                    raise KeyboardInterrupt
                return on_return

            return on_return
        return None

    async def call_to_end() -> str:
        sys.settrace(interrupt_on_entry)
        try:
            return await worker.acall_to_end(partial(_log, "to-end"))
        finally:
            sys.settrace(None)

    with worker._connection_lock:  # a batch under way: the call queues
        runner = asyncio.new_event_loop()
        task = runner.create_task(call_to_end())
        runner.run_until_complete(asyncio.sleep(0.05))
    with contextlib.suppress(KeyboardInterrupt):
        runner.run_until_complete(task)
    runner.close()
    done: list[str] = []
    caller = threading.Thread(target=lambda: done.append(worker.call(partial(_log, "later"))))
    caller.start()
    caller.join(WAIT)
    assert done == ["later"]
    assert _committed(db_path) == ["to-end", "later"]


def test_a_close_cut_short_by_an_interrupt_is_finished_by_the_next(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interrupt lands in the worker's close() after it marked itself closed and
    # before it woke the commit thread: the handler's next close() must finish the job.
    handler = BackgroundTaskHandler(database=db_path)
    worker = handler._store._worker  # type: ignore[attr-defined]

    def cut_short(self: CommitWorker) -> None:
        with self._lock:
            self._closed = True
        raise KeyboardInterrupt

    monkeypatch.setattr(CommitWorker, "close", cut_short)
    with pytest.raises(KeyboardInterrupt):
        handler.close()
    monkeypatch.undo()
    handler.close()
    _wait_until(lambda: not worker._thread.is_alive(), "the commit thread to end")
