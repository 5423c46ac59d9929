"""The store's weak map of handed-out task objects (store/held_tasks.py)."""

from __future__ import annotations

import gc

from orbiter._internal.task import BackgroundTask
from orbiter.store.held_tasks import HeldTasks


def test_an_entry_lives_as_long_as_its_object() -> None:
    tasks = HeldTasks()
    task = BackgroundTask("a", "run")
    tasks["a"] = task
    assert tasks.get("a") is task
    assert tasks.get("b") is None
    del task
    gc.collect()
    assert tasks.get("a") is None


def test_setdefault_keeps_a_live_object_and_replaces_a_dead_one() -> None:
    tasks = HeldTasks()
    first = BackgroundTask("a", "run")
    assert tasks.setdefault("a", first) is first
    assert tasks.setdefault("a", BackgroundTask("a", "run")) is first
    del first
    gc.collect()
    second = BackgroundTask("a", "run")
    assert tasks.setdefault("a", second) is second
    assert tasks.get("a") is second


def test_dead_entries_are_swept_and_live_ones_kept() -> None:
    tasks = HeldTasks()
    kept = [BackgroundTask(f"k{index}", "run") for index in range(700)]
    for task in kept:
        tasks[task.task_id] = task
    for index in range(100_000):  # made and dropped at once, as a drain does
        tasks[f"d{index}"] = BackgroundTask(f"d{index}", "run")
    assert len(tasks) < 2 * 1024 + 700
    assert all(tasks.get(task.task_id) is task for task in kept)
    assert tasks.get("d5") is None


def test_a_replaced_entry_is_not_swept_for_its_dead_predecessor() -> None:
    tasks = HeldTasks()
    tasks["a"] = BackgroundTask("a", "run")  # dies at once
    live = BackgroundTask("a", "run")
    tasks["a"] = live
    for index in range(3000):
        tasks[f"d{index}"] = BackgroundTask(f"d{index}", "run")
    assert tasks.get("a") is live
