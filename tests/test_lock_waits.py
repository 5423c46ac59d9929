"""Waiting for another process's write lock happens on the commit thread, never on the
event loop's thread.

A lone async write commits on the loop's thread when nothing else is running (no
thread hand-off). While another process holds SQLite's write lock, that write must not
wait there: the loop would stop for up to ``busy_timeout``, and a cancellation could
reach the call only after it had committed. It goes to the commit thread instead, where
it waits unstarted, so a timeout withdraws it and nothing is stored.

The lock is held by a real second process, as another program using the file would.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from orbiter._internal.background import BackgroundTaskHandler
from orbiter.errors import DatabaseLockedError

#: Long enough that a call waiting for it on the loop would stall the test visibly.
BUSY_TIMEOUT = 5.0

#: The longest the loop may go without running the ticker while a write waits for the
#: lock (it would be BUSY_TIMEOUT if the write waited on the loop's thread).
MAX_STALL = 1.0

_HOLD_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes the pipe
connection.execute("ROLLBACK")
"""


class WriteLock:
    """Another process holding the file's write lock until :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        assert self._process.stdout.readline().strip() == "locked"

    def release(self) -> None:
        """Let the lock go and wait for the process to end (idempotent)."""
        self._process.communicate(timeout=10)
        assert self._process.returncode == 0


@contextmanager
def write_lock_held(path: Path) -> Iterator[WriteLock]:
    lock = WriteLock(path)
    try:
        yield lock
    finally:
        lock.release()


@asynccontextmanager
async def longest_stall() -> AsyncIterator[list[float]]:
    """Measure the longest time the loop did not get to a ticking task (in ``[0]``)."""
    stalls = [0.0]

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            stalls[0] = max(stalls[0], now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.02)  # let it start ticking
    try:
        yield stalls
    finally:
        ticker.cancel()
        now = time.monotonic()
        await asyncio.gather(ticker, return_exceptions=True)
        stalls[0] = max(stalls[0], time.monotonic() - now)


def stored(path: Path) -> tuple[dict[str, str], list[str]]:
    """Every task's status and the pending queue's ids, as another connection reads them."""
    with sqlite3.connect(path) as connection:
        statuses = dict(connection.execute("SELECT task_id, status FROM background_tasks"))
        pending = [row[0] for row in connection.execute("SELECT task_id FROM pending_queue")]
    return statuses, pending


def with_company() -> None:
    """Make the current loop turn have another ready callback, so a write made now is
    staged for the end of the turn instead of committing at once."""
    asyncio.get_running_loop().call_soon(lambda: None)


@pytest.mark.parametrize("company", [False, True], ids=["alone-in-turn", "end-of-turn"])
@pytest.mark.parametrize("hot", [False, True], ids=["wakeup", "hot"])
async def test_a_lone_write_waiting_for_the_lock_does_not_block_the_loop(
    db_path: Path, company: bool, hot: bool
) -> None:
    handler = BackgroundTaskHandler(database=db_path, busy_timeout=BUSY_TIMEOUT)
    handler.submit("t", "run")
    with write_lock_held(db_path):
        async with longest_stall() as stall:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    if company:
                        with_company()
                    await handler.handle_result("t", {"n": 1}, is_main_running=hot)
            waited = time.monotonic() - started
        # The timeout withdrew the write while it waited, unstarted, on the commit thread.
        assert waited < MAX_STALL
        assert stall[0] < MAX_STALL
        assert stored(db_path) == ({"t": "running"}, [])
    # Nothing was stored, so the result can be delivered again.
    await handler.handle_result("t", {"n": 2}, is_main_running=hot)
    assert stored(db_path) == ({"t": "success"}, [] if hot else ["t"])
    await handler.aclose()


async def test_a_lone_write_goes_on_once_the_lock_is_let_go(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path, busy_timeout=BUSY_TIMEOUT)
    handler.submit("t", "run")
    with write_lock_held(db_path) as lock:
        async with longest_stall() as stall:
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, lock.release)  # on the loop: only runs if it is not blocked
            await handler.handle_result("t", {"n": 1}, is_main_running=False)
        assert stall[0] < MAX_STALL
    assert stored(db_path) == ({"t": "success"}, ["t"])
    # Back to committing on the loop's thread: the next lone write works as before.
    handler.submit("u", "run")
    await handler.handle_result("u", 2, is_main_running=False)
    assert stored(db_path) == ({"t": "success", "u": "success"}, ["t", "u"])
    await handler.aclose()


async def queue_three(handler: BackgroundTaskHandler) -> None:
    for index in range(3):
        handler.submit(f"w{index}", "run")
        await handler.handle_result(f"w{index}", index, is_main_running=False)


async def test_a_drain_waiting_for_the_lock_does_not_block_the_loop(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler = BackgroundTaskHandler(database=db_path, busy_timeout=BUSY_TIMEOUT)
    await queue_three(handler)
    with write_lock_held(db_path):
        async with longest_stall() as stall:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    async for _ in handler.drain_pending():
                        pytest.fail("the drain's claim cannot commit while the file is locked")
            waited = time.monotonic() - started
        assert stall[0] < MAX_STALL
        # The claim never started, so the drain holds nothing and ends without waiting for
        # the lock to free it.
        assert waited < MAX_STALL
    assert "could not free" not in caplog.text
    assert [task.task_id async for task in handler.drain_pending()] == ["w0", "w1", "w2"]
    await handler.aclose()


@pytest.mark.parametrize("how", ["timeout", "cancel"])
async def test_a_restore_waiting_for_the_lock_is_cancelled_at_once(
    db_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    handler = BackgroundTaskHandler(database=db_path, busy_timeout=BUSY_TIMEOUT)
    await queue_three(handler)
    entered: list[int] = []

    async def restore() -> None:
        async with handler.restore_pending() as results:
            entered.append(len(results))

    with write_lock_held(db_path):
        started = time.monotonic()
        if how == "timeout":
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await restore()
        else:
            restoring = asyncio.ensure_future(restore())
            asyncio.get_running_loop().call_later(0.3, restoring.cancel)
            with pytest.raises(asyncio.CancelledError):
                await restoring
        waited = time.monotonic() - started
        assert waited < MAX_STALL
        assert entered == []
    assert "could not free" not in caplog.text
    async with handler.restore_pending() as results:
        assert [task.task_id for task in results] == ["w0", "w1", "w2"]
    assert stored(db_path)[1] == []
    await handler.aclose()


async def test_reads_from_threads_do_not_fail_while_a_write_waits_for_the_lock(
    db_path: Path,
) -> None:
    # The loop's write waits on the commit thread; reads made meanwhile by threads (more
    # than the second connection serves at once) must neither wait for that lock nor fail
    # with the write when it is not let go in time.
    handler = BackgroundTaskHandler(database=db_path, busy_timeout=1.0)
    handler.submit("t", "run")
    handler.submit("u", "run")
    failures: list[BaseException] = []
    slowest = [0.0]
    reads = [0]
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                task = handler.get_task("u")
                assert task is not None and task.task_id == "u"
                reads[0] += 1
            except BaseException as exc:  # reported below
                failures.append(exc)
            slowest[0] = max(slowest[0], time.monotonic() - started)

    with write_lock_held(db_path):
        readers = [threading.Thread(target=read) for _ in range(3)]
        for reader in readers:
            reader.start()
        try:
            with pytest.raises(DatabaseLockedError):  # the lock outlasts busy_timeout
                await handler.handle_result("t", 1, is_main_running=False)
        finally:
            stop.set()
            for reader in readers:
                await asyncio.to_thread(reader.join)
    assert failures == []
    assert reads[0] > 0
    assert slowest[0] < 0.5  # never the write's wait for the lock (1 s)
    assert stored(db_path)[0] == {"t": "running", "u": "running"}
    await handler.aclose()


def test_a_sync_write_waits_for_the_lock_and_then_commits(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path, busy_timeout=BUSY_TIMEOUT) as handler:
        handler.submit("first", "run")
        with write_lock_held(db_path) as lock:
            threading.Timer(0.3, lock.release).start()
            started = time.monotonic()
            handler.submit("second", "run")
            assert time.monotonic() - started >= 0.25  # it waited for the lock
        assert handler.get_task("second") is not None
    assert stored(db_path)[0] == {"first": "running", "second": "running"}


def test_a_sync_write_past_busy_timeout_is_refused_and_stores_nothing(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path, busy_timeout=0.3) as handler:
        handler.submit("first", "run")
        with write_lock_held(db_path), pytest.raises(DatabaseLockedError, match="locked"):
            handler.submit("second", "run")
        assert handler.get_task("second") is None
        handler.submit("second", "run")  # works once the lock is gone
    assert stored(db_path)[0] == {"first": "running", "second": "running"}


async def test_reads_do_not_wait_for_another_processs_write_lock(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path, busy_timeout=BUSY_TIMEOUT)
    handler.submit("t", "run")
    await handler.handle_result("t", 1, is_main_running=False)
    with write_lock_held(db_path):
        started = time.monotonic()
        task = handler.get_task("t")
        assert task is not None and task.result == 1
        assert [task.task_id for task in handler.list_tasks()] == ["t"]
        assert handler.pending_queue.size == 1
        assert time.monotonic() - started < MAX_STALL
    await handler.aclose()


def log_queue_changes(path: Path) -> sqlite3.Connection:
    """Record every change to the pending queue in a table ``changes``, in commit order
    (write transactions are serialized, so rowids follow commits)."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.executescript(
        """
        CREATE TABLE changes (id INTEGER PRIMARY KEY, change TEXT);
        CREATE TRIGGER log_insert AFTER INSERT ON pending_queue
            BEGIN INSERT INTO changes (change) VALUES ('queued ' || NEW.task_id); END;
        CREATE TRIGGER log_delete AFTER DELETE ON pending_queue
            BEGIN INSERT INTO changes (change) VALUES ('removed ' || OLD.task_id); END;
        CREATE TRIGGER log_claim AFTER UPDATE OF claimed_by ON pending_queue
            WHEN NEW.claimed_by IS NOT NULL
            BEGIN INSERT INTO changes (change) VALUES ('claimed ' || NEW.task_id); END;
        """
    )
    return connection


