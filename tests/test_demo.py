"""``orbiter-bg demo``: the real crash-and-restore run, and its file safety rules."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from orbiter._internal.background import BackgroundTaskHandler
from orbiter.cli import main
from orbiter.cli_db import CliError
from orbiter.demo import (
    DEFAULT_NAME,
    RUN_PREFIX,
    _checks,
    _Tally,
    default_demo_path,
    prepare_demo_file,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the demo needs SIGKILL")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m orbiter.cli ARGS`` in a new process."""
    env = {k: v for k, v in os.environ.items() if k != "ORBITER_BG_DATABASE"}
    return subprocess.run(
        [sys.executable, "-m", "orbiter.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "120"},
        timeout=60,
        check=False,
    )


def run_main(*args: str | Path) -> tuple[int, str]:
    """``orbiter.cli.main(ARGS)`` in this process (for the cases that never spawn)."""
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def _count(out: str, label: str) -> int:
    match = re.search(rf"{re.escape(label)}\s*│\s*(\d+)", out)
    assert match, f"no {label!r} row in:\n{out}"
    return int(match.group(1))


def _make(path: Path, parent: str) -> None:
    async def fill() -> None:
        async with BackgroundTaskHandler(database=path) as handler:
            handler.submit("t1", parent, payload={"keep": True})

    asyncio.run(fill())


def test_demo_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "demo.db"
    done = run_cli("demo", "--db", path, "--seed", "7")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Traceback" not in done.stderr
    assert str(path) in out
    assert "SIGKILL" in out and "killed by SIGKILL (exit status -9)" in out
    assert "hot-merged" in out and "wake-up merged" in out
    submitted, hot = _count(out, "submitted"), _count(out, "hot-merged while the run was active")
    woken = _count(out, "wake-up merged by the new process")
    assert submitted == 8 and hot >= 1 and woken >= 1
    assert hot + woken == submitted
    assert _count(out, "pending in the file at SIGKILL") == woken
    assert _count(out, "lost") == 0
    assert "FAILED" not in out and "nothing lost" in out
    # The file tells the same story.
    stats = json.loads(run_cli("stats", "--db", path, "--json").stdout)
    assert stats["by_status"]["success"] == submitted and stats["pending"] == 0
    with sqlite3.connect(path) as connection:
        modes = dict(
            connection.execute("SELECT merge_mode, count(*) FROM background_tasks GROUP BY 1")
        )
    connection.close()
    assert modes == {"hot": hot, "wakeup": woken}


def test_demo_refuses_a_database_with_other_tasks(tmp_path: Path) -> None:
    path = tmp_path / "prod.db"
    _make(path, "real-run")
    before = path.read_bytes()
    code, err = run_main("demo", "--db", path)
    assert code == 1 and "refusing to delete" in err
    assert path.read_bytes() == before


def test_demo_refuses_a_file_that_is_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("precious\n")
    code, err = run_main("demo", "--db", path)
    assert code == 1 and "refusing to delete" in err
    assert path.read_text() == "precious\n"


def test_prepare_replaces_an_earlier_demo_file(tmp_path: Path) -> None:
    path = tmp_path / "demo.db"
    _make(path, f"{RUN_PREFIX}old")
    wal = path.with_name(path.name + "-wal")
    wal.write_bytes(b"")
    prepare_demo_file(path)
    assert not path.exists() and not wal.exists()
    prepare_demo_file(path)  # nothing there: fine


def test_prepare_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="directory"):
        prepare_demo_file(tmp_path)


def test_default_path_is_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_demo_path() == tmp_path / DEFAULT_NAME


def test_default_path_leaves_a_read_only_directory_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)  # read-only for root too, by the handler's own rule
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.chdir(locked)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert default_demo_path() == temp / DEFAULT_NAME


def test_demo_bad_arguments() -> None:
    code, err = run_main("demo", "--tasks", "1")
    assert code == 2 and "at least 2" in err


def test_a_lost_result_fails_the_checks() -> None:
    """The exit status is not vacuous: a tally with a missing result fails."""
    tally = _Tally(
        submitted=["t1", "t2", "t3"],
        hot=["t1"],
        queued=["t2", "t3"],
        reported_queued=2,
        pending_at_kill=2,
        host_status=-9,
        drained=["t2"],  # t3 never arrived
        file_statuses={"t1": "success", "t2": "success", "t3": "success"},
        file_modes={"t1": "hot", "t2": "wakeup", "t3": "wakeup"},
        pending_after=1,
        restore_status=0,
    )
    failed = {name for name, passed in _checks(tally) if not passed}
    assert "hot-merged + wake-up merged = submitted" in failed
    assert "nothing left in the pending queue" in failed
    complete = _Tally(**{**tally.__dict__, "drained": ["t2", "t3"], "pending_after": 0})
    assert all(passed for _, passed in _checks(complete))
