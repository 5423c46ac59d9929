"""Concurrent completions run together (one ``executemany`` for their updates, one for
their queue entries), and each caller still gets its own answer: when one of them does
not apply, nothing of the group stays written and each runs alone."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orbiter._internal.background import BackgroundTaskHandler, MergeMode
from orbiter.errors import BackgroundTaskError, TaskAlreadyCompletedError, TaskNotFoundError
from orbiter.store import queries
from orbiter.store.executor import Db, compile_statement


def handler_connection(handler: BackgroundTaskHandler) -> sqlite3.Connection:
    return handler._store._worker._db.raw  # type: ignore[attr-defined,no-any-return]


def trace(handler: BackgroundTaskHandler) -> list[str]:
    """Every statement the handler's own connection runs from now on."""
    statements: list[str] = []
    handler_connection(handler).set_trace_callback(statements.append)
    return statements


def file_state(path: Path) -> tuple[dict[str, str], list[str]]:
    """Statuses and the pending queue in order, as another connection reads them."""
    with sqlite3.connect(path) as connection:
        statuses = dict(connection.execute("SELECT task_id, status FROM background_tasks"))
        queued = [row[0] for row in connection.execute("SELECT task_id FROM pending_queue")]
    return statuses, queued


async def test_concurrent_completions_commit_together_in_call_order(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    tasks = [handler.submit(f"t{index:02}", "run") for index in range(50)]
    statements = trace(handler)
    commits = handler._store._worker.commits  # type: ignore[attr-defined]

    modes = await asyncio.gather(
        *(
            handler.handle_result(task.task_id, {"i": i}, is_main_running=False)
            for i, task in enumerate(tasks)
        )
    )

    assert modes == [MergeMode.WAKEUP] * 50
    assert handler._store._worker.commits == commits + 1  # type: ignore[attr-defined]
    assert any(sql.startswith("SAVEPOINT") for sql in statements)
    assert not any(sql.startswith("ROLLBACK") for sql in statements)
    statuses, queued = file_state(db_path)
    assert set(statuses.values()) == {"success"}
    assert queued == [task.task_id for task in tasks]
    assert [task.result for task in tasks] == [{"i": i} for i in range(50)]
    drained = [task async for task in handler.drain_pending()]
    assert drained == tasks
    await handler.aclose()


async def test_one_that_does_not_apply_leaves_the_others_to_run_alone(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    for task_id in ("a", "b", "c"):
        handler.submit(task_id, "run")
    statements = trace(handler)

    outcomes = await asyncio.gather(
        handler.handle_result("a", 1, is_main_running=False),
        handler.handle_result("b", 2, is_main_running=False),
        handler.handle_result("a", 3, is_main_running=False),  # a second delivery
        handler.handle_result("missing", 4, is_main_running=False),
        handler.handle_result("c", 5, is_main_running=False),
        return_exceptions=True,
    )

    assert outcomes[0] is MergeMode.WAKEUP and outcomes[1] is MergeMode.WAKEUP
    assert isinstance(outcomes[2], TaskAlreadyCompletedError)
    assert isinstance(outcomes[3], TaskNotFoundError)
    assert outcomes[4] is MergeMode.WAKEUP
    assert any(sql.startswith("ROLLBACK TO") for sql in statements)  # tried together first
    assert file_state(db_path) == (
        {"a": "success", "b": "success", "c": "success"},
        ["a", "b", "c"],
    )
    assert handler.get_task("a").result == 1  # type: ignore[union-attr]
    await handler.aclose()


async def test_a_database_error_in_the_group_fails_only_its_own_call(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    for task_id in ("a", "bad", "c"):
        handler.submit(task_id, "run")
    handler_connection(handler).execute(
        "CREATE TEMP TRIGGER refuse BEFORE UPDATE OF status ON background_tasks "
        "WHEN NEW.task_id = 'bad' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    )

    outcomes = await asyncio.gather(
        *(
            handler.handle_result(task_id, 1, is_main_running=False)
            for task_id in ("a", "bad", "c")
        ),
        return_exceptions=True,
    )

    assert outcomes[0] is MergeMode.WAKEUP and outcomes[2] is MergeMode.WAKEUP
    assert isinstance(outcomes[1], BackgroundTaskError)
    assert "refused by the test" in str(outcomes[1])
    assert file_state(db_path) == ({"a": "success", "bad": "running", "c": "success"}, ["a", "c"])
    await handler.aclose()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    connection = sqlite3.connect(tmp_path / "plain.db", isolation_level=None)
    connection.execute("CREATE TABLE t (x INTEGER)")
    yield Db(connection)
    connection.close()


def rows(db: Db) -> list[int]:
    return [row[0] for row in db.raw.execute("SELECT x FROM t ORDER BY x")]


@pytest.mark.parametrize("keep", [True, False])
def test_all_or_nothing_keeps_or_undoes_what_it_wrote(db: Db, keep: bool) -> None:
    db.begin("BEGIN IMMEDIATE")
    db.raw.execute("INSERT INTO t VALUES (1)")

    def write() -> bool:
        db.raw.executemany("INSERT INTO t VALUES (?)", [(2,), (3,)])
        return keep

    assert db.all_or_nothing(write) is keep
    db.raw.execute("INSERT INTO t VALUES (4)")  # the transaction goes on either way
    db.raw.execute("COMMIT")
    assert rows(db) == ([1, 2, 3, 4] if keep else [1, 4])


def test_all_or_nothing_undoes_what_it_wrote_when_it_raises(db: Db) -> None:
    db.begin("BEGIN IMMEDIATE")
    db.raw.execute("INSERT INTO t VALUES (1)")

    def write() -> bool:
        db.raw.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        db.all_or_nothing(write)
    db.raw.execute("COMMIT")
    assert rows(db) == [1]


async def test_a_blocked_thread_waits_for_no_more_async_completions_than_before(
    db_path: Path,
) -> None:
    """A sync call blocked behind a batch joins it once 8 async operations ran
    (``MAKE_WAY_AFTER``); completions run together never carry it past that point."""
    handler = BackgroundTaskHandler(database=db_path)
    ids = ["slow"] + [f"t{index:02}" for index in range(30)]
    for task_id in [*ids, "victim"]:
        handler.submit(task_id, "run")
    started = slow_update_of(handler, "slow", 0.3)
    raw = handler_connection(handler)
    raw.execute("CREATE TEMP TABLE finished (task_id TEXT)")
    raw.execute(
        "CREATE TEMP TRIGGER log_finished AFTER UPDATE OF status ON background_tasks "
        "BEGIN INSERT INTO finished VALUES (NEW.task_id); END"
    )
    # Alone first ("slow", held in its update, then six of alternating kinds), then runs
    # of the same kind that could go together.
    hot = [True] + [index % 2 == 1 for index in range(6)] + [False] * 24

    def blocked_sync_call() -> None:
        started.wait(10)
        time.sleep(0.05)  # arrives while "slow" runs: it has to wait for the batch
        handler.handle_error("victim", "failed")

    thread = asyncio.get_running_loop().run_in_executor(None, blocked_sync_call)
    await asyncio.gather(
        *(handler.handle_result(t, 1, is_main_running=h) for t, h in zip(ids, hot, strict=True))
    )
    await thread
    order = [row[0] for row in raw.execute("SELECT task_id FROM finished ORDER BY rowid")]
    assert order.index("victim") == 8  # "slow" and the 7 after it, then the thread's write
    await handler.aclose()


async def test_a_queued_completion_behind_a_running_group_can_still_be_withdrawn(
    db_path: Path,
) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    ids = [f"t{index:02}" for index in range(12)]
    tasks = [handler.submit(task_id, "run") for task_id in ids]
    started = slow_update_of(handler, "t00", 0.2)
    calls = [
        asyncio.ensure_future(handler.handle_result(task_id, 1, is_main_running=False))
        for task_id in ids
    ]
    assert await asyncio.to_thread(started.wait, 10), "the worker never started the write"
    calls[1].cancel()  # runs together with t00: started with it
    calls[11].cancel()  # in the next group: not started yet
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert isinstance(outcomes[11], asyncio.CancelledError)
    statuses, queued = file_state(db_path)
    assert statuses["t01"] == "success" and tasks[1].status.value == "success"
    assert statuses["t11"] == "running" and tasks[11].status.value == "running"
    assert queued == ids[:11]
    await handler.aclose()


def slow_update_of(handler: BackgroundTaskHandler, task_id: str, seconds: float) -> threading.Event:
    """The handler's own connection pauses ``seconds`` in the status update of
    ``task_id``; the event is set when it starts pausing."""
    started = threading.Event()

    def slow() -> int:
        started.set()
        time.sleep(seconds)
        return 0

    raw = handler_connection(handler)
    raw.create_function("orbiter_test_slow", 0, slow)
    raw.execute(
        "CREATE TEMP TRIGGER slow_update AFTER UPDATE OF status ON background_tasks "
        f"WHEN NEW.task_id = '{task_id}' BEGIN SELECT orbiter_test_slow(); END"
    )
    return started


@pytest.mark.parametrize("returning", [False, True])
def test_finishing_binds_only_the_callers_values(returning: bool) -> None:
    # The statuses are written into the SQL: a bound constant costs a merge of the
    # parameters and a bind on every one of thousands of calls a second.
    for statement, status in (
        (queries.complete_task(returning), "success"),
        (queries.fail_task(returning), "failed"),
    ):
        compiled = compile_statement(statement)
        assert compiled.defaults == {}
        assert f"status='{status}'" in compiled.sql
        assert "status IN ('init', 'running')" in compiled.sql


async def test_a_task_finishes_once_with_its_status_as_written(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    handler.submit("ok", "run")
    handler.submit("bad", "run")
    await handler.handle_result("ok", 1, is_main_running=False)
    handler.handle_error("bad", "boom")
    with pytest.raises(TaskAlreadyCompletedError):
        await handler.handle_result("ok", 2, is_main_running=False)
    with pytest.raises(TaskAlreadyCompletedError):
        handler.handle_error("ok", "late")
    with pytest.raises(TaskAlreadyCompletedError):
        await handler.handle_result("bad", 3, is_main_running=False)
    await handler.aclose()
    statuses, queued = file_state(db_path)
    assert statuses == {"ok": "success", "bad": "failed"}
    assert queued == ["ok"]
