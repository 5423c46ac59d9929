"""restore_pending is all or nothing per run and durable when its block exits: a child
SIGKILLed right after the block, or at a random moment of a stream of restores, leaves
each run's results either all queued or all gone (gone once its block exited), and the
dead restorer's claims do not hold back a fresh drain."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.helpers.crash_common import integrity, kill, queue_runs, queued, sql, start, words
from tests.test_crash import inspect, read_until


def test_restore_killed_right_after_its_block_has_removed_the_runs_results(
    db_path: Path,
) -> None:
    ids = queue_runs(db_path, 2, 5)
    child = start("restore", str(db_path), "r0")
    (line,) = read_until(child, "restored")
    kill(child)
    restored = json.loads(line.split(maxsplit=1)[1])
    assert restored == [task_id for task_id in ids if task_id.startswith("r0-")]
    seen = inspect(db_path, "--drain")
    assert seen["drained"] == [task_id for task_id in ids if task_id.startswith("r1-")]
    assert all(seen["tasks"][task_id]["status"] == "success" for task_id in restored)
    assert integrity(db_path) == "ok"


@pytest.mark.parametrize("seed", range(3))
def test_a_stream_of_restores_killed_at_random_removes_each_run_all_or_nothing(
    db_path: Path, seed: int
) -> None:
    runs, per_run = 60, 5
    ids = queue_runs(db_path, runs, per_run)
    child = start("restore_runs", str(db_path), str(runs), str(seed))
    lines = read_until(child, f"restored r{random.Random(seed).randrange(5, 40)} ")
    lines += kill(child)  # killed in one of the next restores, at a random point
    restored = [w[1] for w in words(lines, "restored", 3)]
    left = dict(
        sql(
            db_path,
            "SELECT parent_task_id, count(*) FROM pending_queue "
            "JOIN background_tasks USING (task_id) GROUP BY parent_task_id",
        )
    )
    # The runs whose results are gone are r0, r1, ... (restored in turn): every one whose
    # block was seen to exit, and at most the next; the others keep all their results.
    gone = [f"r{index}" for index in range(runs) if f"r{index}" not in left]
    assert gone == [f"r{index}" for index in range(len(gone))]
    assert restored == gone[: len(restored)] and len(gone) - len(restored) <= 1
    assert set(left.values()) == {per_run}
    expected = [task_id for task_id in ids if task_id.split("-")[0] not in gone]
    assert queued(db_path) == expected
    assert inspect(db_path, "--drain")["drained"] == expected
    assert integrity(db_path) == "ok"
