"""Completions that share a batch run as a few set-based statements (``complete_many``).

Each test gathers many ``handle_result`` calls so they land in one batch, checks that they
really ran combined (the worker counts them), and that every outcome, stored row and queue
position is what running them one by one, in call order, gives.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from orbiter._internal.background import BackgroundTaskHandler, MergeMode
from orbiter._internal.state import RunNodeStatus
from orbiter.errors import BackgroundTaskError
from orbiter.store import queries
from orbiter.store.executor import Db


def combined(handler: BackgroundTaskHandler) -> int:
    return int(handler._store._worker.combined)  # type: ignore[attr-defined]


def stored(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows read by a separate plain ``sqlite3`` connection (what is in the file)."""
    with sqlite3.connect(path) as connection:
        return connection.execute(sql, params).fetchall()


def queue_order(path: Path) -> list[str]:
    return [row[0] for row in stored(path, "SELECT task_id FROM pending_queue ORDER BY seq")]


async def gather_results(
    handler: BackgroundTaskHandler, calls: list[tuple[str, Any, bool]]
) -> list[Any]:
    """Start ``(task_id, result, is_main_running)`` calls in this order, in one loop turn."""
    return await asyncio.gather(
        *(handler.handle_result(t, r, is_main_running=hot) for t, r, hot in calls),
        return_exceptions=True,
    )


@pytest.mark.parametrize("count", [2, 3, 100, 128, 129, 300])
async def test_a_run_of_wakeup_results_is_stored_and_queued_in_call_order(
    durable: BackgroundTaskHandler, db_path: Path, count: int
) -> None:
    ids = [f"t{index:04d}" for index in range(count)]
    for task_id in ids:
        durable.submit(task_id, "run")
    before = combined(durable)
    order = list(reversed(ids))  # not the submission order
    modes = await gather_results(durable, [(t, {"n": t}, False) for t in order])
    assert modes == [MergeMode.WAKEUP] * count
    assert combined(durable) - before >= count - 1  # one lone call may commit inline
    assert queue_order(db_path) == order
    rows = stored(db_path, "SELECT task_id, status, merge_mode, result FROM background_tasks")
    assert sorted(rows) == [(t, "success", "wakeup", f'{{"n":"{t}"}}') for t in ids]
    assert all(durable.get_task(t).result == {"n": t} for t in ids)  # type: ignore[union-attr]


async def test_unknown_and_finished_tasks_fail_alone_inside_a_run(
    durable: BackgroundTaskHandler, db_path: Path
) -> None:
    for index in range(6):
        durable.submit(f"t{index}", "run")
    await durable.handle_result("t2", "first", is_main_running=False)
    durable.handle_error("t4", "broke")
    before = combined(durable)
    calls = [(f"t{index}", f"r{index}", False) for index in range(6)] + [("nope", 1, False)]
    outcomes = await gather_results(durable, calls)
    assert combined(durable) - before >= 6
    assert [type(o).__name__ for o in outcomes] == [
        "MergeMode",
        "MergeMode",
        "TaskAlreadyCompletedError",
        "MergeMode",
        "TaskAlreadyCompletedError",
        "MergeMode",
        "TaskNotFoundError",
    ]
    assert "already completed" in str(outcomes[2])
    assert queue_order(db_path) == ["t2", "t0", "t1", "t3", "t5"]
    assert durable.get_task("t2").result == "first"  # type: ignore[union-attr]
    assert durable.get_task("t4").status is RunNodeStatus.FAILED  # type: ignore[union-attr]
    assert stored(db_path, "SELECT count(*) FROM background_tasks WHERE task_id = 'nope'") == [(0,)]


async def test_a_task_completed_twice_in_one_batch_keeps_the_first_result(
    durable: BackgroundTaskHandler, db_path: Path
) -> None:
    for index in range(5):
        durable.submit(f"t{index}", "run")
    calls = [("t0", "a", False), ("t1", "b", False), ("t0", "again", False), ("t2", "c", False)]
    outcomes = await gather_results(durable, calls)
    assert outcomes[0] is MergeMode.WAKEUP and outcomes[1] is MergeMode.WAKEUP
    assert isinstance(outcomes[2], BackgroundTaskError) and "already completed" in str(outcomes[2])
    assert outcomes[3] is MergeMode.WAKEUP
    assert stored(db_path, "SELECT result FROM background_tasks WHERE task_id = 't0'") == [('"a"',)]
    assert queue_order(db_path) == ["t0", "t1", "t2"]


