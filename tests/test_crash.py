"""Durability under SIGKILL: a real child process is killed right after calls return,
and a fresh process checks the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HELPERS, run_helper


def start_child(*args: str, script: str = "child.py") -> subprocess.Popen[str]:
    """Start ``tests/helpers/SCRIPT ARGS`` with its output unbuffered."""
    return subprocess.Popen(
        [sys.executable, str(HELPERS / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def read_until(child: subprocess.Popen[str], prefix: str) -> list[str]:
    """Read the child's lines up to and including the first that starts with ``prefix``."""
    assert child.stdout is not None
    lines: list[str] = []
    for line in child.stdout:
        lines.append(line.strip())
        if line.startswith(prefix):
            return lines
    raise AssertionError(
        f"child ended before {prefix!r}: {lines} {child.stderr and child.stderr.read()}"
    )


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=10)  # reaps the child and closes its pipes
    assert child.returncode == -signal.SIGKILL


def inspect(db: Path, *flags: str) -> dict[str, Any]:
    return dict(json.loads(run_helper("child.py", "inspect", str(db), *flags)))


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_submit_survives_sigkill_right_after_return(db_path: Path, synchronous: str) -> None:
    child = start_child("submit", str(db_path), "1000", synchronous)
    read_until(child, "submitted 49")
    kill(child)
    seen = inspect(db_path)
    # Every submit that returned (0..49) is there; later ones may or may not be.
    assert {f"t{i}" for i in range(50)} <= set(seen["tasks"])
    assert all(task["status"] == "running" for task in seen["tasks"].values())


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_results_survive_sigkill_right_after_return(db_path: Path, synchronous: str) -> None:
    child = start_child("results", str(db_path), "1000", synchronous)
    lines = read_until(child, "returned 29 ")
    kill(child)
    seen = inspect(db_path, "--drain")
    for line in lines:
        _, index, mode = line.split()
        task = seen["tasks"][f"t{index}"]
        assert task["status"] == "success"
        assert task["result"] == {"value": int(index)}
        assert task["merge_mode"] == mode
    wakeups = [f"t{i}" for i in range(30) if i % 3 != 0]
    # The drain yields every queued wake-up result in enqueue order (later, unreported
    # calls may have committed too: they come after).
    assert seen["drained"][: len(wakeups)] == wakeups


def test_group_committed_results_survive_sigkill(db_path: Path) -> None:
    child = start_child("gather_results", str(db_path), "300")
    read_until(child, "all returned")
    kill(child)
    seen = inspect(db_path)
    assert seen["pending_size"] == 300
    assert all(task["status"] == "success" for task in seen["tasks"].values())


@pytest.mark.parametrize("after", [1, 200])
def test_completions_run_together_survive_sigkill_mid_stream(db_path: Path, after: int) -> None:
    """Killed while batches of concurrent completions (run together, a group at a time)
    keep committing: every call that returned is stored with its queue entry, and no
    completion is stored without its entry, or the other way round."""
    child = start_child("lane_results", str(db_path), "40", "25")
    read_until(child, "submitted")
    seen_lines = [line for line in read_until_count(child, "returned", after)]
    child.send_signal(signal.SIGKILL)
    rest, _ = child.communicate(timeout=10)  # what it printed before it died
    returned = {
        int(words[1])
        for words in map(str.split, [*seen_lines, *rest.splitlines()])
        if len(words) == 2 and words[0] == "returned"  # the last line may be cut short
    }
    assert len(returned) >= after

    seen = inspect(db_path, "--drain")
    finished = {task_id for task_id, task in seen["tasks"].items() if task["status"] == "success"}
    assert {f"l{index}" for index in returned} <= finished
    assert set(seen["drained"]) == finished  # each stored result has its entry, and only they
    assert seen["pending_size"] == len(finished)
    for task_id in finished:
        assert seen["tasks"][task_id]["result"] == int(task_id[1:])


def read_until_count(child: subprocess.Popen[str], prefix: str, count: int) -> list[str]:
    """Read the child's lines until ``count`` of them started with ``prefix``."""
    lines: list[str] = []
    while sum(line.startswith(prefix) for line in lines) < count:
        lines.extend(read_until(child, prefix))
    return lines


def test_drain_killed_while_holding_item_redelivers_it_and_not_earlier(db_path: Path) -> None:
    # Queue ten wake-up results, from a process that then dies.
    child = start_child("results", str(db_path), "15")
    read_until(child, "returned 14 ")
    kill(child)
    queued = [f"t{i}" for i in range(15) if i % 3 != 0]  # 10 items
    # A drainer dies while holding the fourth item.
    drainer = start_child("drain_hold", str(db_path), "3")
    lines = read_until(drainer, f"holding {queued[3]}")
    assert lines == [f"holding {t}" for t in queued[:4]]
    kill(drainer)
    # The next drain yields the held item and everything after it, none before.
    assert inspect(db_path, "--drain")["drained"] == queued[3:]
    assert inspect(db_path)["pending_size"] == 0


def test_restarted_process_finishes_tasks_of_a_dead_one(db_path: Path) -> None:
    child = start_child("submit", str(db_path), "1000")
    read_until(child, "submitted 9")
    kill(child)
    out = run_helper("child.py", "finish_existing", str(db_path))
    finished = int(out.split()[1])
    assert finished >= 10
    seen = inspect(db_path, "--drain")
    assert seen["drained"][:10] == [f"t{i}" for i in range(10)]
    assert all(task["result"] == "after restart" for task in seen["tasks"].values())
