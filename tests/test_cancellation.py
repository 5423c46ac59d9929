"""Cancelling ``handle_result``: a call either stores nothing or takes its whole effect
(the object, the run-state node, the file, and a hot merge's callbacks).

A durable write the commit worker has started cannot be taken back; its caller's
cancellation then waits for the commit, and the handler's objects, the run state and the
file agree on the outcome. The tests hold a write "started" on purpose with a slow
SQLite function called by a temporary trigger on the handler's own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from orbiter._internal.background import BackgroundTask, BackgroundTaskHandler, MergeMode
from orbiter._internal.state import RunNodeStatus, RunState
from orbiter.errors import BackgroundTaskError

_TRIGGERS = itertools.count()


def slow_when(handler: BackgroundTaskHandler, event: str, seconds: float) -> threading.Event:
    """Make the handler's own connection pause ``seconds`` inside its transaction each time
    the trigger ``event`` happens; the returned event is set at the first pause."""
    raw: sqlite3.Connection = handler._store._worker._db.raw  # type: ignore[attr-defined]
    started = threading.Event()
    name = f"orbiter_test_slow_{next(_TRIGGERS)}"

    def slow() -> int:
        started.set()
        time.sleep(seconds)
        return 0

    raw.create_function(name, 0, slow)
    raw.execute(f"CREATE TEMP TRIGGER {name} AFTER {event} BEGIN SELECT {name}(); END")
    return started


def slow_completions(handler: BackgroundTaskHandler, seconds: float) -> threading.Event:
    """Every completion's UPDATE takes ``seconds``."""
    return slow_when(handler, "UPDATE OF status ON background_tasks", seconds)


def stored_statuses(path: Path) -> dict[str, str]:
    """Every task's status as another connection reads it from the file."""
    with sqlite3.connect(path) as connection:
        return dict(connection.execute("SELECT task_id, status FROM background_tasks"))


