"""Regression tests for defects found in review: lock waits, stalled owners, creation
races, pushes over completed tasks, dropped handlers, waiting on claimed items, reads
racing completions."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from orbiter import migrate
from orbiter._internal.background import BackgroundTask, BackgroundTaskHandler
from orbiter._internal.state import RunNodeStatus
from orbiter.errors import BackgroundTaskError, DatabaseError, DatabaseLockedError, SchemaError
from tests.conftest import HELPERS


async def test_a_held_write_lock_fails_a_batch_once_not_per_call(db_path: Path) -> None:
    async with BackgroundTaskHandler(database=db_path, busy_timeout=0.5) as handler:
        for index in range(20):
            handler.submit(f"t{index}", "run")
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(handler.handle_result(f"t{i}", i) for i in range(20)), return_exceptions=True
        )
        waited = time.monotonic() - started
        other.execute("ROLLBACK")
        other.close()
        assert {type(o) for o in outcomes} == {DatabaseLockedError}
        # One busy timeout per batch, not one per call (20 x 0.5 s before the fix).
        assert waited < 5, waited
        assert await handler.handle_result("t0", "later") is not None  # works once free
        assert handler.get_task("t1").status is RunNodeStatus.RUNNING  # type: ignore[union-attr]


def test_a_stalled_but_live_owner_keeps_its_tasks(db_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, str(HELPERS / "child.py"), "stall_owner", str(db_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGSTOP)  # no heartbeat for longer than its lease
        time.sleep(1.2)
        with BackgroundTaskHandler(database=db_path) as recoverer:
            assert asyncio.run(recoverer.recover_orphans()) == []  # same host, pid alive
            with sqlite3.connect(db_path) as connection:  # even if its row vanished
                connection.execute("DELETE FROM owners WHERE pid = ?", (child.pid,))
            child.send_signal(signal.SIGCONT)
            time.sleep(0.5)  # a few heartbeats put the row back
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "submitted"
            with sqlite3.connect(db_path) as connection:
                rows = connection.execute(
                    "SELECT count(*) FROM owners WHERE pid = ?", (child.pid,)
                ).fetchone()
            assert rows == (1,)
            assert asyncio.run(recoverer.recover_orphans()) == []
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()


def test_many_processes_creating_one_new_file(tmp_path: Path) -> None:
    for trial in range(5):
        db = tmp_path / f"race-{trial}.db"
        children = [
            subprocess.Popen(
                [sys.executable, str(HELPERS / "child.py"), "open_race", str(db)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        for child in children:
            out, err = child.communicate(timeout=60)
            assert child.returncode == 0, err
            assert out.strip() == "opened"


async def test_push_never_overwrites_a_completed_task(durable: BackgroundTaskHandler) -> None:
    durable.submit("a", "run")
    await durable.handle_result("a", {"secret": 1}, is_main_running=False)
    durable.pending_queue.pop_all()
    with pytest.raises(BackgroundTaskError, match="belongs to run 'run'"):
        durable.pending_queue.push(BackgroundTask("a", "other-run"))  # another run's id
    durable.pending_queue.push(BackgroundTask("a", "run"))  # an empty object of the same id
    task = durable.get_task("a")
    assert task is not None and task.status is RunNodeStatus.SUCCESS
    assert task.result == {"secret": 1} and task.parent_task_id == "run"
    with pytest.raises(BackgroundTaskError, match="already completed"):
        await durable.handle_result("a", "again", is_main_running=False)
    assert [t.result async for t in durable.drain_pending()] == [{"secret": 1}]


def _settled_threads_and_fds() -> tuple[int, int]:
    """Threads and open files once every dropped handler (this test's, or one an earlier
    test left to the garbage collector) has closed itself: its threads gone (5 s at most)."""
    gc.collect()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        thread.name.startswith("orbiter-bg") for thread in threading.enumerate()
    ):
        time.sleep(0.05)
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def test_a_dropped_handler_closes_itself(db_path: Path) -> None:
    BackgroundTaskHandler(database=db_path).close()
    before = _settled_threads_and_fds()
    for index in range(5):
        handler = BackgroundTaskHandler(database=db_path)
        handler.submit(f"t{index}", "run")
        del handler
    assert _settled_threads_and_fds() == before
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("SELECT count(*) = count(closed_at) FROM owners").fetchone() == (
            1,
        )


async def test_wait_does_not_count_items_another_drain_holds(
    handler: BackgroundTaskHandler,
) -> None:
    handler.submit("a", "run")
    await handler.handle_result("a", 1, is_main_running=False)
    drain = handler.drain_pending()
    assert (await drain.__anext__()).task_id == "a"  # held by a live drain
    started = time.monotonic()
    assert await handler.pending_queue.wait(timeout=0.3) is False
    assert time.monotonic() - started >= 0.25
    assert handler.pending_queue.size == 1
    assert not handler.pending_queue.empty
    await drain.aclose()
    assert await handler.pending_queue.wait(timeout=0.3) is True


async def test_a_drain_stopped_early_gives_items_back_in_enqueue_order(
    handler: BackgroundTaskHandler,
) -> None:
    for task_id, run in [("a1", "A"), ("b1", "B"), ("a2", "A"), ("b2", "B"), ("a3", "A")]:
        handler.submit(task_id, run)
        await handler.handle_result(task_id, task_id, is_main_running=False)
    drain = handler.drain_pending("A")
    assert (await drain.__anext__()).task_id == "a1"
    assert (await drain.__anext__()).task_id == "a2"  # holding a2: a1 has left the queue
    assert handler.pending_queue.size == 4
    await drain.aclose()
    assert [t.task_id async for t in handler.drain_pending()] == ["b1", "a2", "b2", "a3"]


def test_the_in_memory_queue_is_thread_safe() -> None:
    # The spec calls PendingQueue thread-safe: pushes and pop_all from other threads
    # while a drain runs must neither fail nor lose or duplicate an item.
    handler = BackgroundTaskHandler()
    count = 20_000
    for index in range(count):
        handler.pending_queue.push(_done(f"q{index}"))
    popped: list[str] = []
    pushed = [f"q{index}" for index in range(count)]
    stop = threading.Event()

    def other_thread() -> None:
        index = 0
        while not stop.is_set():
            handler.pending_queue.push(_done(f"p{index}"))
            pushed.append(f"p{index}")
            index += 1
            if index % 50 == 0:
                popped.extend(t.task_id for t in handler.pending_queue.pop_all())

    thread = threading.Thread(target=other_thread)

    async def drain_all() -> list[str]:
        drained = []
        async for task in handler.drain_pending():
            drained.append(task.task_id)
            if not thread.is_alive() and not stop.is_set():
                thread.start()  # the drain holds the first items: now push and pop
        return drained

    try:
        drained = asyncio.run(drain_all())
    finally:
        stop.set()
        thread.join()
    rest = [t.task_id for t in handler.pending_queue.pop_all()]
    everything = drained + popped + rest
    assert len(everything) == len(set(everything))  # nothing twice
    assert set(everything) == set(pushed)  # nothing lost
    assert drained[:count] == pushed[:count]  # queued before the drain: all drained, in order
    assert len(pushed) > count  # the other thread did run during the drain


def _done(task_id: str) -> BackgroundTask:
    task = BackgroundTask(task_id, "run")
    task.complete(task_id)
    return task


def test_migrate_upgrade_creates_a_private_file_and_refuses_bad_ones(tmp_path: Path) -> None:
    created = tmp_path / "new.db"
    migrate.upgrade(str(created))
    assert stat.S_IMODE(created.stat().st_mode) == 0o600
    junk = tmp_path / "junk.db"
    junk.write_text("not a database")
    with pytest.raises(DatabaseError, match="not a SQLite database"):
        migrate.upgrade(str(junk))
    assert junk.read_text() == "not a database"


def test_a_file_with_only_views_is_foreign(tmp_path: Path) -> None:
    target = tmp_path / "views.db"
    with sqlite3.connect(target) as connection:
        connection.execute("CREATE VIEW answer AS SELECT 42")
    before = target.read_bytes()
    with pytest.raises(SchemaError, match="not an orbiter-background one"):
        BackgroundTaskHandler(database=target)
    assert target.read_bytes() == before


def test_a_handler_collected_on_its_commit_thread_still_closes(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    worker = handler._store._worker  # type: ignore[attr-defined]
    handler._store._cycle = handler._store  # type: ignore[attr-defined]  # only GC frees it
    del handler
    gc.disable()  # the next collection happens where we say: on the commit thread
    try:

        def collect_here(db: object) -> None:
            gc.collect()

        worker.submit(collect_here).result(timeout=5)  # runs on the commit thread
    finally:
        gc.enable()
    deadline = time.monotonic() + 5
    while not worker.closed or worker._thread.is_alive():
        assert time.monotonic() < deadline, "the collected handler never closed"
        time.sleep(0.01)
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("SELECT count(*) = count(closed_at) FROM owners").fetchone() == (
            1,
        )


@pytest.mark.parametrize("read", ["get_task", "list_tasks"])
def test_a_read_racing_a_completion_never_rolls_a_held_task_back(db_path: Path, read: str) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        task = handler.submit("t", "run")
        worker = handler._store._worker  # type: ignore[attr-defined]
        real_call = worker.call

        def read_then_complete_elsewhere(run: Any, **options: Any) -> Any:
            rows = real_call(run, **options)  # read while the task still runs...
            if options.get("writes") is False:  # ...and another thread completes it
                other = threading.Thread(
                    target=asyncio.run,
                    args=(handler.handle_result("t", {"done": 1}, is_main_running=False),),
                )
                other.start()
                other.join()
            return rows

        worker.call = read_then_complete_elsewhere
        if read == "get_task":
            got = handler.get_task("t")
        else:
            [got] = handler.list_tasks()
        del worker.call
        assert got is task
        assert task.status is RunNodeStatus.SUCCESS
        assert task.result == {"done": 1}
        assert handler.get_task("t") is task  # a fresh read agrees
        assert task.status is RunNodeStatus.SUCCESS


def test_a_change_made_on_a_task_object_is_stored_by_push(
    handler: BackgroundTaskHandler,
) -> None:
    task = handler.submit("a", "run")
    task.complete("manual")  # on the object only...
    handler.pending_queue.push(task)  # ...until pushed
    assert handler.get_task("a") is task
    assert (task.status, task.result) == (RunNodeStatus.SUCCESS, "manual")
    assert handler.list_tasks(status=RunNodeStatus.SUCCESS) == [task]


async def test_a_read_undoes_a_change_made_on_a_held_object_and_not_stored(
    durable: BackgroundTaskHandler,
) -> None:
    # A read shows what is stored, also when the change kept the task's status.
    task = durable.submit("a", "run")
    await durable.handle_result("a", "stored", is_main_running=True)
    task.complete("local")  # on the object only, never pushed
    assert durable.get_task("a") is task
    assert task.result == "stored"
    task.complete("local again")
    assert durable.list_tasks(status=RunNodeStatus.SUCCESS) == [task]
    assert task.result == "stored"


@pytest.mark.parametrize("finish", ["handle_result", "handle_error"])
async def test_a_drain_never_rolls_back_a_task_finished_while_it_held_the_row(
    handler: BackgroundTaskHandler, finish: str
) -> None:
    # Both tasks are queued while still running, so the drain claims "b" as RUNNING; the
    # consumer then finishes "b" before the drain hands it out.
    first, second = handler.submit("a", "run"), handler.submit("b", "run")
    handler.pending_queue.push(first)
    handler.pending_queue.push(second)
    seen = []
    async for task in handler.drain_pending():
        if task.task_id == "a" and finish == "handle_result":
            await handler.handle_result("b", "late", is_main_running=True)
        elif task.task_id == "a":
            handler.handle_error("b", "late")
        else:
            seen.append((task is second, task.status, task.result, task.error))
    if finish == "handle_result":
        assert seen == [(True, RunNodeStatus.SUCCESS, "late", None)]
    else:
        assert seen == [(True, RunNodeStatus.FAILED, None, "late")]


def test_a_purged_and_resubmitted_id_is_seen_running_again(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path) as first:
        old = first.submit("x", "run-1")
        asyncio.run(first.handle_result("x", "old", is_main_running=True))
        with sqlite3.connect(db_path) as connection:  # what `orbiter-bg purge` does
            connection.execute("DELETE FROM background_tasks WHERE task_id = 'x'")
        with BackgroundTaskHandler(database=db_path) as second:
            second.submit("x", "run-2")
        seen = first.get_task("x")
        assert seen is not None and seen is not old  # a different task now
        assert (seen.parent_task_id, seen.status) == ("run-2", RunNodeStatus.RUNNING)
        assert first.list_tasks(status=RunNodeStatus.RUNNING) == [seen]
        assert (old.parent_task_id, old.result) == ("run-1", "old")  # left as it was


def test_pushing_another_object_with_a_known_id_keeps_the_handed_out_one(
    handler: BackgroundTaskHandler,
) -> None:
    original = handler.submit("x", "run", payload={"p": 1})
    other = BackgroundTask("x", "run", payload={"p": 2})
    other.complete("r")
    handler.pending_queue.push(other)
    got = handler.get_task("x")
    assert got is original
    assert (got.parent_task_id, got.payload) == ("run", {"p": 1})
