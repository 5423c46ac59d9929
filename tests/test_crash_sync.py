"""The sync calls (handle_error, pending_queue.push and pop_all) are durable when they
return, made from plain code with no event loop (FULL and NORMAL) or on the loop thread
while async writes are in flight: a child is SIGKILLed right after a call returned, or at
random in a stream of them, and a fresh process finds every returned call's effect."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from orbiter._internal.background import BackgroundTaskHandler
from tests.helpers.crash_common import integrity, kill, queue_runs, queued, sql, start, words
from tests.test_crash import inspect, read_until


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_handle_error_without_a_loop_survives_sigkill_right_after_return(
    db_path: Path, synchronous: str
) -> None:
    with BackgroundTaskHandler(database=db_path) as earlier:  # tasks held by no one now
        for index in range(100):
            earlier.submit(f"o{index}", "run")
    child = start("fail", str(db_path), "100", synchronous)
    lines = read_until(child, "failed t19")
    kill(child)
    failed = [w[1] for w in words(lines, "failed", 2)]
    assert len(failed) == 40
    tasks = inspect(db_path)["tasks"]
    for task_id in failed:
        assert (tasks[task_id]["status"], tasks[task_id]["error"]) == (
            "failed",
            f"error {task_id}",
        )
    assert integrity(db_path) == "ok"


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_push_without_a_loop_survives_sigkill_right_after_return(
    db_path: Path, synchronous: str
) -> None:
    child = start("push", str(db_path), "200", synchronous)
    lines = read_until(child, "pushed 29")
    kill(child)
    assert [int(w[1]) for w in words(lines, "pushed", 2)] == list(range(30))
    seen = inspect(db_path, "--drain")
    for index in range(30):
        task = seen["tasks"][f"p{index}"]
        assert (task["status"], task["result"], task["merge_mode"]) == (
            "success",
            {"v": index},
            "wakeup",
        )
    # Every returned push is queued, in push order (later ones may follow).
    assert seen["drained"][:30] == [f"p{index}" for index in range(30)]


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_pop_all_without_a_loop_survives_sigkill_right_after_return(
    db_path: Path, synchronous: str
) -> None:
    ids = queue_runs(db_path, 3, 10)
    child = start("pop_all", str(db_path), synchronous)
    (line,) = read_until(child, "popped")
    kill(child)
    assert json.loads(line.split(maxsplit=1)[1]) == ids
    seen = inspect(db_path, "--drain")
    assert (seen["pending_size"], seen["drained"]) == (0, [])
    assert sorted(seen["tasks"]) == sorted(ids)  # the tasks themselves stay
    assert queued(db_path) == []


def test_push_and_pop_all_rounds_killed_mid_stream(db_path: Path) -> None:
    child = start("push_pop_rounds", str(db_path))
    lines = read_until(child, "popped 50 ")
    lines += kill(child)
    rounds = words(lines, "popped", 3)
    assert all(json.loads(w[2]) == [f"r{w[1]}"] for w in rounds)  # each pop takes its push
    last = int(rounds[-1][1])
    seen = inspect(db_path, "--drain")
    for index in range(last + 1):
        assert seen["tasks"][f"r{index}"]["status"] == "success"
    # Nothing a returned pop_all took is queued again; at most the next push is.
    assert set(seen["drained"]) <= {f"r{last + 1}"}


def test_sync_calls_on_the_loop_thread_with_async_writes_in_flight(db_path: Path) -> None:
    child = start("sync_on_loop", str(db_path), "400")
    lines = read_until(child, "sync done")
    kill(child)
    calls = words(lines, "sync", 3)
    tasks = inspect(db_path)["tasks"]
    now_queued = set(queued(db_path))
    popped: set[str] = set()
    for _, kind, what in calls:
        if kind == "pop_all":
            popped |= set(json.loads(what))
        else:
            assert tasks[what]["status"] == {"submit": "running", "error": "failed"}.get(
                kind, "success"
            )
    assert not popped & now_queued  # what a returned pop_all took stays gone
    last_pop = max(i for i, call in enumerate(calls) if call[1] == "pop_all")
    late_pushes = {
        what for i, (_, kind, what) in enumerate(calls) if kind == "push" and i > last_pop
    }
    assert late_pushes <= now_queued
    # The async completions: each stored one has its queue entry (or was popped), no more.
    done = {
        task_id
        for task_id, task in tasks.items()
        if task_id[0] == "a" and task["status"] == "success"
    }
    assert {t for t in now_queued | popped if t[0] == "a"} == done
    assert integrity(db_path) == "ok"


def test_random_sigkills_during_sync_calls_without_a_loop_lose_nothing(tmp_path: Path) -> None:
    """Sessions one after another, each killed after a random number of calls; checked
    against their journals: every returned call is stored, every pushed item is queued or
    was taken by a pop_all (one that returned, or one cut short by the kill), once."""
    db, rng = tmp_path / "tasks.db", random.Random(2026)
    journals = [tmp_path / f"s{session}.log" for session in range(8)]
    for session, journal in enumerate(journals):
        child = start("random_sync_calls", str(db), str(journal), f"s{session}", str(session))
        read_until(child, f"ops {rng.randrange(10, 150, 10)}")
        kill(child)
    submitted, failed, pushed, popped = set(), set(), [], Counter[str]()
    may_be_gone: set[str] = set()  # queued when a pop_all began that the kill cut short
    since_pop: list[str] = []  # queued since the last pop_all that returned
    for journal in journals:
        entries = [line.split() for line in journal.read_text().splitlines()]
        for kind, *ids in entries:
            if kind == "S":
                submitted.update(ids)
            elif kind == "E":
                failed.update(ids)
            elif kind == "P":
                pushed.extend(ids)
                since_pop.extend(ids)
            elif kind == "A":
                popped.update(ids)
                since_pop = []
        if entries and entries[-1] == ["B"]:
            may_be_gone |= set(since_pop)
            since_pop = []
    status = dict(sql(db, "SELECT task_id, status FROM background_tasks"))
    now_queued = set(queued(db))
    assert len(submitted) > 100 and len(pushed) > 50 and popped  # the run did something
    assert [t for t in submitted if t not in status] == []
    assert [t for t in failed if status.get(t) != "failed"] == []
    assert [t for t in pushed if status.get(t) != "success"] == []
    assert [t for t in pushed if t not in now_queued | set(popped) | may_be_gone] == []
    assert [t for t, count in popped.items() if count > 1 or t in now_queued] == []
    assert integrity(db) == "ok"
