"""The CLI's write commands under SIGKILL: ``requeue`` changes nothing if killed before
its commit and is durable once it has printed its result; ``purge`` killed midway has
deleted whole batches only, oldest first, and never a running or queued task; ``drain``
killed while printing an item redelivers that item and none before it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import run_helper
from tests.helpers.crash_common import integrity, kill, queue_runs, queued, sql, start, words
from tests.test_crash import inspect, read_until


def make_db(db: Path) -> list[str]:
    """Five queued results (r0-0..r0-4, recent) and old tasks: 'run' (running), 'done' and
    old0000..old0999 (finished, not queued), last updated over a minute of 2020. Returns
    the purgeable ids in purge order (oldest first, then by id)."""
    queue_runs(db, 1, 5)
    rows: list[tuple[str, str, str | None, str | None, str | None, int]] = [
        ("run", "running", None, None, None, 0),
        ("done", "success", "hot", "42", None, 0),
    ]
    for index in range(1000):
        failed = index % 3 == 0
        rows.append(
            (
                f"old{index:04d}",
                "failed" if failed else "success",
                None if failed else "hot",
                None if failed else "42",
                "boom" if failed else None,
                index % 60,
            )
        )
    connection = sqlite3.connect(db)
    with connection:
        connection.executemany(
            "INSERT INTO background_tasks (task_id, parent_task_id, status, merge_mode, result, "
            "error, payload, created_at, updated_at) VALUES (?, 'old', ?, ?, ?, ?, 'null', "
            "'2020-01-01 00:00:00.000000', printf('2020-01-01 00:00:%02d.000000', ?))",
            rows,
        )
    connection.close()
    return [row[0] for row in sorted(rows[1:], key=lambda row: (row[5], row[0]))]


def test_requeue_killed_before_its_commit_changes_nothing(db_path: Path) -> None:
    make_db(db_path)
    child = start(
        "cli", str(db_path), "traced-commit:1:INSERT INTO pending_queue", "requeue", "done"
    )
    read_until(child, "hanging before commit")
    kill(child)
    assert integrity(db_path) == "ok"
    assert queued(db_path) == [f"r0-{index}" for index in range(5)]
    # The file is not held by the dead command: a handler drains it.
    assert inspect(db_path, "--drain")["drained"] == [f"r0-{index}" for index in range(5)]


def test_requeue_killed_right_after_it_printed_its_result_is_durable(db_path: Path) -> None:
    make_db(db_path)
    child = start("cli", str(db_path), "output", "requeue", "done", "--json")
    (line,) = [w[1] for w in words(read_until(child, "output"), "output", 2)]
    kill(child)
    assert json.loads(line)["requeued"] is True
    seen = inspect(db_path, "--drain")
    assert seen["drained"] == [*(f"r0-{index}" for index in range(5)), "done"]
    assert seen["tasks"]["done"]["merge_mode"] == "hot"  # the row itself is unchanged


@pytest.mark.parametrize("killed_in_batch", [1, 4])
def test_purge_killed_midway_has_deleted_whole_batches_only(
    db_path: Path, killed_in_batch: int
) -> None:
    purgeable = make_db(db_path)
    child = start(
        "cli",
        str(db_path),
        f"commit:{killed_in_batch}:DELETE FROM background_tasks",
        *("purge", "--older-than", "1d", "--batch-size", "100"),
    )
    read_until(child, "hanging before commit")
    kill(child)
    left = purgeable[(killed_in_batch - 1) * 100 :]
    assert [
        row[0] for row in sql(db_path, "SELECT task_id FROM background_tasks ORDER BY task_id")
    ] == sorted([*left, "run", *(f"r0-{index}" for index in range(5))])
    assert integrity(db_path) == "ok"
    # The next purge deletes the rest; running and queued tasks stay.
    out = run_helper(
        "crash_child.py", "cli", str(db_path), "-", "purge", "--older-than", "1d", "--json"
    )
    assert sorted(json.JSONDecoder().raw_decode(out)[0]["task_ids"]) == sorted(left)
    seen = inspect(db_path, "--drain")
    assert seen["drained"] == [f"r0-{index}" for index in range(5)]
    assert seen["tasks"]["run"]["status"] == "running"


def test_cli_drain_killed_holding_an_item_redelivers_it_and_none_before(db_path: Path) -> None:
    ids = queue_runs(db_path, 1, 10)
    child = start("cli", str(db_path), "drained:4", "drain")
    lines = read_until(child, f"printed {ids[3]}")
    kill(child)
    assert [w[1] for w in words(lines, "printed", 2)] == ids[:4]
    assert inspect(db_path, "--drain")["drained"] == ids[3:]
