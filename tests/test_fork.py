"""A process forked while a handler is open: the child's copy is closed at once and
touches nothing of the parent's (its connection, its owner row), the child opens a handler
of its own, and the parent goes on. Real forks, in a fresh process (tests/helpers/forker.py)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from tests.conftest import run_helper


def test_a_forked_child_that_exits_leaves_the_parents_handler_alone(db_path: Path) -> None:
    report = json.loads(run_helper("forker.py", "exit", str(db_path)))
    assert report["child_status"] == 0
    assert "forked process" in report["child_said"]
    assert "must open a BackgroundTaskHandler of its own" in report["child_said"]
    # The child's normal exit did not close the parent's owner row, so the parent's
    # running task was not taken for an orphan by another handler's recovery.
    assert report["parent_owner_open"] is True
    assert report["settled"] == []
    assert report["work"] == "success"
    with sqlite3.connect(db_path) as connection:
        ids = {row[0] for row in connection.execute("SELECT task_id FROM background_tasks")}
        integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
    assert {"work", "after", "still-running", "child-0"} <= ids
    assert "copy-0" not in ids
    assert integrity == "ok"


def test_a_childs_own_handler_keeps_its_writes_when_the_parent_closes_first(
    db_path: Path,
) -> None:
    # Had the child's connection shared SQLite's per-process record of the file with the
    # copies it inherited, the parent's close would have deleted the log the child was
    # writing to: writes lost, the file corrupt.
    report = json.loads(run_helper("forker.py", "parent-closes", str(db_path), timeout=120))
    assert report["child_status"] == 0
    with sqlite3.connect(db_path) as connection:
        integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
        child_rows = connection.execute(
            "SELECT count(*) FROM background_tasks WHERE task_id LIKE 'child-%'"
        ).fetchone()[0]
    assert integrity == "ok"
    assert child_rows == 1 + 1500  # "child-first" and every later write


def test_children_forked_while_the_parent_writes_never_hang_on_its_locks(
    db_path: Path,
) -> None:
    forks = 20
    report, ids = _fork_children(db_path, "busy", forks, timeout=240)
    assert report["parent_tasks"] > 0
    assert {f"child-{number}" for number in range(forks)} <= ids
    assert not any(task_id.startswith("copy-") for task_id in ids)


def test_children_forked_while_another_thread_opens_handlers_keep_their_writes(
    db_path: Path,
) -> None:
    # A fork waits until no handler is being opened: copies of an open's short-lived
    # connections, or of SQLite's global mutexes held at the fork, left children hung
    # (4-8 of 60) or made their own handler's writes vanish when the parent closed (5 of
    # 6 lost, in 15-38 of 60 children).
    forks = 40
    _, ids = _fork_children(db_path, "opening", forks, timeout=600)
    assert {f"c{number}-{index}" for number in range(forks) for index in range(6)} <= ids


def test_an_interrupt_as_the_fork_ends_leaves_the_handler_working(db_path: Path) -> None:
    # A Ctrl-C that arrives during fork() is raised as the parent's after-fork hook
    # begins, and Python only prints it: the hook is registered twice, so the second
    # lets go of the locks the fork took and reopens the gate.
    report = json.loads(run_helper("forker.py", "interrupted-hook", str(db_path), timeout=120))
    assert report == {"submit": True, "open": True}


def test_a_child_forked_mid_transaction_is_refused_the_file(db_path: Path) -> None:
    # A new handler's open waits for another process's lock (in its schema upgrade)
    # longer than a fork waits: the child inherits SQLite's record of a transaction under
    # way, so it may not open the file.
    report = json.loads(run_helper("forker.py", "blocked-open", str(db_path), timeout=120))
    assert report["fork_seconds"] < 5  # the fork waited about 0.2 s, then went ahead
    assert "forked while a handler of its parent was in the middle" in report["child_said"]
    assert report["blocked_stored"] is True  # the parent's open went on after the lock
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_child_forked_while_a_write_waits_for_the_lock_opens_the_file(db_path: Path) -> None:
    # The commit thread waits for another process's lock between tries, with no
    # transaction open and the connection free: a fork does not wait for it, and the child
    # may open the file (its own writes wait for the lock like any process's).
    report = json.loads(run_helper("forker.py", "blocked", str(db_path), timeout=120))
    assert report["fork_seconds"] < 0.2  # it did not wait FORK_WAIT for a transaction
    assert report["child_said"] == "opened"
    assert report["blocked_stored"] is True  # the parent's submit went on after the lock
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert dict(connection.execute("SELECT task_id, status FROM background_tasks")) == {
            "blocked": "running",
            "child-task": "running",
        }


def test_threads_forking_at_once_each_let_go_of_what_they_took(db_path: Path) -> None:
    report = json.loads(run_helper("forker.py", "threads", str(db_path), timeout=120))
    assert report == {"slow_forks": [], "wrote_after": True}


def _fork_children(
    db_path: Path, mode: str, forks: int, *, timeout: float
) -> tuple[dict[str, Any], set[str]]:
    """Run forker.py ``mode`` with ``forks`` children, check that every child exited 0
    (none was killed after hanging) and that the file is intact; return the report and
    every task id a fresh connection finds."""
    report = json.loads(run_helper("forker.py", mode, str(db_path), str(forks), timeout=timeout))
    assert report["statuses"] == [0] * forks
    with sqlite3.connect(db_path) as connection:
        ids = {row[0] for row in connection.execute("SELECT task_id FROM background_tasks")}
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return report, ids