def pending_ids(path: Path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return [row[0] for row in connection.execute("SELECT task_id FROM pending_queue")]


async def next_turns(count: int = 3) -> None:
    """Let tasks the handler started (detached merges) run."""
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.mark.parametrize("hot", [True, False], ids=["hot", "wakeup"])
async def test_cancel_once_a_write_started_stores_it_and_withdraws_the_rest(
    db_path: Path, hot: bool
) -> None:
    state = RunState("agent")
    handler = BackgroundTaskHandler(state, database=db_path)
    merged: list[str] = []

    async def on_merge(task: BackgroundTask, mode: MergeMode) -> None:
        merged.append(task.task_id)

    handler.on_merge(on_merge)
    first, second = handler.submit("first", "run"), handler.submit("second", "run")
    started = slow_completions(handler, 0.2)
    # One batch: "first" is running (held in the slow trigger) when both are cancelled,
    # "second" has not started. (Its merge mode is the other one, so it cannot run
    # together with "first": see test_a_cancelled_write_run_together_with_a_started_one.)
    calls = [
        asyncio.ensure_future(handler.handle_result("first", {"v": 1}, is_main_running=hot)),
        asyncio.ensure_future(handler.handle_result("second", {"v": 2}, is_main_running=not hot)),
    ]
    assert await asyncio.to_thread(started.wait, 10), "the worker never started the write"
    for call in calls:
        call.cancel()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    await next_turns()

    assert [type(outcome) for outcome in outcomes] == [asyncio.CancelledError] * 2
    # The started write is stored, and the object, the node and the file agree.
    assert stored_statuses(db_path) == {"first": "success", "second": "running"}
    assert first.status is RunNodeStatus.SUCCESS and first.result == {"v": 1}
    assert first.merge_mode is (MergeMode.HOT if hot else MergeMode.WAKEUP)
    assert handler.get_task("first") is first
    node = state.find_node("bg:first")
    assert node is not None and node.status is RunNodeStatus.SUCCESS
    # A stored hot result is still merged, apart from its cancelled caller; a wake-up
    # one is queued for its drain.
    assert merged == (["first"] if hot else [])
    assert pending_ids(db_path) == ([] if hot else ["first"])
    # The withdrawn one left no trace.
    assert second.status is RunNodeStatus.RUNNING
    node = state.find_node("bg:second")
    assert node is not None and node.status is RunNodeStatus.RUNNING
    # A retried delivery: refused for the stored one, accepted for the withdrawn one.
    with pytest.raises(BackgroundTaskError, match="already completed"):
        await handler.handle_result("first", {"v": 1}, is_main_running=hot)
    await handler.handle_result("second", {"v": 2}, is_main_running=not hot)
    assert handler.get_task("second") is second and second.is_complete
    drained = [task.task_id async for task in handler.drain_pending()]
    assert drained == (["second"] if hot else ["first"])
    assert sorted(merged) == ["first", "second"]
    await handler.aclose()


async def test_a_cancelled_write_run_together_with_a_started_one(db_path: Path) -> None:
    """Concurrent completions of one kind run as one statement: cancelling any of them
    once that statement started stores it too, with the same agreement as above."""
    state = RunState("agent")
    handler = BackgroundTaskHandler(state, database=db_path)
    tasks = [handler.submit(f"t{index}", "run") for index in range(3)]
    started = slow_completions(handler, 0.2)
    calls = [
        asyncio.ensure_future(
            handler.handle_result(task.task_id, {"i": index}, is_main_running=False)
        )
        for index, task in enumerate(tasks)
    ]
    assert await asyncio.to_thread(started.wait, 10), "the worker never started the write"
    calls[1].cancel()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    assert outcomes[0] is MergeMode.WAKEUP and outcomes[2] is MergeMode.WAKEUP
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert stored_statuses(db_path) == {"t0": "success", "t1": "success", "t2": "success"}
    assert [task.result for task in tasks] == [{"i": 0}, {"i": 1}, {"i": 2}]
    for task in tasks:
        node = state.find_node(f"bg:{task.task_id}")
        assert node is not None and node.status is RunNodeStatus.SUCCESS
    assert pending_ids(db_path) == ["t0", "t1", "t2"]
    await handler.aclose()


async def test_a_timeout_around_a_started_write_raises_timeout_error(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    handler.submit("a", "run")
    task = handler.submit("b", "run")
    slow_completions(handler, 0.15)
    other = asyncio.ensure_future(handler.handle_result("a", 1, is_main_running=False))
    with pytest.raises(TimeoutError):  # not a CancelledError leaking out of asyncio.timeout
        async with asyncio.timeout(0.05):
            await handler.handle_result("b", 2, is_main_running=False)
    assert await other is MergeMode.WAKEUP
    assert stored_statuses(db_path) == {"a": "success", "b": "success"}
    assert task.status is RunNodeStatus.SUCCESS and task.result == 2
    assert handler.get_task("b") is task
    await handler.aclose()


async def test_cancel_before_the_write_started_stores_nothing(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    task = handler.submit("t", "run")
    for blocker in ("b1", "b2"):
        handler.submit(blocker, "run")
    started = slow_completions(handler, 0.2)
    # Two calls in one loop turn go to the worker, which is then busy for 0.4 s...
    blockers = [asyncio.ensure_future(handler.handle_result(b, 0)) for b in ("b1", "b2")]
    assert await asyncio.to_thread(started.wait, 10)
    # ... so this one waits in its queue, not taken yet, when it is cancelled.
    waiting = asyncio.ensure_future(handler.handle_result("t", 1, is_main_running=False))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.gather(*blockers)
    assert stored_statuses(db_path)["t"] == "running"
    assert task.status is RunNodeStatus.RUNNING
    assert pending_ids(db_path) == []
    # Nothing happened, so the result can still be delivered.
    assert await handler.handle_result("t", 1, is_main_running=False) is MergeMode.WAKEUP
    done = handler.get_task("t")
    assert done is task and done.status is RunNodeStatus.SUCCESS
    await handler.aclose()


@pytest.mark.parametrize("delay", [0.0, 0.0005, 0.002, 0.01])
async def test_many_cancelled_results_each_take_all_or_nothing(
    make_handler: Callable[..., BackgroundTaskHandler],
    backend: str,
    db_path: Path,
    delay: float,
) -> None:
    state = RunState("agent", max_nodes=1_000)
    handler = make_handler(state=state)
    merged: set[str] = set()

    async def on_merge(task: BackgroundTask, mode: MergeMode) -> None:
        merged.add(task.task_id)

    handler.on_merge(on_merge)
    count = 300
    ids = [f"t{index}" for index in range(count)]
    submitted = {task_id: handler.submit(task_id, "run") for task_id in ids}
    calls = {
        task_id: asyncio.ensure_future(
            handler.handle_result(task_id, index, is_main_running=index % 2 == 0)
        )
        for index, task_id in enumerate(ids)
    }
    await asyncio.sleep(delay)
    for call in calls.values():
        call.cancel()
    await asyncio.gather(*calls.values(), return_exceptions=True)
    await next_turns()

    on_file = stored_statuses(db_path) if backend == "sqlite" else None
    queued = set(pending_ids(db_path)) if backend == "sqlite" else None
    for index, task_id in enumerate(ids):
        task, call = submitted[task_id], calls[task_id]
        node = state.find_node(f"bg:{task_id}")
        assert node is not None
        if task.status is RunNodeStatus.RUNNING:  # nothing happened
            assert call.cancelled()
            assert node.status is RunNodeStatus.RUNNING
            assert on_file is None or on_file[task_id] == "running"
            assert task_id not in merged
        else:  # the whole effect, a hot merge's callbacks included
            assert task.status is RunNodeStatus.SUCCESS and task.result == index
            assert node.status is RunNodeStatus.SUCCESS
            assert on_file is None or on_file[task_id] == "success"
            assert (task_id in merged) == (index % 2 == 0)
        wakeup = task.status is RunNodeStatus.SUCCESS and index % 2 == 1
        assert queued is None or (task_id in queued) == wakeup
    # What stored nothing can still be delivered; what was stored completes once.
    for index, task_id in enumerate(ids):
        if submitted[task_id].status is RunNodeStatus.RUNNING:
            await handler.handle_result(task_id, index)
            assert submitted[task_id].status is RunNodeStatus.SUCCESS
        else:
            with pytest.raises(BackgroundTaskError, match="already completed"):
                await handler.handle_result(task_id, index)


async def test_aclose_waits_for_the_merge_of_a_cancelled_hot_result(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    merged: list[str] = []

    async def slow_merge(task: BackgroundTask, mode: MergeMode) -> None:
        await asyncio.sleep(0.1)
        merged.append(task.task_id)

    handler.on_merge(slow_merge)
    for task_id in ("a", "b"):
        handler.submit(task_id, "run")
    started = slow_completions(handler, 0.05)
    calls = [asyncio.ensure_future(handler.handle_result(t, t)) for t in ("a", "b")]
    assert await asyncio.to_thread(started.wait, 10)
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    assert all(call.cancelled() for call in calls)
    await handler.aclose()
    assert merged == ["a"]  # "b" had not started: withdrawn


def slow_claims(handler: BackgroundTaskHandler, seconds: float) -> threading.Event:
    """Every claim of a pending item takes ``seconds``."""
    event = "UPDATE OF claimed_by ON pending_queue WHEN NEW.claimed_by IS NOT NULL"
    return slow_when(handler, event, seconds)


def held_items(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        query = "SELECT count(*) FROM pending_queue WHERE claimed_by IS NOT NULL"
        return int(connection.execute(query).fetchone()[0])


async def queue_three_and_two_blockers(handler: BackgroundTaskHandler) -> None:
    """Queue results w0-w2, and submit b1 and b2 (to keep the worker busy with)."""
    for index in range(3):
        handler.submit(f"w{index}", "run")
        await handler.handle_result(f"w{index}", index, is_main_running=False)
    for blocker in ("b1", "b2"):
        handler.submit(blocker, "run")


async def test_a_restore_cancelled_while_its_claim_commits_leaves_the_items_free(
    db_path: Path,
) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    await queue_three_and_two_blockers(handler)
    busy = slow_completions(handler, 0.1)
    claiming = slow_claims(handler, 0.05)
    # Keep the worker busy so the restore's claim goes to it (not inline on the loop).
    blockers = [asyncio.ensure_future(handler.handle_result(b, 0)) for b in ("b1", "b2")]
    assert await asyncio.to_thread(busy.wait, 10)
    entered: list[list[BackgroundTask]] = []

    async def restore() -> None:
        async with handler.restore_pending() as results:
            entered.append(results)

    restoring = asyncio.ensure_future(restore())
    assert await asyncio.to_thread(claiming.wait, 10), "the claim never started"
    restoring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await restoring
    await asyncio.gather(*blockers)
    assert entered == []
    # The claim committed, but nobody would ever settle it: it was released.
    assert held_items(db_path) == 0
    assert [task.task_id async for task in handler.drain_pending()] == ["w0", "w1", "w2"]
    await handler.aclose()


async def test_a_restore_cancelled_while_its_acknowledgement_waits_commits_it_first(
    db_path: Path,
) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    await queue_three_and_two_blockers(handler)
    busy = slow_completions(handler, 0.2)
    seen_when_cancelled: list[list[str]] = []

    async def restore() -> None:
        me = asyncio.current_task()
        assert me is not None
        try:
            async with handler.restore_pending() as results:
                assert len(results) == 3
                # Two writes of one turn go to the worker, which is then busy for 0.2 s.
                for blocker in ("b1", "b2"):
                    blockers.append(asyncio.ensure_future(handler.handle_result(blocker, 0)))
                assert await asyncio.to_thread(busy.wait, 10)
                # Cancelled right after the block ends: its acknowledgement is queued.
                asyncio.get_running_loop().call_soon(me.cancel)
        except asyncio.CancelledError:
            seen_when_cancelled.append(pending_ids(db_path))
            raise

    blockers: list[asyncio.Future[MergeMode]] = []
    with pytest.raises(asyncio.CancelledError):
        await asyncio.ensure_future(restore())
    # The merge finished, so the acknowledgement committed before the cancellation.
    assert seen_when_cancelled == [[]]
    assert handler.pending_queue.size == 0
    await asyncio.gather(*blockers)
    await handler.aclose()


async def test_a_timeout_while_a_restore_acknowledgement_fails_is_still_a_timeout(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handler = BackgroundTaskHandler(database=db_path, busy_timeout=0.3)
    for index in range(3):
        handler.submit(f"w{index}", "run")
        await handler.handle_result(f"w{index}", index, is_main_running=False)
    other = sqlite3.connect(db_path, isolation_level=None)  # another program, writing
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                async with handler.restore_pending() as results:
                    assert len(results) == 3
                    other.execute("BEGIN IMMEDIATE")
        # The timeout came while the acknowledgement waited for the lock; that then
        # failed (busy_timeout), which is logged, and the items stay pending.
        assert "left to finish failed" in caplog.text
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert [task.task_id async for task in handler.drain_pending()] == ["w0", "w1", "w2"]
    await handler.aclose()


async def test_a_restore_cancelled_inside_its_block_keeps_every_item(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    for index in range(3):
        handler.submit(f"w{index}", "run")
        await handler.handle_result(f"w{index}", index, is_main_running=False)
    inside = asyncio.Event()

    async def restore() -> None:
        async with handler.restore_pending() as results:
            assert len(results) == 3
            inside.set()
            await asyncio.sleep(10)

    restoring = asyncio.ensure_future(restore())
    await inside.wait()
    restoring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await restoring
    assert held_items(db_path) == 0
    assert handler.pending_queue.size == 3
    assert [task.task_id async for task in handler.drain_pending()] == ["w0", "w1", "w2"]
    await handler.aclose()


async def test_a_recovery_cancelled_once_it_adopted_orphans_still_resubmits_them(
    db_path: Path,
) -> None:
    gone = BackgroundTaskHandler(database=db_path)
    gone.submit("orphan", "run", payload={"redo": 1})
    gone.close()  # a closed handler's running tasks are orphans
    handler = BackgroundTaskHandler(database=db_path)
    handler.submit("other", "run")
    adopting = slow_when(handler, "UPDATE OF owner_id ON background_tasks", 0.1)
    resubmitted: list[tuple[str, object]] = []

    async def resubmit(task: BackgroundTask) -> None:
        resubmitted.append((task.task_id, task.payload))

    # Two writes in one loop turn, so the recovery runs on the worker, not inline.
    other = asyncio.ensure_future(handler.handle_result("other", 1))
    recovering = asyncio.ensure_future(handler.recover_orphans("resubmit", resubmit=resubmit))
    assert await asyncio.to_thread(adopting.wait, 10), "the recovery never started"
    recovering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await recovering
    await other
    await next_turns()
    assert resubmitted == [("orphan", {"redo": 1})]
    task = handler.get_task("orphan")
    assert task is not None and task.status is RunNodeStatus.RUNNING  # adopted, redone
    await handler.aclose()


@pytest.mark.parametrize("hot", [True, False], ids=["hot", "wakeup"])
async def test_a_cancel_landing_in_the_turn_after_an_at_once_commit_keeps_the_result(
    db_path: Path, hot: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lone write commits at once, then yields one turn; a cancellation landing in that
    # turn (another thread's call_soon_threadsafe, a timeout) finds the write committed.
    state = RunState("agent")
    handler = BackgroundTaskHandler(state, database=db_path)
    merged: list[str] = []
    handler.on_merge(lambda task, mode: merged.append(task.task_id))
    task = handler.submit("t", "run")
    worker = handler._store._worker  # type: ignore[attr-defined]
    run_now = worker._run_now
    cancelled_at_commit: list[bool] = []

    def run_now_then_cancel(*args: object) -> object:
        done = run_now(*args)
        if done is not None and args[1]:  # a write that committed at once
            caller = asyncio.current_task()
            assert caller is not None
            asyncio.get_running_loop().call_soon(caller.cancel)
            cancelled_at_commit.append(True)
        return done

    monkeypatch.setattr(worker, "_run_now", run_now_then_cancel)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(handler.handle_result("t", {"v": 1}, is_main_running=hot))
    monkeypatch.undo()
    assert cancelled_at_commit == [True]
    await next_turns()
    assert stored_statuses(db_path) == {"t": "success"}
    assert task.status is RunNodeStatus.SUCCESS and task.result == {"v": 1}
    assert [node.status for node in state.nodes] == [RunNodeStatus.SUCCESS]
    assert merged == (["t"] if hot else [])
    assert pending_ids(db_path) == ([] if hot else ["t"])
    with pytest.raises(BackgroundTaskError, match="already completed"):
        await handler.handle_result("t", {"v": 2}, is_main_running=hot)
    await handler.aclose()
    assert merged == (["t"] if hot else [])


_SIGNAL_CANCELS = """
import asyncio, faulthandler, logging, random, signal, sys
from orbiter._internal.background import BackgroundTaskHandler
logging.disable(logging.WARNING)
faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the test, with stacks

async def main():
    handler = BackgroundTaskHandler(database=sys.argv[1], synchronous="NORMAL")
    me = asyncio.current_task()
    signal.signal(signal.SIGALRM, lambda *_: me.cancel())  # what asyncio.run does on ^C
    busy = True
    async def spin():  # another ready callback: writes are staged, handed on inline
        while busy:
            await asyncio.sleep(0)
    spinner = asyncio.create_task(spin())
    outcomes = {"stored": 0, "cancelled": 0}
    for index in range(1000):
        handler.submit(f"t{index}", "run")
        signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-5, 3e-4))
        try:
            await handler.handle_result(f"t{index}", index, is_main_running=False)
            outcomes["stored"] += 1
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
            while me.uncancel():
                pass
        try:
            await asyncio.sleep(0.0005)  # a late alarm fires out here
        except asyncio.CancelledError:
            while me.uncancel():
                pass
    busy = False
    await spinner
    signal.setitimer(signal.ITIMER_REAL, 0)
    await handler.aclose()
    print(outcomes["stored"], outcomes["cancelled"])

asyncio.run(main())
"""


def test_a_signal_handler_cancelling_the_task_mid_write_does_not_hang(tmp_path: Path) -> None:
    # A signal handler runs between two bytecodes of the main thread, so it can land
    # while that thread decides a write's fate under the worker's start lock (handing
    # on its own staged write). Its Task.cancel() used to wait for that lock forever.
    script = tmp_path / "signal_cancels.py"
    script.write_text(_SIGNAL_CANCELS)
    database = tmp_path / "tasks.db"
    done = subprocess.run(
        [sys.executable, str(script), str(database)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stored, cancelled = map(int, done.stdout.split())
    assert stored + cancelled == 1000
    # Whatever each call reported, every task is either done or still running: never
    # half-written (a stored result is queued, a running task has no result).
    with closing(sqlite3.connect(database)) as connection:
        rows = connection.execute(
            "SELECT status, result IS NULL, task_id IN (SELECT task_id FROM pending_queue) "
            "FROM background_tasks"
        ).fetchall()
    assert len(rows) == 1000
    assert set(rows) <= {("success", 0, 1), ("running", 1, 0)}
    assert sum(1 for row in rows if row[0] == "success") >= stored


async def test_aclose_waits_for_merges_detached_by_calls_cancelled_as_it_begins(
    tmp_path: Path,
) -> None:
    """``gather`` returns as soon as one call is cancelled, while the others may still be
    finishing their writes: ``aclose`` right after must still wait for the hot merges
    those calls hand to a task of their own once they are cancelled. (A cancellation that
    lands once a call's write has committed, while it runs the callbacks itself, cancels
    them there, as the reference does: those end "cancelled" before ``gather`` returns.)"""
    for turns in range(40):  # cancel at many moments of the calls' progress
        log = await cancel_then_close(tmp_path / f"{turns}.db", turns)
        assert log.count("start") == log.count("end") + log.count("cancelled"), (turns, log)


async def cancel_then_close(path: Path, turns: int) -> list[str]:
    """Three hot completions, cancelled after ``turns`` loop turns, then ``aclose``: what
    the merge callbacks had done when it returned."""
    handler = BackgroundTaskHandler(database=path)
    log: list[str] = []

    async def on_merge(task: BackgroundTask, mode: MergeMode) -> None:
        log.append("start")
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        handler.get_task(task.task_id)  # raises once the handler is closed
        log.append("end")

    handler.on_merge(on_merge)
    for index in range(3):
        handler.submit(f"t{index}", "run")
    calls = asyncio.gather(*(handler.handle_result(f"t{i}", i) for i in range(3)))
    for _ in range(turns):
        await asyncio.sleep(0)
    calls.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await calls
    await handler.aclose()
    return list(log)
