"""Crash-proof and multi-process behaviour: orphans, exclusive draining, per-run draining,
all-or-nothing restores, cross-process wake-up, and hostile values."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orbiter._internal.background import BackgroundTask, BackgroundTaskHandler, MergeMode
from orbiter._internal.state import RunNodeStatus, RunState
from orbiter.errors import BackgroundTaskError, StoredValueError
from orbiter.store.codec import JsonCodec
from tests.conftest import run_helper
from tests.test_crash import kill, read_until, start_child


async def queue_results(handler: BackgroundTaskHandler, parent: str, count: int) -> list[str]:
    ids = [f"{parent}-{index}" for index in range(count)]
    for task_id in ids:
        handler.submit(task_id, parent)
        await handler.handle_result(task_id, task_id.upper(), is_main_running=False)
    return ids


def kill_after_submits(db_path: Path, count: int) -> None:
    child = start_child("submit", str(db_path), "100000")
    read_until(child, f"submitted {count - 1}")
    kill(child)


# -- orphans ---------------------------------------------------------------------------


async def test_orphans_of_a_killed_process_are_failed_at_once(db_path: Path) -> None:
    kill_after_submits(db_path, 5)
    async with BackgroundTaskHandler(database=db_path) as handler:
        mine = handler.submit("mine", "run")
        settled = await handler.recover_orphans()
        assert {t.task_id for t in settled} >= {f"t{i}" for i in range(5)}
        for task in settled:
            assert task.status is RunNodeStatus.FAILED
            assert task.error is not None and task.error.startswith("orphaned: owner process")
            assert "exited" in task.error
        assert mine.status is RunNodeStatus.RUNNING
        assert await handler.recover_orphans() == []  # idempotent
        with pytest.raises(BackgroundTaskError, match="already completed"):
            await handler.handle_result("t0", "too late")


async def test_orphans_can_time_out(db_path: Path) -> None:
    kill_after_submits(db_path, 3)
    async with BackgroundTaskHandler(database=db_path) as handler:
        settled = await handler.recover_orphans("timeout")
        assert settled and all(t.status is RunNodeStatus.TIMEOUT for t in settled)
        assert handler.list_tasks(status=RunNodeStatus.RUNNING) == []


async def test_a_resubmit_that_cannot_be_called_is_refused_before_any_orphan_is_touched(
    db_path: Path,
) -> None:
    kill_after_submits(db_path, 2)
    async with BackgroundTaskHandler(database=db_path) as handler:
        running = handler.list_tasks(status=RunNodeStatus.RUNNING)
        assert len(running) >= 2  # (the child may have submitted more than two)
        with pytest.raises(BackgroundTaskError, match="resubmit must be a callable"):
            await handler.recover_orphans("resubmit", resubmit=5)  # type: ignore[arg-type]
        assert handler.list_tasks(status=RunNodeStatus.RUNNING) == running
        assert len(await handler.recover_orphans()) == len(running)  # still there to settle


async def test_an_orphan_whose_payload_cannot_be_read_settles_nothing(db_path: Path) -> None:
    kill_after_submits(db_path, 2)
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE background_tasks SET payload = '{bad' WHERE task_id = 't0'")
    db.close()
    async with BackgroundTaskHandler(database=db_path) as handler:
        with pytest.raises(StoredValueError, match="stored payload of task 't0'"):
            await handler.recover_orphans("resubmit", resubmit=_never_called)
        with sqlite3.connect(db_path) as db:
            statuses = db.execute("SELECT DISTINCT status FROM background_tasks").fetchall()
            (orphans,) = db.execute("SELECT count(*) FROM background_tasks").fetchone()
            db.execute("UPDATE background_tasks SET payload = '{}' WHERE task_id = 't0'")
        db.close()
        assert statuses == [("running",)]  # (the child may have submitted more than two)
        settled = {task.task_id for task in await handler.recover_orphans()}
        assert len(settled) == orphans and settled >= {"t0", "t1"}


async def _never_called(task: BackgroundTask) -> None:
    raise AssertionError(f"resubmitted {task.task_id} although nothing was settled")


async def test_orphans_can_be_resubmitted(db_path: Path) -> None:
    kill_after_submits(db_path, 3)
    restarted: list[tuple[str, object]] = []
    async with BackgroundTaskHandler(database=db_path) as handler:

        async def resubmit(task: BackgroundTask) -> None:
            restarted.append((task.task_id, task.payload))

        settled = await handler.recover_orphans("resubmit", resubmit=resubmit)
        assert [t for t, _ in restarted][:3] == ["t0", "t1", "t2"]
        assert restarted[0][1] == {"index": 0}
        assert all(t.status is RunNodeStatus.RUNNING for t in settled)
        # Adopted: no longer orphans, and the restarted work can deliver its result.
        assert await handler.recover_orphans() == []
        assert (
            await handler.handle_result("t0", "redone", is_main_running=False) is MergeMode.WAKEUP
        )


async def test_failing_resubmit_marks_the_task_failed(db_path: Path) -> None:
    kill_after_submits(db_path, 1)
    async with BackgroundTaskHandler(database=db_path) as handler:

        def resubmit(task: BackgroundTask) -> None:
            raise RuntimeError("no capacity")

        (task, *_) = await handler.recover_orphans("resubmit", resubmit=resubmit)
        assert task.status is RunNodeStatus.FAILED
        assert "resubmit failed: no capacity" in (task.error or "")


async def test_recover_orphans_bad_arguments(durable: BackgroundTaskHandler) -> None:
    with pytest.raises(BackgroundTaskError, match="action must be one of"):
        await durable.recover_orphans("explode")
    with pytest.raises(BackgroundTaskError, match="resubmit="):
        await durable.recover_orphans("resubmit")
    with pytest.raises(BackgroundTaskError, match="resubmit="):
        await durable.recover_orphans("fail", resubmit=lambda task: None)


async def test_live_owners_are_never_touched(db_path: Path) -> None:
    child = start_child("submit", str(db_path), "100000")
    try:
        read_until(child, "submitted 4")
        async with (
            BackgroundTaskHandler(database=db_path) as other,
            BackgroundTaskHandler(database=db_path) as recoverer,
        ):
            other.submit("other", "run")
            assert await recoverer.recover_orphans() == []
            assert other.get_task("other").status is RunNodeStatus.RUNNING  # type: ignore[union-attr]
    finally:
        kill(child)


async def test_a_closed_handler_leaves_orphans(db_path: Path) -> None:
    state = RunState("agent")
    async with BackgroundTaskHandler(database=db_path) as first:
        first.submit("left", "run")
    async with BackgroundTaskHandler(state, database=db_path) as second:
        second.submit("kept", "run")
        (task,) = await second.recover_orphans("timeout")
        assert task.task_id == "left" and task.status is RunNodeStatus.TIMEOUT


async def test_expired_lease_on_another_host_makes_orphans(db_path: Path) -> None:
    async with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("remote-ok", "run")
        handler.submit("remote-dead", "run")
        with sqlite3.connect(db_path) as connection:
            for task_id, expiry in (("remote-ok", "9999-01-01"), ("remote-dead", "2000-01-01")):
                owner = f"owner-{task_id}"
                connection.execute(
                    "INSERT INTO owners (owner_id, host, pid, started_at, heartbeat_at, "
                    "lease_expires_at) VALUES (?, 'elsewhere', 1, ?, ?, ?)",
                    (owner, expiry, expiry, expiry),
                )
                connection.execute(
                    "UPDATE background_tasks SET owner_id = ? WHERE task_id = ?", (owner, task_id)
                )
        settled = await handler.recover_orphans()
        assert [t.task_id for t in settled] == ["remote-dead"]
        assert "stopped renewing its lease" in (settled[0].error or "")


async def test_heartbeat_renews_the_lease(db_path: Path) -> None:
    async with BackgroundTaskHandler(
        database=db_path, heartbeat_interval=0.05, lease_timeout=1
    ) as handler:
        handler.submit("a", "run")

        def lease() -> str:
            with sqlite3.connect(db_path) as connection:
                return str(connection.execute("SELECT max(heartbeat_at) FROM owners").fetchone()[0])

        first = lease()
        await asyncio.sleep(0.3)
        assert lease() > first


def test_concurrent_recovery_settles_each_orphan_once(db_path: Path) -> None:
    kill_after_submits(db_path, 60)
    import subprocess
    import sys

    from tests.conftest import HELPERS

    recoverers = [
        subprocess.Popen(
            [sys.executable, str(HELPERS / "child.py"), "recover", str(db_path), "fail"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    settled = [json.loads(r.communicate(timeout=120)[0]) for r in recoverers]
    flat = [task_id for batch in settled for task_id in batch]
    assert len(flat) == len(set(flat)) >= 60


# -- exclusive draining -------------------------------------------------------------------


async def test_concurrent_drains_in_one_process_never_share_items(
    make_handler: object, durable: BackgroundTaskHandler
) -> None:
    ids = await queue_results(durable, "run", 40)

    async def drain() -> list[str]:
        got = []
        async for task in durable.drain_pending():
            got.append(task.task_id)
            await asyncio.sleep(0)
        return got

    first, second = await asyncio.gather(drain(), drain())
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(ids)
    assert durable.pending_queue.empty


async def wrapped(handler: BackgroundTaskHandler) -> AsyncIterator[BackgroundTask]:
    """A consumer's own generators around a drain (two levels)."""

    async def inner() -> AsyncIterator[BackgroundTask]:
        async for task in handler.drain_pending():
            yield task

    async for task in inner():
        yield task


