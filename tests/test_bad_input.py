"""Bad arguments get a clear error, and nothing is written or half-written."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import pickle
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from orbiter._internal.background import BackgroundTask, BackgroundTaskError, BackgroundTaskHandler
from orbiter._internal.state import RunNodeStatus, RunState
from orbiter.errors import (
    DuplicateTaskError,
    InvalidValueError,
    StoredValueError,
    TaskAlreadyCompletedError,
    TaskNotFoundError,
)


def table_counts(db_path: Path) -> tuple[int, int]:
    with sqlite3.connect(db_path) as connection:
        tasks = connection.execute("SELECT count(*) FROM background_tasks").fetchone()[0]
        pending = connection.execute("SELECT count(*) FROM pending_queue").fetchone()[0]
    return tasks, pending


@pytest.mark.parametrize("bad_id", ["", 7, None, b"bytes", ["x"], "lone \udcff surrogate"])
async def test_bad_task_ids(handler: BackgroundTaskHandler, bad_id: Any) -> None:
    with pytest.raises(BackgroundTaskError, match="task_id"):
        handler.submit(bad_id, "run")
    with pytest.raises(BackgroundTaskError, match="parent_task_id"):
        handler.submit("ok", bad_id)
    with pytest.raises(BackgroundTaskError, match="task_id"):
        await handler.handle_result(bad_id, 1)
    with pytest.raises(BackgroundTaskError, match="task_id"):
        handler.handle_error(bad_id, "x")
    with pytest.raises(BackgroundTaskError, match="task_id"):
        handler.get_task(bad_id)
    for task in (BackgroundTask(bad_id, "run"), BackgroundTask("ok", bad_id)):
        task.complete(1)
        with pytest.raises(BackgroundTaskError, match="task_id"):
            handler.pending_queue.push(task)
    assert handler.list_tasks() == []
    assert handler.pending_queue.size == 0


def test_invalid_value_error_is_also_type_and_value_error() -> None:
    assert issubclass(InvalidValueError, TypeError)
    assert issubclass(InvalidValueError, ValueError)
    assert issubclass(InvalidValueError, BackgroundTaskError)


@pytest.mark.parametrize("bad_status", ["running", 1, "nope"])
def test_status_filter_must_be_run_node_status(
    handler: BackgroundTaskHandler, bad_status: Any
) -> None:
    with pytest.raises(BackgroundTaskError, match="RunNodeStatus"):
        handler.list_tasks(status=bad_status)
    assert handler.list_tasks(status=RunNodeStatus.RUNNING) == []


@pytest.mark.parametrize(
    "timeout",
    [-1, -0.001, math.nan, -math.inf, pytest.param(-(10**400), id="-10**400"), "1", True],
)
async def test_bad_wait_timeout(handler: BackgroundTaskHandler, timeout: Any) -> None:
    with pytest.raises(BackgroundTaskError, match="timeout"):
        await handler.pending_queue.wait(timeout)


def test_error_message_must_be_str(handler: BackgroundTaskHandler) -> None:
    handler.submit("a", "run")
    with pytest.raises(BackgroundTaskError, match="error must be a str"):
        handler.handle_error("a", 42)  # type: ignore[arg-type]
    assert handler.get_task("a").status is RunNodeStatus.RUNNING  # type: ignore[union-attr]


def test_on_merge_needs_a_callable(handler: BackgroundTaskHandler) -> None:
    with pytest.raises(BackgroundTaskError, match="callable"):
        handler.on_merge("not a function")


def test_push_needs_a_task(handler: BackgroundTaskHandler) -> None:
    with pytest.raises(BackgroundTaskError, match="BackgroundTask"):
        handler.pending_queue.push("task")  # type: ignore[arg-type]


async def test_push_takes_a_hand_built_task_holding_plain_strings(
    handler: BackgroundTaskHandler, backend: str
) -> None:
    # "success" == RunNodeStatus.SUCCESS and "wakeup" == MergeMode.WAKEUP (StrEnums).
    task = BackgroundTask("t", "run")
    task.complete({"v": 1})
    task.status, task.merge_mode = "success", "wakeup"  # type: ignore[assignment]
    handler.pending_queue.push(task)
    assert handler.pending_queue.size == 1
    if backend == "sqlite":  # the in-memory queue, like the reference, holds anything
        odd = BackgroundTask("u", "run")
        odd.complete(2)
        odd.merge_mode = "lukewarm"  # type: ignore[assignment]
        with pytest.raises(BackgroundTaskError, match="lukewarm"):
            handler.pending_queue.push(odd)
        assert handler.pending_queue.size == 1
    drained = [item async for item in handler.drain_pending()]
    assert [(item.task_id, item.result) for item in drained] == [("t", {"v": 1})]


UNSTORABLE = [
    object(),
    {1, 2},
    math.nan,
    math.inf,
    {"k": object()},
    {1: "int key"},
    [1, [2, {"deep": {3}}]],
    b"bytes",
]


@pytest.mark.parametrize("value", UNSTORABLE, ids=lambda v: type(v).__name__)
async def test_unstorable_payload_writes_nothing(db_path: Path, value: Any) -> None:
    async with BackgroundTaskHandler(database=db_path) as handler:
        with pytest.raises(BackgroundTaskError, match="cannot store payload"):
            handler.submit("a", "run", payload=value)
        assert handler.get_task("a") is None
    assert table_counts(db_path) == (0, 0)


@pytest.mark.parametrize("value", UNSTORABLE, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("hot", [True, False])
async def test_unstorable_result_writes_nothing(db_path: Path, value: Any, hot: bool) -> None:
    calls: list[str] = []
    async with BackgroundTaskHandler(database=db_path) as handler:
        handler.on_merge(lambda task, mode: calls.append(task.task_id))
        task = handler.submit("a", "run")
        with pytest.raises(BackgroundTaskError, match="cannot store result"):
            await handler.handle_result("a", value, is_main_running=hot)
        assert task.status is RunNodeStatus.RUNNING and task.result is None
        assert calls == []
        # The task can still complete properly afterwards.
        await handler.handle_result("a", "fine", is_main_running=False)
    async with BackgroundTaskHandler(database=db_path) as handler:
        assert [t.result async for t in handler.drain_pending()] == ["fine"]


async def test_value_size_limit(db_path: Path) -> None:
    async with BackgroundTaskHandler(database=db_path, max_value_bytes=1_000) as handler:
        handler.submit("small", "run", payload="x" * 900)
        with pytest.raises(BackgroundTaskError, match="max_value_bytes"):
            handler.submit("big", "run", payload="x" * 1_001)
        with pytest.raises(BackgroundTaskError, match="max_value_bytes"):
            await handler.handle_result("small", "é" * 600)  # 1,200 bytes of UTF-8
        assert handler.get_task("small").status is RunNodeStatus.RUNNING  # type: ignore[union-attr]
    assert table_counts(db_path) == (1, 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"synchronous": "OFF"}, "synchronous"),
        ({"max_value_bytes": 0}, "max_value_bytes"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"busy_timeout": -1}, "busy_timeout"),
        # SQLite holds it in milliseconds in a 32-bit int: beyond, it would not wait at all.
        ({"busy_timeout": 3e6}, "busy_timeout"),
        ({"busy_timeout": math.inf}, "busy_timeout"),
        ({"busy_timeout": math.nan}, "busy_timeout"),
        ({"busy_timeout": "5"}, "busy_timeout"),
        ({"busy_timeout": True}, "busy_timeout"),
        ({"max_value_bytes": True}, "max_value_bytes"),
        ({"lease_timeout": 1e300}, "lease_timeout"),
        ({"heartbeat_interval": 1e20, "lease_timeout": 1e21}, "heartbeat_interval"),
        ({"poll_interval": math.inf}, "poll_interval"),
        ({"codec": object()}, "codec must have dumps"),
        ({"state": "not a state"}, "RunState"),
    ],
)
def test_bad_constructor_options(db_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(BackgroundTaskError, match=match):
        BackgroundTaskHandler(database=db_path, **kwargs)
    assert not db_path.exists()  # refused before anything was made


@pytest.mark.parametrize(
    "database",
    [
        "sqlite:///{dir}/q.db?timeout=abc",
        "sqlite:///{dir}/q.db?check_same_thread=maybe",
        "sqlite+aiosqlite:///{dir}/q.db?mode=ro",
        "sqlite:///{dir}/q.db?immutable=1",
        "sqlite:///{dir}/q.db?cached_statements=-1",
    ],
)
def test_url_query_parameters_are_refused_before_a_file_is_made(
    database: str, tmp_path: Path
) -> None:
    with pytest.raises(BackgroundTaskError, match=r"query parameter|bad value"):
        BackgroundTaskHandler(database=database.format(dir=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_the_drivers_own_url_parameters_still_work(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q.db?timeout=10&check_same_thread=false&cached_statements=10"
    with BackgroundTaskHandler(database=url) as handler:
        handler.submit("t", "run", payload=1)
    with BackgroundTaskHandler(database=url) as handler:
        assert handler.get_task("t") is not None


def test_a_path_with_a_nul_character_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackgroundTaskError, match="NUL"):
        BackgroundTaskHandler(database=f"{tmp_path}/a\0b.db")


async def test_a_wait_longer_than_a_float_can_hold_waits_as_long_as_none(
    handler: BackgroundTaskHandler,
) -> None:
    with pytest.raises(TimeoutError):  # it does wait
        await asyncio.wait_for(handler.pending_queue.wait(10**400), 0.2)
    handler.submit("t", "run")
    await handler.handle_result("t", 1, is_main_running=False)
    assert await handler.pending_queue.wait(10**400) is True


@pytest.mark.parametrize(
    "database", ["", "   ", 42, "postgresql://u@h/db", "sqlite://", "sqlite:///:memory:"]
)
def test_bad_database_arguments(database: Any) -> None:
    with pytest.raises(BackgroundTaskError):
        BackgroundTaskHandler(database=database)


@pytest.mark.parametrize("database", [":memory:", Path(":memory:")], ids=["str", "Path"])
def test_memory_as_a_path_is_refused_not_made_a_file(
    database: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BackgroundTaskError, match="in-memory SQLite database is not durable"):
        BackgroundTaskHandler(database=database)
    assert list(tmp_path.iterdir()) == []


async def test_strings_with_lone_surrogates_round_trip_in_values(db_path: Path) -> None:
    # A str holding a lone surrogate (what os.fsdecode makes of a non-UTF-8 file name)
    # is a JSON value: it is stored as a \udcff escape and comes back equal.
    payload = {"file": "report-\udcff.txt", "ok": "naïve ✓"}
    result = ["\ud800", {"k": "\udfff"}]
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("t", "run", payload=payload)
        await handler.handle_result("t", result, is_main_running=False)
    with BackgroundTaskHandler(database=db_path) as reopened:
        task = reopened.get_task("t")
        assert task is not None
        assert (task.payload, task.result) == (payload, result)
        assert [t.result async for t in reopened.drain_pending()] == [result]
    with sqlite3.connect(db_path) as connection:  # still JSON that SQLite reads
        row = connection.execute(
            "SELECT json_extract(payload, '$.ok'), json_valid(result) FROM background_tasks"
        ).fetchone()
    assert row == ("naïve ✓", 1)


def test_an_error_text_with_a_lone_surrogate_is_recorded_escaped(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("t", "run")
        handler.handle_error("t", "cannot open report-\udcff.txt")
        task = handler.get_task("t")
        assert task is not None and task.status is RunNodeStatus.FAILED
        assert task.error == "cannot open report-\\udcff.txt"
    with sqlite3.connect(db_path) as connection:
        stored = connection.execute("SELECT error FROM background_tasks").fetchone()
    assert stored == ("cannot open report-\\udcff.txt",)


def test_a_codec_returning_text_utf8_cannot_hold_is_refused_before_writing(
    db_path: Path,
) -> None:
    class SloppyCodec:
        def dumps(self, value: object) -> str:
            return '"\udcff"'

        def loads(self, text: str) -> object:
            return json.loads(text)

    with (
        BackgroundTaskHandler(database=db_path, codec=SloppyCodec()) as handler,
        pytest.raises(InvalidValueError, match="cannot store payload"),
    ):
        handler.submit("t", "run", payload="x")
    assert table_counts(db_path) == (0, 0)


@pytest.mark.parametrize(
    "error",
    [
        DuplicateTaskError("a"),
        TaskNotFoundError("a"),
        TaskAlreadyCompletedError("a", "success"),
        InvalidValueError("bad"),
        StoredValueError("unreadable"),
    ],
)
def test_errors_survive_pickling_and_copying(error: BackgroundTaskError) -> None:
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(clone) is type(error)
        assert str(clone) == str(error)
        assert vars(clone) == vars(error)


def test_a_runaway_error_text_is_stored_truncated(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path, max_value_bytes=1000) as handler:
        handler.submit("t", "run")
        handler.handle_error("t", "é" * 5_000_000)  # 10 MB of UTF-8
        task = handler.get_task("t")
        assert task is not None and task.status is RunNodeStatus.FAILED
        assert task.error is not None and task.error.startswith("é" * 400)
        assert task.error.endswith("[truncated: 10000000 bytes > max_value_bytes]")
    with sqlite3.connect(db_path) as connection:
        (stored,) = connection.execute(
            "SELECT length(CAST(error AS BLOB)) FROM background_tasks"
        ).fetchone()
    assert stored <= 1000


def test_a_tiny_limit_still_bounds_a_runaway_error_text(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path, max_value_bytes=16) as handler:
        handler.submit("t", "run")
        handler.handle_error("t", "x" * 17)
    with sqlite3.connect(db_path) as connection:
        (stored,) = connection.execute("SELECT error FROM background_tasks").fetchone()
    assert stored == "x" * 16


def test_a_pushed_task_gets_the_same_checks_as_submit_and_handle_error(db_path: Path) -> None:
    state = RunState("agent")
    with BackgroundTaskHandler(state, database=db_path, max_value_bytes=1000) as handler:
        odd = BackgroundTask("lone \udcff", "run")
        odd.complete(1)
        with pytest.raises(InvalidValueError, match="task_id"):
            handler.pending_queue.push(odd)
        assert table_counts(db_path) == (0, 0)
        failed = BackgroundTask("f", "run")
        failed.fail("e" * 5000 + " report-\udcff.txt")
        handler.pending_queue.push(failed)
        assert handler.get_task("f") is failed  # the caller's object, as pushed
        handler.submit("g", "run")
        handler.handle_error("g", "g" * 5000)
        assert state.nodes[-1].error == handler.get_task("g").error  # type: ignore[union-attr]
    with sqlite3.connect(db_path) as connection:
        rows = connection.execute("SELECT length(error) FROM background_tasks").fetchall()
    assert all(length <= 1000 for (length,) in rows), rows


async def test_a_pushed_task_of_another_run_than_the_stored_one_is_refused(
    db_path: Path,
) -> None:
    async with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("r", "run")
        impostor = BackgroundTask("r", "other-run")
        impostor.complete({"x": 1})
        with pytest.raises(InvalidValueError, match="belongs to run 'run'"):
            handler.pending_queue.push(impostor)
        assert table_counts(db_path) == (1, 0)
        assert handler.get_task("r").status is RunNodeStatus.RUNNING  # type: ignore[union-attr]
        assert [task async for task in handler.drain_pending(parent_task_id="other-run")] == []
