"""A durable handler's state outlives it: reopen the file and everything is there."""

from __future__ import annotations

import asyncio
import gc
import json
import sqlite3
import stat
from pathlib import Path

import pytest

from orbiter._internal.background import BackgroundTaskError, BackgroundTaskHandler, MergeMode
from orbiter._internal.state import RunNodeStatus


async def test_reopened_handler_sees_everything(db_path: Path) -> None:
    async with BackgroundTaskHandler(database=db_path) as first:
        first.submit("hot", "run", payload={"n": 1})
        first.submit("late", "run", payload=[1, "two", None])
        first.submit("bad", "run")
        first.submit("busy", "other")
        await first.handle_result("hot", {"ok": True})
        await first.handle_result("late", "queued", is_main_running=False)
        first.handle_error("bad", "boom")

    async with BackgroundTaskHandler(database=str(db_path)) as second:
        late = second.get_task("late")
        assert late is not None
        assert late.payload == [1, "two", None]
        assert late.result == "queued"
        assert late.merge_mode is MergeMode.WAKEUP
        assert late.status is RunNodeStatus.SUCCESS
        bad = second.get_task("bad")
        assert bad is not None and bad.error == "boom" and bad.status is RunNodeStatus.FAILED
        assert [t.task_id for t in second.list_tasks()] == ["hot", "late", "bad", "busy"]
        assert [t.task_id for t in second.list_tasks(status=RunNodeStatus.RUNNING)] == ["busy"]
        assert second.pending_queue.size == 1 and not second.pending_queue.empty
        with pytest.raises(BackgroundTaskError, match="already exists"):
            second.submit("hot", "run")
        await second.handle_result("busy", 42, is_main_running=False)
        assert [(t.task_id, t.result) async for t in second.drain_pending()] == [
            ("late", "queued"),
            ("busy", 42),
        ]
        assert second.pending_queue.empty


async def test_url_forms_open_the_same_file(db_path: Path) -> None:
    async with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("a", "run")
    for url in (f"sqlite+aiosqlite:///{db_path}", f"sqlite:///{db_path}"):
        async with BackgroundTaskHandler(database=url) as handler:
            assert handler.get_task("a") is not None


async def test_object_identity_within_a_handler(durable: BackgroundTaskHandler) -> None:
    task = durable.submit("a", "run")
    assert durable.get_task("a") is task
    await durable.handle_result("a", {"x": 1}, is_main_running=False)
    assert task.status is RunNodeStatus.SUCCESS and task.result == {"x": 1}
    assert durable.list_tasks()[0] is task
    drained = [t async for t in durable.drain_pending()]
    assert drained[0] is task


async def test_unheld_tasks_are_not_kept_in_memory(durable: BackgroundTaskHandler) -> None:
    held = durable.submit("held", "run")
    for index in range(5000):
        durable.submit(f"t{index}", "run")
    gc.collect()
    store = durable._store
    assert store._tasks.get("t5") is None  # type: ignore[attr-defined]
    # Dead entries are swept as the map grows: it stays small, and the held one stays.
    assert len(store._tasks) <= 2048  # type: ignore[attr-defined]
    assert store._tasks.get("held") is held  # type: ignore[attr-defined]
    assert durable.get_task("t5") is not None
    assert durable.get_task("held") is held


async def test_stored_form_is_readable_with_sqlite3(
    durable: BackgroundTaskHandler, db_path: Path
) -> None:
    durable.submit("a", "run", payload={"url": "https://x", "n": 2})
    await durable.handle_result("a", {"k": "v"}, is_main_running=False)
    durable.submit("b", "run")
    durable.handle_error("b", "it's broken")
    with sqlite3.connect(db_path) as connection:
        rows = connection.execute(
            "SELECT task_id, parent_task_id, status, merge_mode, json_extract(result, '$.k'), "
            "json_extract(payload, '$.n'), error, datetime(created_at), "
            "julianday(updated_at) >= julianday(created_at) "
            "FROM background_tasks ORDER BY task_id"
        ).fetchall()
        pending = connection.execute("SELECT seq, task_id FROM pending_queue").fetchall()
    assert rows[0][:7] == ("a", "run", "success", "wakeup", "v", 2, None)
    assert rows[1][:7] == ("b", "run", "failed", None, None, None, "it's broken")
    assert all(row[7] is not None and row[8] == 1 for row in rows)
    assert pending == [(1, "a")]