async def test_hot_and_wakeup_runs_alternate_without_mixing(
    durable: BackgroundTaskHandler, db_path: Path
) -> None:
    merged: list[tuple[str, MergeMode]] = []

    async def on_merge(task: Any, mode: MergeMode) -> None:
        merged.append((task.task_id, mode))

    durable.on_merge(on_merge)
    hot = [f"h{index}" for index in range(10)]
    cold = [f"w{index}" for index in range(10)]
    # Held task objects: a hot merge then needs no row back, so the hot calls combine too.
    held = [durable.submit(task_id, "run") for task_id in hot + cold]
    calls = (
        [(t, t, True) for t in hot[:5]]
        + [(t, t, False) for t in cold[:5]]
        + [(t, t, True) for t in hot[5:]]
        + [(t, t, False) for t in cold[5:]]
    )
    before = combined(durable)
    outcomes = await gather_results(durable, calls)
    assert combined(durable) - before == 20
    assert outcomes == [MergeMode.HOT if hot_ else MergeMode.WAKEUP for _, _, hot_ in calls]
    assert queue_order(db_path) == cold
    assert sorted(merged) == sorted((t, MergeMode.HOT) for t in hot)
    assert all(task.status is RunNodeStatus.SUCCESS for task in held)
    assert [task.result for task in held] == hot + cold
    modes = dict(stored(db_path, "SELECT task_id, merge_mode FROM background_tasks"))
    assert all(modes[t] == "hot" for t in hot) and all(modes[t] == "wakeup" for t in cold)


async def test_a_run_that_fails_in_sqlite_is_retried_one_by_one(db_path: Path) -> None:
    BackgroundTaskHandler(database=db_path).close()
    with sqlite3.connect(db_path) as connection:  # a real constraint, raised by SQLite
        connection.execute(
            "CREATE TRIGGER refuse_boom BEFORE UPDATE ON background_tasks "
            """WHEN NEW.result = '"boom"' BEGIN SELECT RAISE(ABORT, 'boom refused'); END"""
        )
    async with BackgroundTaskHandler(database=db_path) as handler:
        for index in range(8):
            handler.submit(f"t{index}", "run")
        calls = [(f"t{index}", "boom" if index == 3 else index, False) for index in range(8)]
        outcomes = await gather_results(handler, calls)
        assert isinstance(outcomes[3], BackgroundTaskError)
        assert "boom refused" in str(outcomes[3])
        assert [o for i, o in enumerate(outcomes) if i != 3] == [MergeMode.WAKEUP] * 7
        assert handler.get_task("t3").status is RunNodeStatus.RUNNING  # type: ignore[union-attr]
    assert queue_order(db_path) == [f"t{index}" for index in range(8) if index != 3]


def test_complete_many_is_built_only_for_its_sizes() -> None:
    assert tuple(sorted(queries.COMPLETE_MANY_SIZES)) == queries.COMPLETE_MANY_SIZES
    with pytest.raises(ValueError, match="sizes"):
        queries.complete_many(3)


def test_the_executor_binds_named_values_in_the_order_of_the_question_marks() -> None:
    db = Db(sqlite3.connect(":memory:"))
    db.raw.execute("CREATE TABLE background_tasks (task_id TEXT, status TEXT)")
    db.raw.execute("INSERT INTO background_tasks VALUES ('a', 'running'), ('b', 'success')")
    # ``status IN ('init', 'running')`` is bound from the statement's own constants.
    assert db.scalar(queries.task_status(), {"id": "b"}) == "success"
    db.raw.execute(
        "CREATE TABLE pending_queue (seq INTEGER PRIMARY KEY, task_id TEXT UNIQUE, "
        "enqueued_at TEXT)"
    )
    db.execute(queries.enqueue(), {"now": "T1", "task_id": "a"})  # not in the SQL's order
    assert db.execute_many(queries.enqueue(), [{"now": "T2", "task_id": "b"}]) == 1
    assert db.all(queries.max_pending_seq()) == [(2,)]
    rows = db.raw.execute("SELECT task_id, enqueued_at FROM pending_queue ORDER BY seq")
    assert rows.fetchall() == [("a", "T1"), ("b", "T2")]
    statement = queries.complete_many(2)
    named = {"id_0": "a", "result_0": "1", "id_1": None, "result_1": None, "merge_mode": "hot"}
    with pytest.raises(sqlite3.ProgrammingError, match=":now"):
        db.all(statement, named)