def changes(connection: sqlite3.Connection) -> list[str]:
    return [row[0] for row in connection.execute("SELECT change FROM changes ORDER BY id")]


async def test_a_later_write_does_not_commit_while_an_earlier_one_waits_for_the_lock(
    db_path: Path,
) -> None:
    # While the commit thread waits for another process's lock it lets go of the
    # connection between tries; a write called later must still not commit in such a
    # pause, before the earlier one. Here the earlier write is restore_pending()'s
    # closing removal (a write that must run to its end), the later one a lone
    # handle_result: neither is counted among the loop's staged writes.
    handler = BackgroundTaskHandler(database=db_path, busy_timeout=BUSY_TIMEOUT)
    for task_id in ("t1", "t2"):
        handler.submit(task_id, "run")
    await handler.handle_result("t1", 1, is_main_running=False)
    log = log_queue_changes(db_path)
    locks: list[WriteLock] = []

    async def restore() -> None:
        async with handler.restore_pending() as results:
            assert [task.task_id for task in results] == ["t1"]
            locks.append(WriteLock(db_path))  # taken before the block's removal commits

    restoring = asyncio.ensure_future(restore())
    while not locks:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.4)  # the removal waits on the commit thread, between tries
    locks[0].release()
    await handler.handle_result("t2", 2, is_main_running=False)  # called later
    await restoring
    assert [change for change in changes(log) if not change.startswith("claimed")] == [
        "removed t1",
        "queued t2",
    ]
    log.close()
    await handler.aclose()


async def test_a_drain_does_not_claim_before_an_earlier_write_waiting_for_the_lock(
    db_path: Path,
) -> None:
    handler = BackgroundTaskHandler(database=db_path, busy_timeout=BUSY_TIMEOUT)
    for task_id in ("t1", "t2"):
        handler.submit(task_id, "run")
    await handler.handle_result("t1", 1, is_main_running=False)
    log = log_queue_changes(db_path)
    with write_lock_held(db_path) as lock:
        earlier = asyncio.ensure_future(handler.handle_result("t2", 2, is_main_running=False))
        await asyncio.sleep(0.4)  # it waits on the commit thread, between tries
        lock.release()
        drained = [task.task_id async for task in handler.drain_pending()]  # called later
    await earlier
    assert changes(log)[:2] == ["queued t2", "claimed t1"]
    assert "t1" in drained
    log.close()
    await handler.aclose()