async def test_json_values_round_trip(db_path: Path) -> None:
    values: list[object] = [
        None,
        True,
        0,
        -(2**63),
        2**70,
        1.5,
        "",
        "quote ' \" \\ and unicode é ☃ and NUL \x00 and ; DROP TABLE background_tasks; --",
        [],
        {},
        {"nested": {"list": [1, 2.25, None, {"deep": ["x"]}]}},
    ]
    async with BackgroundTaskHandler(database=db_path) as handler:
        for index, value in enumerate(values):
            handler.submit(f"t{index}", "run", payload=value)
            await handler.handle_result(f"t{index}", value, is_main_running=False)
    async with BackgroundTaskHandler(database=db_path) as handler:
        for index, value in enumerate(values):
            task = handler.get_task(f"t{index}")
            assert task is not None
            assert task.payload == value and task.result == value
        drained = [t.result async for t in handler.drain_pending()]
        assert drained == values


async def test_tuples_are_stored_as_lists(durable: BackgroundTaskHandler, db_path: Path) -> None:
    durable.submit("a", "run", payload=(1, 2))
    async with BackgroundTaskHandler(database=db_path) as other:
        assert other.get_task("a").payload == [1, 2]  # type: ignore[union-attr]


async def test_database_file_is_private(db_path: Path) -> None:
    async with BackgroundTaskHandler(database=db_path):
        pass
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


async def test_wal_and_synchronous_settings(db_path: Path) -> None:
    async with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("a", "run")
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_custom_codec(db_path: Path) -> None:
    class Point:
        def __init__(self, x: int, y: int) -> None:
            self.x, self.y = x, y

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

        __hash__ = None  # type: ignore[assignment]

    class PointCodec:
        def dumps(self, value: object) -> str:
            if isinstance(value, Point):
                return json.dumps({"__point__": [value.x, value.y]})
            return json.dumps(value)

        def loads(self, text: str) -> object:
            data = json.loads(text)
            if isinstance(data, dict) and "__point__" in data:
                return Point(*data["__point__"])
            return data

    async with BackgroundTaskHandler(database=db_path, codec=PointCodec()) as handler:
        handler.submit("a", "run", payload=Point(1, 2))
        await handler.handle_result("a", Point(3, 4), is_main_running=False)
    async with BackgroundTaskHandler(database=db_path, codec=PointCodec()) as handler:
        task = handler.get_task("a")
        assert task is not None and task.payload == Point(1, 2) and task.result == Point(3, 4)


async def test_use_after_close_raises(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    await handler.aclose()
    await handler.aclose()  # twice is fine
    with pytest.raises(BackgroundTaskError, match="closed"):
        handler.submit("a", "run")
    with pytest.raises(BackgroundTaskError, match="closed"):
        await handler.handle_result("a", 1)


async def test_close_finishes_in_flight_writes(db_path: Path) -> None:
    handler = BackgroundTaskHandler(database=db_path)
    for index in range(50):
        handler.submit(f"t{index}", "run")
    pending = [
        asyncio.ensure_future(handler.handle_result(f"t{i}", i, is_main_running=False))
        for i in range(50)
    ]
    await asyncio.sleep(0)
    await handler.aclose()
    await asyncio.gather(*pending)
    async with BackgroundTaskHandler(database=db_path) as reopened:
        assert reopened.pending_queue.size == 50


async def test_drain_consumer_raising_keeps_item_in_hand(durable: BackgroundTaskHandler) -> None:
    for index in range(5):
        durable.submit(f"t{index}", "run")
        await durable.handle_result(f"t{index}", index, is_main_running=False)
    with pytest.raises(RuntimeError):
        async for task in durable.drain_pending():
            if task.task_id == "t2":
                raise RuntimeError("merge failed")
    assert [t.task_id async for t in durable.drain_pending()] == ["t2", "t3", "t4"]


async def test_drain_streams_large_queue_in_batches(durable: BackgroundTaskHandler) -> None:
    count = 1_234
    for index in range(count):
        durable.submit(f"t{index:05}", "run")
    await asyncio.gather(
        *(durable.handle_result(f"t{i:05}", i, is_main_running=False) for i in range(count))
    )
    drained = [t.result async for t in durable.drain_pending()]
    assert drained == sorted(drained) and len(drained) == count


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_the_write_ahead_log_stays_small_under_continuous_writes(
    db_path: Path, synchronous: str
) -> None:
    # Back-to-back commits with no idle moment (a drain acknowledges every item): the log
    # must still be copied back and restarted, not grow with every commit.
    wal = db_path.with_name(db_path.name + "-wal")
    async with BackgroundTaskHandler(database=db_path, synchronous=synchronous) as handler:
        for index in range(3_000):
            handler.submit(f"t{index}", "run", payload={"padding": "x" * 200})
        await asyncio.gather(
            *(handler.handle_result(f"t{i}", i, is_main_running=False) for i in range(3_000))
        )
        largest = 0
        drained = 0
        async for _task in handler.drain_pending():
            drained += 1
            if drained % 250 == 0:
                largest = max(largest, wal.stat().st_size)
        assert drained == 3_000
    assert largest < 16 * 1024 * 1024  # ~10 MB of pages were written meanwhile
