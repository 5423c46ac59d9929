"""A stored value the codec cannot decode (written by another codec, edited by hand):
every read names the task in a ``StoredValueError``, and nothing that could not be read
is removed or half-applied."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from orbiter._internal.background import BackgroundTaskHandler, MergeMode
from orbiter._internal.state import RunNodeStatus
from orbiter.errors import BackgroundTaskError, InvalidValueError, StoredValueError
from orbiter.store.codec import JsonCodec


async def queue_results(db_path: Path, count: int) -> list[str]:
    ids = [f"q{index}" for index in range(count)]
    async with BackgroundTaskHandler(database=db_path) as handler:
        for task_id in ids:
            handler.submit(task_id, "run", payload={"n": task_id})
            await handler.handle_result(task_id, {"r": task_id}, is_main_running=False)
    return ids


def set_column(db_path: Path, task_id: str, column: str, text: str) -> None:
    with sqlite3.connect(db_path) as db:
        db.execute(f"UPDATE background_tasks SET {column} = ? WHERE task_id = ?", (text, task_id))
    db.close()


def claimed_count(db_path: Path) -> int:
    db = sqlite3.connect(db_path)
    try:
        (count,) = db.execute(
            "SELECT count(*) FROM pending_queue WHERE claimed_by IS NOT NULL"
        ).fetchone()
    finally:
        db.close()
    return int(count)


def task_status(db_path: Path, task_id: str) -> str:
    db = sqlite3.connect(db_path)
    try:
        (status,) = db.execute(
            "SELECT status FROM background_tasks WHERE task_id = ?", (task_id,)
        ).fetchone()
    finally:
        db.close()
    return str(status)


def pending_ids(db_path: Path) -> list[str]:
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute("SELECT task_id FROM pending_queue ORDER BY seq").fetchall()
    finally:
        db.close()
    return [task_id for (task_id,) in rows]


def test_the_error_is_a_background_task_error_and_a_value_error() -> None:
    assert issubclass(StoredValueError, BackgroundTaskError)
    assert issubclass(StoredValueError, ValueError)


async def test_pop_all_removes_nothing_when_one_result_cannot_be_read(db_path: Path) -> None:
    ids = await queue_results(db_path, 5)
    set_column(db_path, "q2", "result", "{bad")
    with BackgroundTaskHandler(database=db_path) as handler:
        with pytest.raises(StoredValueError, match=r"stored result of task 'q2'"):
            handler.pending_queue.pop_all()
        assert handler.pending_queue.size == 5
        assert claimed_count(db_path) == 0  # the claim rolled back too, not left held
    # Nothing is left claimed either: fixed by hand, every item comes out, in order.
    assert pending_ids(db_path) == ids
    set_column(db_path, "q2", "result", '{"r": "q2"}')
    with BackgroundTaskHandler(database=db_path) as handler:
        popped = handler.pending_queue.pop_all()
        assert [task.task_id for task in popped] == ids
        assert popped[2].result == {"r": "q2"}
        assert handler.pending_queue.empty


async def test_pop_all_refuses_an_unreadable_payload_the_same_way(db_path: Path) -> None:
    ids = await queue_results(db_path, 3)
    set_column(db_path, "q0", "payload", "not json")
    with (
        BackgroundTaskHandler(database=db_path) as handler,
        pytest.raises(StoredValueError, match=r"stored payload of task 'q0'"),
    ):
        handler.pending_queue.pop_all()
    assert pending_ids(db_path) == ids


async def test_a_drain_stops_at_the_unreadable_item_and_keeps_it(db_path: Path) -> None:
    ids = await queue_results(db_path, 5)
    set_column(db_path, "q3", "result", "[1,")
    async with BackgroundTaskHandler(database=db_path) as handler:
        seen: list[str] = []
        with pytest.raises(StoredValueError, match=r"task 'q3'"):
            async for task in handler.drain_pending():
                seen.append(task.task_id)
        assert seen == ids[:3]
        assert handler.pending_queue.size == 2
    assert pending_ids(db_path) == ids[3:]


async def test_get_task_and_list_tasks_name_the_task(db_path: Path) -> None:
    await queue_results(db_path, 2)
    set_column(db_path, "q1", "result", "{bad")
    async with BackgroundTaskHandler(database=db_path) as handler:
        assert handler.get_task("q0") is not None
        with pytest.raises(StoredValueError, match=r"task 'q1'"):
            handler.get_task("q1")
        with pytest.raises(StoredValueError, match=r"task 'q1'"):
            handler.list_tasks()


async def test_an_unreadable_result_leaves_the_held_object_as_it_was(db_path: Path) -> None:
    async with BackgroundTaskHandler(database=db_path) as holder:
        task = holder.submit("t", "run", payload={"p": 1})
        async with BackgroundTaskHandler(database=db_path) as other:
            await other.handle_result("t", {"r": 1}, is_main_running=False)
        set_column(db_path, "t", "result", "{bad")
        with pytest.raises(StoredValueError):
            holder.get_task("t")
        assert task.status is RunNodeStatus.RUNNING
        assert task.result is None and task.merge_mode is None
        set_column(db_path, "t", "result", '{"r": 2}')
        again = holder.get_task("t")
        assert again is task
        assert (again.status, again.result, again.merge_mode) == (
            RunNodeStatus.SUCCESS,
            {"r": 2},
            MergeMode.WAKEUP,
        )


class _VersionedCodec(JsonCodec):
    """A codec that refuses values it did not write, with an error of its own."""

    def loads(self, text: str) -> Any:
        value = super().loads(text)
        if isinstance(value, dict) and value.get("v") != 2:
            raise RuntimeError(f"unsupported version {value.get('v')}")
        return value


async def test_any_error_of_a_codec_is_reported_as_a_stored_value_error(db_path: Path) -> None:
    await queue_results(db_path, 2)  # written without a version
    async with BackgroundTaskHandler(database=db_path, codec=_VersionedCodec()) as handler:
        with pytest.raises(StoredValueError, match=r"unsupported version None") as caught:
            handler.pending_queue.pop_all()
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert handler.pending_queue.size == 2
        assert claimed_count(db_path) == 0


class _NotJsonCodec(JsonCodec):
    def dumps(self, value: Any) -> str:
        return "not json {" if value == "bad" else super().dumps(value)


class _RaisingCodec(JsonCodec):
    def dumps(self, value: Any) -> str:
        raise RuntimeError("this codec is broken")


@pytest.mark.parametrize(
    ("codec", "message"),
    [
        (_NotJsonCodec(), "codec.dumps returned text that is not JSON"),
        (_RaisingCodec(), "this codec is broken"),
    ],
)
def test_a_codec_that_cannot_write_json_writes_nothing(
    db_path: Path, codec: JsonCodec, message: str
) -> None:
    with BackgroundTaskHandler(database=db_path, codec=codec) as handler:
        with pytest.raises(InvalidValueError, match=message):
            handler.submit("t", "run", payload="bad")
        assert handler.get_task("t") is None


def test_a_codec_writing_nan_is_refused(db_path: Path) -> None:
    class NanCodec(JsonCodec):
        def dumps(self, value: Any) -> str:
            return "NaN"

    with (
        BackgroundTaskHandler(database=db_path, codec=NanCodec()) as handler,
        pytest.raises(InvalidValueError, match="NaN is not JSON"),
    ):
        handler.submit("t", "run", payload=1)


async def test_finishing_a_task_whose_payload_cannot_be_read_changes_nothing(
    db_path: Path,
) -> None:
    # Finishing builds the task's object from its stored payload (for on_merge callbacks,
    # and for handle_error's own bookkeeping): it is decoded before the finish commits.
    async with BackgroundTaskHandler(database=db_path) as handler:
        handler.submit("a", "run", payload={"p": 1})
        handler.submit("b", "run", payload={"p": 2})
    set_column(db_path, "a", "payload", "{bad")
    set_column(db_path, "b", "payload", "{bad")
    merged: list[str] = []
    async with BackgroundTaskHandler(database=db_path) as handler:

        async def on_merge(task: Any, mode: MergeMode) -> None:
            merged.append(task.task_id)

        handler.on_merge(on_merge)
        with pytest.raises(StoredValueError, match=r"stored payload of task 'a'"):
            await handler.handle_result("a", {"r": 1}, is_main_running=True)
        with pytest.raises(StoredValueError, match=r"stored payload of task 'b'"):
            handler.handle_error("b", "boom")
        assert (task_status(db_path, "a"), task_status(db_path, "b")) == ("running", "running")
        assert merged == []
        set_column(db_path, "a", "payload", '{"p": 1}')
        assert await handler.handle_result("a", {"r": 1}) is MergeMode.HOT
        assert merged == ["a"]


def test_a_codec_module_works(db_path: Path) -> None:
    with BackgroundTaskHandler(database=db_path, codec=json) as handler:  # type: ignore[arg-type]
        handler.submit("t", "run", payload={"k": [1, 2]})
    with BackgroundTaskHandler(database=db_path, codec=json) as handler:  # type: ignore[arg-type]
        task = handler.get_task("t")
        assert task is not None and task.payload == {"k": [1, 2]}
