"""Every statement of the reference API, against the in-memory and the durable handler."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

import orbiter
from orbiter._internal.background import (
    BackgroundTask,
    BackgroundTaskError,
    BackgroundTaskHandler,
    MergeMode,
    PendingQueue,
)
from orbiter._internal.state import RunNodeStatus, RunState
from orbiter.types import OrbiterError

# -- module surface --------------------------------------------------------------------


def test_module_exports_the_spec_names() -> None:
    from orbiter._internal import background

    assert set(background.__all__) >= {
        "BackgroundTask",
        "BackgroundTaskError",
        "BackgroundTaskHandler",
        "MergeMode",
        "PendingQueue",
    }
    assert orbiter.BackgroundTaskHandler is BackgroundTaskHandler


def test_error_inherits_orbiter_error() -> None:
    assert issubclass(BackgroundTaskError, OrbiterError)
    assert issubclass(OrbiterError, Exception)


def test_merge_mode_values() -> None:
    assert MergeMode.HOT == "hot"  # type: ignore[comparison-overlap]  # a StrEnum is a str
    assert MergeMode.WAKEUP == "wakeup"  # type: ignore[comparison-overlap]
    assert [m.value for m in MergeMode] == ["hot", "wakeup"]


def test_run_node_status_values() -> None:
    assert [s.value for s in RunNodeStatus] == ["init", "running", "success", "failed", "timeout"]


# -- BackgroundTask --------------------------------------------------------------------


def test_background_task_initial_state() -> None:
    task = BackgroundTask("t", "p")
    assert (task.task_id, task.parent_task_id) == ("t", "p")
    assert task.payload is None
    assert task.result is None
    assert task.error is None
    assert task.status is RunNodeStatus.INIT
    assert task.merge_mode is None
    assert not task.is_complete


def test_background_task_lifecycle() -> None:
    task = BackgroundTask("t", "p", payload={"k": 1})
    assert task.payload == {"k": 1}
    task.start()
    assert task.status is RunNodeStatus.RUNNING
    assert not task.is_complete
    task.complete("done")
    assert task.status is RunNodeStatus.SUCCESS  # type: ignore[comparison-overlap]  # mutated
    assert task.result == "done"
    assert task.is_complete
    failed = BackgroundTask("u", "p")
    failed.fail("boom")
    assert failed.status is RunNodeStatus.FAILED
    assert failed.error == "boom"
    assert failed.is_complete


def test_timeout_is_not_complete_per_spec() -> None:
    task = BackgroundTask("t", "p")
    task.status = RunNodeStatus.TIMEOUT
    assert not task.is_complete


# -- PendingQueue (standalone) ---------------------------------------------------------


async def test_standalone_pending_queue() -> None:
    queue = PendingQueue()
    assert queue.empty and queue.size == 0
    assert await queue.wait(timeout=0.01) is False
    task = BackgroundTask("t", "p")
    task.complete(1)
    queue.push(task)
    assert queue.size == 1 and not queue.empty
    assert await queue.wait(timeout=0.01) is True
    assert queue.pop_all() == [task]
    assert queue.empty
    assert queue.pop_all() == []


async def test_standalone_queue_wait_wakes_on_push() -> None:
    queue = PendingQueue()
    task = BackgroundTask("t", "p")

    async def push_later() -> None:
        await asyncio.sleep(0.05)
        queue.push(task)

    pusher = asyncio.create_task(push_later())
    assert await queue.wait() is True
    await pusher


def test_standalone_queue_works_across_event_loops() -> None:
    queue = PendingQueue()
    assert asyncio.run(queue.wait(0.01)) is False
    queue.push(BackgroundTask("t", "p"))
    assert asyncio.run(queue.wait(0.01)) is True


# -- handler: submit ------------------------------------------------------------------


def test_submit_creates_running_task(handler: BackgroundTaskHandler) -> None:
    task = handler.submit("t1", "main", payload={"url": "https://example"})
    assert isinstance(task, BackgroundTask)
    assert task.status is RunNodeStatus.RUNNING
    assert task.payload == {"url": "https://example"}
    assert task.parent_task_id == "main"
    assert handler.get_task("t1") is task


def test_submit_duplicate_raises(handler: BackgroundTaskHandler) -> None:
    handler.submit("t1", "main")
    with pytest.raises(BackgroundTaskError, match="already exists"):
        handler.submit("t1", "other")
    assert handler.get_task("t1").parent_task_id == "main"  # type: ignore[union-attr]


def test_submit_default_payload_is_none(handler: BackgroundTaskHandler) -> None:
    assert handler.submit("t1", "main").payload is None


def test_submit_with_state_tracks_node(make_handler: Callable[..., BackgroundTaskHandler]) -> None:
    state = RunState("agent")
    handler = make_handler(state=state)
    handler.submit("t1", "main")
    node = state.nodes[-1]
    assert node.agent_name == "bg:t1"
    assert node.status is RunNodeStatus.RUNNING


def test_state_can_be_positional() -> None:
    state = RunState("agent")
    handler = BackgroundTaskHandler(state)
    handler.submit("t", "p")
    assert state.nodes[-1].agent_name == "bg:t"


# -- handler: handle_result -----------------------------------------------------------


async def test_hot_merge(handler: BackgroundTaskHandler) -> None:
    task = handler.submit("t1", "main")
    mode = await handler.handle_result("t1", {"data": [1, 2]})
    assert mode is MergeMode.HOT
    assert task.status is RunNodeStatus.SUCCESS
    assert task.result == {"data": [1, 2]}
    assert task.merge_mode is MergeMode.HOT
    assert handler.pending_queue.empty


async def test_is_main_running_defaults_to_true(handler: BackgroundTaskHandler) -> None:
    handler.submit("t1", "main")
    assert await handler.handle_result("t1", 1) is MergeMode.HOT


async def test_wakeup_merge_queues(handler: BackgroundTaskHandler) -> None:
    task = handler.submit("t1", "main")
    mode = await handler.handle_result("t1", "late", is_main_running=False)
    assert mode is MergeMode.WAKEUP
    assert task.merge_mode is MergeMode.WAKEUP
    assert task.status is RunNodeStatus.SUCCESS
    assert handler.pending_queue.size == 1
    assert not handler.pending_queue.empty


async def test_handle_result_unknown_raises(handler: BackgroundTaskHandler) -> None:
    with pytest.raises(BackgroundTaskError, match="not found"):
        await handler.handle_result("nope", 1)


async def test_handle_result_marks_node_success(
    make_handler: Callable[..., BackgroundTaskHandler],
) -> None:
    state = RunState("agent")
    handler = make_handler(state=state)
    handler.submit("t1", "main")
    await handler.handle_result("t1", 1)
    assert state.nodes[-1].status is RunNodeStatus.SUCCESS


async def test_second_result_raises_already_completed(handler: BackgroundTaskHandler) -> None:
    handler.submit("t1", "main")
    await handler.handle_result("t1", "first", is_main_running=False)
    with pytest.raises(BackgroundTaskError, match="already completed"):
        await handler.handle_result("t1", "second", is_main_running=False)
    with pytest.raises(BackgroundTaskError, match="already completed"):
        handler.handle_error("t1", "late failure")
    assert handler.pending_queue.size == 1
    task = handler.get_task("t1")
    assert task is not None and task.result == "first" and task.error is None


# -- handler: handle_error ------------------------------------------------------------


def test_handle_error(handler: BackgroundTaskHandler) -> None:
    task = handler.submit("t1", "main")
    assert handler.handle_error("t1", "boom") is None  # type: ignore[func-returns-value]
    assert task.status is RunNodeStatus.FAILED
    assert task.error == "boom"
    assert task.is_complete


def test_handle_error_unknown_raises(handler: BackgroundTaskHandler) -> None:
    with pytest.raises(BackgroundTaskError, match="not found"):
        handler.handle_error("nope", "boom")


async def test_handle_error_then_result_raises(handler: BackgroundTaskHandler) -> None:
    handler.submit("t1", "main")
    handler.handle_error("t1", "boom")
    with pytest.raises(BackgroundTaskError, match="already completed"):
        await handler.handle_result("t1", 1)
    assert handler.pending_queue.empty


def test_handle_error_marks_node_failed(
    make_handler: Callable[..., BackgroundTaskHandler],
) -> None:
    state = RunState("agent")
    handler = make_handler(state=state)
    handler.submit("t1", "main")
    handler.handle_error("t1", "boom")
    assert state.nodes[-1].status is RunNodeStatus.FAILED
    assert state.nodes[-1].error == "boom"


# -- handler: drain_pending and callbacks ---------------------------------------------


async def test_drain_pending_yields_in_order_and_empties(handler: BackgroundTaskHandler) -> None:
    for index in range(5):
        handler.submit(f"t{index}", "main")
    for index in (3, 0, 4, 1):
        await handler.handle_result(f"t{index}", index, is_main_running=False)
    drained = [(task.task_id, task.result) async for task in handler.drain_pending()]
    assert drained == [("t3", 3), ("t0", 0), ("t4", 4), ("t1", 1)]
    assert handler.pending_queue.empty
    assert [task async for task in handler.drain_pending()] == []


async def test_results_arriving_during_a_drain_wait_for_the_next(
    handler: BackgroundTaskHandler,
) -> None:
    for task_id in ("a", "b", "late"):
        handler.submit(task_id, "main")
    await handler.handle_result("a", 1, is_main_running=False)
    await handler.handle_result("b", 2, is_main_running=False)
    drained = []
    async for task in handler.drain_pending():
        drained.append(task.task_id)
        if task.task_id == "a":
            await handler.handle_result("late", 3, is_main_running=False)
    assert drained == ["a", "b"]
    assert [task.task_id async for task in handler.drain_pending()] == ["late"]


async def test_drain_pending_empty(handler: BackgroundTaskHandler) -> None:
    assert [task async for task in handler.drain_pending()] == []


async def test_on_merge_hot_callback(handler: BackgroundTaskHandler) -> None:
    calls: list[tuple[str, MergeMode]] = []

    async def on_bg_merge(task: BackgroundTask, mode: MergeMode) -> None:
        calls.append((task.task_id, mode))

    handler.on_merge(on_bg_merge)
    handler.submit("t1", "main")
    handler.submit("t2", "main")
    await handler.handle_result("t1", 1)
    assert calls == [("t1", MergeMode.HOT)]
    await handler.handle_result("t2", 2, is_main_running=False)
    assert calls == [("t1", MergeMode.HOT)], "queueing a wake-up result merges nothing yet"
    drained = [task.task_id async for task in handler.drain_pending()]
    assert drained == ["t2"]
    assert calls == [("t1", MergeMode.HOT), ("t2", MergeMode.WAKEUP)]


async def test_wakeup_callback_runs_before_item_is_yielded(handler: BackgroundTaskHandler) -> None:
    seen: list[str] = []

    async def callback(task: BackgroundTask, mode: MergeMode) -> None:
        seen.append(task.task_id)

    handler.on_merge(callback)
    for name in ("a", "b"):
        handler.submit(name, "main")
        await handler.handle_result(name, name, is_main_running=False)
    async for task in handler.drain_pending():
        assert seen[-1] == task.task_id


async def test_failing_callback_is_logged_others_run(
    handler: BackgroundTaskHandler, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    async def bad(task: BackgroundTask, mode: MergeMode) -> None:
        raise RuntimeError("callback exploded")

    async def good(task: BackgroundTask, mode: MergeMode) -> None:
        calls.append(task.task_id)

    handler.on_merge(bad)
    handler.on_merge(good)
    handler.submit("t1", "main")
    with caplog.at_level(logging.ERROR):
        assert await handler.handle_result("t1", 1) is MergeMode.HOT
    assert calls == ["t1"]
    assert "callback exploded" in caplog.text


async def test_sync_callback_is_called(handler: BackgroundTaskHandler) -> None:
    calls: list[MergeMode] = []
    handler.on_merge(lambda task, mode: calls.append(mode))
    handler.submit("t1", "main")
    await handler.handle_result("t1", 1)
    assert calls == [MergeMode.HOT]


# -- handler: get_task / list_tasks / pending_queue ------------------------------------


def test_get_task_unknown_is_none(handler: BackgroundTaskHandler) -> None:
    assert handler.get_task("missing") is None


async def test_list_tasks_with_and_without_filter(handler: BackgroundTaskHandler) -> None:
    handler.submit("a", "main")
    handler.submit("b", "main")
    handler.submit("c", "main")
    await handler.handle_result("a", 1)
    handler.handle_error("b", "boom")
    assert [t.task_id for t in handler.list_tasks()] == ["a", "b", "c"]
    assert [t.task_id for t in handler.list_tasks(status=RunNodeStatus.SUCCESS)] == ["a"]
    assert [t.task_id for t in handler.list_tasks(status=RunNodeStatus.FAILED)] == ["b"]
    assert [t.task_id for t in handler.list_tasks(status=RunNodeStatus.RUNNING)] == ["c"]
    assert handler.list_tasks(status=RunNodeStatus.TIMEOUT) == []


@pytest.mark.parametrize("clock", ["frozen", "stepping back"])
def test_list_tasks_keeps_submission_order_whatever_the_clock(
    handler: BackgroundTaskHandler, monkeypatch: pytest.MonkeyPatch, clock: str
) -> None:
    # Tasks submitted in one transaction share a timestamp, and a clock may step back
    # (NTP): the order is still the order of the calls, as in memory.
    stamps = iter(f"2026-12-07 10:00:{59 - second:02d}.000000" for second in range(60))
    now = (lambda: "2026-12-07 10:00:00.000000") if clock == "frozen" else (lambda: next(stamps))
    monkeypatch.setattr("orbiter.store.executor.utc_now_text", now)
    for task_id in ("m", "z", "a", "k"):
        handler.submit(task_id, "main")
    assert [t.task_id for t in handler.list_tasks()] == ["m", "z", "a", "k"]
    running = handler.list_tasks(status=RunNodeStatus.RUNNING)
    assert [t.task_id for t in running] == ["m", "z", "a", "k"]


def test_pending_queue_property_is_stable(handler: BackgroundTaskHandler) -> None:
    assert isinstance(handler.pending_queue, PendingQueue)
    assert handler.pending_queue is handler.pending_queue


async def test_pending_queue_pop_all(handler: BackgroundTaskHandler) -> None:
    handler.submit("a", "main")
    handler.submit("b", "main")
    await handler.handle_result("a", "A", is_main_running=False)
    await handler.handle_result("b", "B", is_main_running=False)
    popped = handler.pending_queue.pop_all()
    assert [(t.task_id, t.result) for t in popped] == [("a", "A"), ("b", "B")]
    assert handler.pending_queue.empty
    assert [t async for t in handler.drain_pending()] == []


async def test_pending_queue_wait(handler: BackgroundTaskHandler) -> None:
    assert await handler.pending_queue.wait(timeout=0.05) is False
    handler.submit("a", "main")

    async def finish_later() -> None:
        await asyncio.sleep(0.05)
        await handler.handle_result("a", 1, is_main_running=False)

    finisher = asyncio.create_task(finish_later())
    assert await handler.pending_queue.wait(timeout=5) is True
    await finisher
    assert await handler.pending_queue.wait(timeout=0) is True


async def test_pending_queue_push_of_handler_queue(handler: BackgroundTaskHandler) -> None:
    task = handler.submit("a", "main")
    task.complete("manual")
    handler.pending_queue.push(task)
    assert handler.pending_queue.size == 1
    drained = [t async for t in handler.drain_pending()]
    assert [(t.task_id, t.result) for t in drained] == [("a", "manual")]


@pytest.mark.parametrize("how", ["drain_pending", "restore_pending"])
async def test_a_task_pushed_twice_leaves_the_queue_when_drained(
    handler: BackgroundTaskHandler, backend: str, how: str
) -> None:
    task = handler.submit("a", "main")
    task.complete("manual")
    handler.pending_queue.push(task)
    handler.pending_queue.push(task)
    # In memory the queue appends each push, like the reference; the durable queue
    # holds a task once.
    copies = 2 if backend == "memory" else 1
    assert handler.pending_queue.size == copies
    if how == "drain_pending":
        drained = [t async for t in handler.drain_pending()]
    else:
        async with handler.restore_pending() as drained:
            pass
    assert [t.task_id for t in drained] == ["a"] * copies
    assert handler.pending_queue.size == 0
    assert [t async for t in handler.drain_pending()] == []


# -- the spec's examples, verbatim in spirit -------------------------------------------


def test_spec_example_runs_verbatim(handler: BackgroundTaskHandler, capsys: Any) -> None:
    task = handler.submit("task_1", "main_run", payload={"url": "https://..."})
    mode = asyncio.run(handler.handle_result("task_1", result="fetched data"))
    print(mode)
    task2 = handler.submit("task_2", "main_run")
    mode = asyncio.run(handler.handle_result("task_2", result="late data", is_main_running=False))
    print(mode)

    async def process_pending() -> None:
        async for pending_task in handler.drain_pending():
            print(f"Processing late result: {pending_task.result}")

    asyncio.run(process_pending())
    assert capsys.readouterr().out == "hot\nwakeup\nProcessing late result: late data\n"
    assert task.status is RunNodeStatus.SUCCESS and task2.merge_mode is MergeMode.WAKEUP


def test_spec_callback_example(handler: BackgroundTaskHandler, capsys: Any) -> None:
    async def on_bg_merge(task: BackgroundTask, mode: MergeMode) -> None:
        if mode == MergeMode.HOT:
            print(f"Hot-merged result from {task.task_id}")
        else:
            print(f"Wake-up merged result from {task.task_id}")

    handler.on_merge(on_bg_merge)
    handler.submit("a", "run")
    handler.submit("b", "run")
    asyncio.run(handler.handle_result("a", 1))
    asyncio.run(handler.handle_result("b", 2, is_main_running=False))

    async def drain() -> None:
        async for _ in handler.drain_pending():
            pass

    asyncio.run(drain())
    assert capsys.readouterr().out == ("Hot-merged result from a\nWake-up merged result from b\n")