async def test_a_wrapped_drain_broken_off_redelivers_the_item_in_hand(
    handler: BackgroundTaskHandler,
) -> None:
    # More than one claim batch: the items after the broken drain's batch are free, so a
    # drain that did not wait for it to close would start there.
    ids = await queue_results(handler, "run", 150)
    consumer = wrapped(handler)
    async for task in consumer:
        if task.task_id == ids[2]:
            break
    del consumer  # dropped: the loop closes the three generators over several turns
    assert [task.task_id async for task in handler.drain_pending()] == ids[2:]


def test_a_drain_broken_off_on_one_thread_is_resumed_on_another(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    ids = asyncio.run(queue_results(handler, "run", 150))
    broke = threading.Event()
    drained: list[str] = []

    async def break_off() -> None:
        consumer = handler.drain_pending()
        async for task in consumer:
            if task.task_id == ids[2]:
                break
        del consumer
        broke.set()
        time.sleep(0.02)  # this loop is slow to close the drain
        await asyncio.sleep(0.2)

    async def drain_again() -> None:
        drained.extend([task.task_id async for task in handler.drain_pending()])

    first = threading.Thread(target=asyncio.run, args=(break_off(),))
    first.start()
    assert broke.wait(10)
    asyncio.run(drain_again())
    first.join()
    handler.close()
    assert drained == ids[2:]


async def test_a_drain_of_another_run_inside_a_drains_body_does_not_wait_for_it(
    handler: BackgroundTaskHandler,
) -> None:
    # The outer drain is open; it might be one being closed, but it holds only items of
    # its own run, so a drain of another run does not wait for it.
    handler._open_drains.POLL_SECONDS = 60
    ids = await queue_results(handler, "outer", 3)
    seen = []
    async with asyncio.timeout(10):
        async for task in handler.drain_pending("outer"):
            nested = [t.task_id async for t in handler.drain_pending("none")]
            seen.append((task.task_id, nested))
    assert seen == [(task_id, []) for task_id in ids]


def held_on_a_closed_loop(handler: BackgroundTaskHandler) -> AsyncIterator[BackgroundTask]:
    """A drain holding its first item, on an event loop closed since: nothing can close
    the drain any more (no ``shutdown_asyncgens``)."""
    loop = asyncio.new_event_loop()

    async def take_one() -> AsyncIterator[BackgroundTask]:
        drain = handler.drain_pending()
        await anext(drain)
        return drain

    try:
        return loop.run_until_complete(take_one())
    finally:
        loop.close()


def drained_ids(handler: BackgroundTaskHandler) -> list[str]:
    async def drain() -> list[str]:
        return [task.task_id async for task in handler.drain_pending()]

    return asyncio.run(drain())


def test_a_drain_dropped_after_its_loop_closed_leaves_its_items_drainable(
    handler: BackgroundTaskHandler,
) -> None:
    ids = asyncio.run(queue_results(handler, "run", 3))
    drain = held_on_a_closed_loop(handler)
    del drain
    gc.collect()
    assert drained_ids(handler) == ids
    handler.close()


async def test_wait_sees_the_items_of_a_drain_dropped_unclosed(
    handler: BackgroundTaskHandler,
) -> None:
    await queue_results(handler, "run", 3)
    ready = threading.Event()

    def hold_then_drop() -> None:
        drain = held_on_a_closed_loop(handler)  # every item is held from here
        ready.set()
        time.sleep(0.2)  # the waiter below parks meanwhile
        del drain
        gc.collect()

    thread = threading.Thread(target=hold_then_drop)
    thread.start()
    await asyncio.to_thread(ready.wait, 10)
    assert await handler.pending_queue.wait(timeout=10) is True
    thread.join()


def test_a_restore_dropped_after_its_loop_closed_leaves_its_items_drainable(
    handler: BackgroundTaskHandler,
) -> None:
    ids = asyncio.run(queue_results(handler, "run", 3))
    loop = asyncio.new_event_loop()

    async def enter() -> Any:
        restore = handler.restore_pending()
        assert len(await restore.__aenter__()) == 3
        return restore

    restore = loop.run_until_complete(enter())
    loop.close()  # the block never ends, and nothing can end it now
    del restore
    gc.collect()
    assert drained_ids(handler) == ids
    handler.close()


def test_a_drain_collected_while_the_store_is_locked_does_not_deadlock() -> None:
    # The collector may free a dropped drain anywhere, even inside the store's lock:
    # what its finalizer does must not wait for that lock.
    handler = BackgroundTaskHandler()
    ids = asyncio.run(queue_results(handler, "run", 3))

    def drop_inside_the_lock() -> None:
        drain = held_on_a_closed_loop(handler)
        with handler._store._lock:  # type: ignore[attr-defined]
            del drain
            gc.collect()

    thread = threading.Thread(target=drop_inside_the_lock, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the drain's finalizer waited for the store's lock"
    assert drained_ids(handler) == ids


async def test_a_drain_whose_wrapper_closes_it_late_still_redelivers_the_item_in_hand(
    handler: BackgroundTaskHandler,
) -> None:
    ids = await queue_results(handler, "run", 105)  # more than one claim batch

    async def logged() -> AsyncIterator[BackgroundTask]:
        async with contextlib.aclosing(handler.drain_pending()) as drain:
            try:
                async for task in drain:
                    yield task
            finally:
                await asyncio.sleep(0.005)  # say, a log flushed before the drain closes

    consumer = logged()
    async for task in consumer:
        assert task.task_id == ids[0]
        break
    del consumer
    assert [task.task_id async for task in handler.drain_pending()] == ids


async def test_a_drain_dropped_in_a_reference_cycle_closes_once_and_quietly(
    handler: BackgroundTaskHandler, caplog: pytest.LogCaptureFixture
) -> None:
    ids = await queue_results(handler, "run", 5)

    class Holder:
        drain: Any
        me: Any

    holder = Holder()
    holder.drain = drain = handler.drain_pending()
    holder.me = holder  # a cycle: only the garbage collector frees it
    assert (await anext(drain)).task_id == ids[0]
    del drain, holder
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()  # asyncio closes the dropped drain in a task of its own
        assert [task.task_id async for task in handler.drain_pending()] == ids
        await asyncio.sleep(0.01)
        gc.collect()  # a failed close is logged when its task is collected
    assert not caplog.records, [record.getMessage() for record in caplog.records]


class _FailingLoads(JsonCodec):
    """Fails to decode one result, as a user's codec might."""

    def loads(self, text: str) -> Any:
        if text == '"RUN-1"':
            raise ValueError("undecodable result")
        return super().loads(text)


async def test_an_item_that_fails_to_decode_stays_queued(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path, codec=_FailingLoads())
    ids = await queue_results(handler, "run", 3)
    drain = handler._store.iter_pending(None)
    assert (await anext(drain)).task_id == ids[0]
    with pytest.raises(ValueError, match="undecodable"):
        await anext(drain)
    with pytest.raises(StopAsyncIteration):  # ended: its items were freed
        await anext(drain)
    still = BackgroundTaskHandler(database=db_path)
    assert [task.task_id async for task in still.drain_pending()] == ids[1:]
    await still.aclose()
    await handler.aclose()


async def test_a_failed_release_does_not_hide_the_error_that_stopped_the_drain(
    db_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = BackgroundTaskHandler(database=db_path, codec=_FailingLoads())
    await queue_results(handler, "run", 3)
    store = handler._store

    async def release_fails(claimer: str) -> None:
        raise RuntimeError("release failed")

    monkeypatch.setattr(store, "_free_claims", release_fails)
    drain = store.iter_pending(None)
    await anext(drain)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="undecodable"):
        await anext(drain)
    assert "could not free the items" in caplog.text
    monkeypatch.undo()
    await handler.aclose()


async def test_a_drain_refuses_a_second_caller_while_it_runs(
    durable: BackgroundTaskHandler,
) -> None:
    """As an async generator does: two callers at once would hand out an item before the
    previous one is acknowledged, and a close mid-claim would leave that claim behind."""
    ids = await queue_results(durable, "run", 3)
    drain = durable._store.iter_pending(None)
    busy = durable._store._worker._connection_lock  # type: ignore[attr-defined]
    with busy:  # the first claim goes to the commit thread, which waits for this
        first = asyncio.ensure_future(anext(drain))
        await asyncio.sleep(0.05)
        assert not first.done()
        with pytest.raises(RuntimeError, match="already running"):
            await anext(drain)
        with pytest.raises(RuntimeError, match="already running"):
            await drain.aclose()
    assert (await first).task_id == ids[0]
    assert (await anext(drain)).task_id == ids[1]
    await drain.aclose()
    assert [task.task_id async for task in durable.drain_pending()] == ids[1:]


def test_two_processes_draining_never_share_items(db_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import HELPERS

    asyncio.run(_queue_in_new_handler(db_path, 1000))
    drainers = [
        subprocess.Popen(
            [sys.executable, str(HELPERS / "child.py"), "drain_all", str(db_path), "", "0.002"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [json.loads(d.communicate(timeout=120)[0]) for d in drainers]
    assert results[0] and results[1], "the drains did not overlap; the test proves nothing"
    assert not set(results[0]) & set(results[1])
    assert len(results[0]) + len(results[1]) == 1000


async def _queue_in_new_handler(db_path: Path, count: int) -> list[str]:
    async with BackgroundTaskHandler(database=db_path) as handler:
        return await queue_results(handler, "run", count)


def test_items_held_by_a_killed_drainer_are_drainable_at_once(db_path: Path) -> None:
    ids = asyncio.run(_queue_in_new_handler(db_path, 10))
    drainer = start_child("drain_hold", str(db_path), "2")
    read_until(drainer, f"holding {ids[2]}")
    # While it lives, its claimed items are not handed to anyone else.
    assert json.loads(run_helper("child.py", "drain_all", str(db_path))) == []
    kill(drainer)
    assert json.loads(run_helper("child.py", "drain_all", str(db_path))) == ids[2:]


def test_wait_sees_items_a_killed_drainer_held(db_path: Path) -> None:
    ids = asyncio.run(_queue_in_new_handler(db_path, 3))
    drainer = start_child("drain_hold", str(db_path), "0")
    read_until(drainer, f"holding {ids[0]}")  # it claimed all three and holds the first

    async def wait_then_drain() -> tuple[bool, bool, list[str]]:
        async with BackgroundTaskHandler(database=db_path) as handler:
            held = await handler.pending_queue.wait(timeout=0.3)
            kill(drainer)
            freed = await handler.pending_queue.wait(timeout=5)
            return held, freed, [t.task_id async for t in handler.drain_pending()]

    assert asyncio.run(wait_then_drain()) == (False, True, ids)


async def test_drain_one_run_only(durable: BackgroundTaskHandler) -> None:
    x_ids = await queue_results(durable, "X", 3)
    y_ids = await queue_results(durable, "Y", 2)
    assert [t.task_id async for t in durable.drain_pending(parent_task_id="X")] == x_ids
    assert durable.pending_queue.size == 2
    assert [t.task_id async for t in durable.drain_pending()] == y_ids


async def test_drain_one_run_only_in_memory() -> None:
    handler = BackgroundTaskHandler()
    x_ids = await queue_results(handler, "X", 3)
    y_ids = await queue_results(handler, "Y", 2)
    assert [t.task_id async for t in handler.drain_pending("Y")] == y_ids
    assert [t.task_id async for t in handler.drain_pending()] == x_ids


# -- all-or-nothing restore -------------------------------------------------------------


async def test_restore_pending_acknowledges_together(handler: BackgroundTaskHandler) -> None:
    merged: list[str] = []
    handler.on_merge(lambda task, mode: merged.append(f"{task.task_id}:{mode.value}"))
    x_ids = await queue_results(handler, "X", 3)
    await queue_results(handler, "Y", 1)
    async with handler.restore_pending("X") as results:
        assert [t.task_id for t in results] == x_ids
        assert [t.result for t in results] == [i.upper() for i in x_ids]
        assert merged == [f"{i}:wakeup" for i in x_ids]
        # Claimed: a concurrent drain does not see them.
        assert [t.task_id async for t in handler.drain_pending("X")] == []
    assert handler.pending_queue.size == 1


async def test_restore_pending_keeps_everything_when_the_merge_fails(
    handler: BackgroundTaskHandler,
) -> None:
    ids = await queue_results(handler, "X", 3)
    with pytest.raises(RuntimeError, match="merge failed"):
        async with handler.restore_pending("X") as results:
            assert len(results) == 3
            raise RuntimeError("merge failed")
    async with handler.restore_pending("X") as again:
        assert [t.task_id for t in again] == ids


def test_restore_pending_killed_mid_merge_keeps_everything(db_path: Path) -> None:
    ids = asyncio.run(_queue_in_new_handler(db_path, 4))
    holder = start_child("restore_hold", str(db_path), "run")
    read_until(holder, "holding 4")
    kill(holder)
    assert json.loads(run_helper("child.py", "drain_all", str(db_path), "run")) == ids


# -- cross-process wake-up ----------------------------------------------------------------


def test_wait_wakes_when_another_process_queues_a_result(db_path: Path) -> None:
    BackgroundTaskHandler(database=db_path).close()
    waiter = start_child("wait", str(db_path), "30")
    read_until(waiter, "waiting")
    run_helper("child.py", "queue_one", str(db_path), "from-elsewhere")
    out, _ = waiter.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["found"] is True
    assert report["elapsed"] < 10, report  # woken by the push, not by the 30 s timeout


def test_idle_waiter_does_not_burn_a_core(db_path: Path) -> None:
    BackgroundTaskHandler(database=db_path).close()
    out = run_helper("child.py", "wait", str(db_path), "2")
    report = json.loads(out.strip().splitlines()[-1])
    assert report["found"] is False
    assert 1.9 <= report["elapsed"] < 10
    # A busy loop would use ~2 s of CPU here; polling every 50 ms uses a few percent.
    assert report["cpu"] < 0.5, report


# -- hostile values -------------------------------------------------------------------------

HOSTILE = [
    "'; DROP TABLE background_tasks; --",
    "quote \" and ' both",
    "nul\x00inside",
    "unicode ☃ é 𝄞",
    "%_like_wildcards_%",
    "/slashes/and\\backslashes",
]


@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_ids_and_values_are_bound_parameters(db_path: Path, value: str) -> None:
    async with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit(value, value, payload={value: value})
        await handler.handle_result(value, [value], is_main_running=False)
        handler.submit(value + "-x", value)
        handler.handle_error(value + "-x", value)
    async with BackgroundTaskHandler(database=db_path) as handler:
        task = handler.get_task(value)
        assert task is not None and task.payload == {value: value} and task.result == [value]
        assert handler.get_task(value + "-x").error == value  # type: ignore[union-attr]
        assert [t.task_id async for t in handler.drain_pending(value)] == [value]
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("SELECT count(*) FROM background_tasks").fetchone() == (2,)
