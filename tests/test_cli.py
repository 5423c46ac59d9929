"""``orbiter-bg`` end to end on real files.

Every subcommand runs through the real entry point (``python -m orbiter.cli`` in a fresh
process, and once through the installed ``orbiter-bg`` script): see the ``test_entry_*``
tests. The detailed cases (filters, ``--json`` shapes, errors) call the same
``orbiter.cli.main(argv)`` in-process, as a CLI runner would, to keep the file fast.

One database is populated once with the library (then some rows are aged with SQL so the
age filters and purge have something to find); each test works on its own copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from orbiter._internal.background import BackgroundTaskError, BackgroundTaskHandler
from orbiter.cli import main
from orbiter.migrate import downgrade
from orbiter.store.codec import TIMESTAMP_FORMAT
from orbiter.store.schema import HEAD_REVISION, KNOWN_REVISIONS

BIN = Path(sys.executable).parent
NASTY = "evil\x1b]0;pwned\x07\x1b[31m[bold red]markup[/]\u202e\x9b2J"
ENV_VAR = "ORBITER_BG_DATABASE"

# The template: task id -> (parent, outcome). Outcomes: hot, wakeup (pending), failed, running.
TASKS = {
    "a1": ("run-a", "hot"),
    "a2": ("run-a", "wakeup"),
    "a3": ("run-a", "failed"),
    "a4": ("run-a", "running"),
    "b1": ("run-b", "wakeup"),
    "b2": ("run-b", "hot"),
    "old-ok": ("run-old", "hot"),
    "old-failed": ("run-old", "failed"),
    "old-pending": ("run-old", "wakeup"),
    "old-running": ("run-old", "running"),
}
AGED = {"old-ok", "old-failed", "old-pending", "old-running"}  # made 3 days old


@dataclass
class Ran:
    """One ``orbiter-bg`` run: exit status and captured output."""

    returncode: int
    stdout: str
    stderr: str


def _environment(env: dict[str, str] | None) -> dict[str, str]:
    """The environment of a run: no ORBITER_BG_DATABASE or FORCE_COLOR unless given."""
    base = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "FORCE_COLOR")}
    return {**base, "COLUMNS": "200", **(env or {})}


def entry(*args: str | Path, env: dict[str, str] | None = None) -> Ran:
    """Run ``python -m orbiter.cli ARGS`` in a new process (the real entry point)."""
    done = subprocess.run(
        [sys.executable, "-m", "orbiter.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=_environment(env),
        timeout=60,
        check=False,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def cli(*args: str | Path, env: dict[str, str] | None = None) -> Ran:
    """Run ``orbiter.cli.main(ARGS)`` in this process, capturing its output."""
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, _environment(env), clear=True),
        redirect_stdout(out),
        redirect_stderr(err),
    ):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return Ran(code, out.getvalue(), err.getvalue())


def ok(*args: str | Path, run: Any = cli, **kwargs: Any) -> str:
    """Run a command that must succeed with nothing on stderr; return stdout."""
    done = run(*args, **kwargs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    return str(done.stdout)


def ok_json(*args: str | Path, **kwargs: Any) -> Any:
    return json.loads(ok(*args, "--json", **kwargs))


def fails(*args: str | Path, code: int = 1, run: Any = cli, **kwargs: Any) -> str:
    """Run a command that must fail with ``code`` and one clean line on stderr."""
    done = run(*args, **kwargs)
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("orbiter-bg"), done.stderr
    return str(done.stderr)


async def _populate(path: Path) -> None:
    async with BackgroundTaskHandler(database=path) as handler:
        for task_id, (parent, outcome) in TASKS.items():
            payload = {"id": task_id, "note": NASTY if task_id == "b2" else "plain"}
            handler.submit(task_id, parent, payload=payload)
            if outcome in ("hot", "wakeup"):
                result = {"value": task_id.upper(), "text": NASTY if task_id == "b2" else "ok"}
                await handler.handle_result(task_id, result, is_main_running=outcome == "hot")
            elif outcome == "failed":
                handler.handle_error(task_id, f"{task_id} broke")


def _age_rows(path: Path, ids: set[str], days: int) -> None:
    stamp = (datetime.now(UTC) - timedelta(days=days)).strftime(TIMESTAMP_FORMAT)
    with sqlite3.connect(path) as connection:
        for task_id in ids:
            connection.execute(
                "UPDATE background_tasks SET created_at = ?, updated_at = ? WHERE task_id = ?",
                (stamp, stamp, task_id),
            )
    connection.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "tasks.db"
    asyncio.run(_populate(path))
    _age_rows(path, AGED, days=3)
    return path


@pytest.fixture
def db(template: Path, tmp_path: Path) -> Path:
    """A private copy of the populated database."""
    copy = tmp_path / "tasks.db"
    for suffix in ("", "-wal", "-shm"):
        source = template.with_name(template.name + suffix)
        if source.exists():
            shutil.copy(source, copy.with_name(copy.name + suffix))
    return copy


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _revision(path: Path) -> str:
    with sqlite3.connect(path) as connection:
        (revision,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    connection.close()
    return str(revision)


# -- the real entry points -------------------------------------------------------------


ENTRY_CASES = {
    "tasks": (["tasks", "--status", "success"], "a1"),
    "show": (["show", "b2"], '"value": "B2"'),
    "pending": (["pending"], "old-pending"),
    "stats": (["stats"], "running"),
    "migrate-show": (["migrate", "--show"], f"revision {HEAD_REVISION} (up to date)"),
    "migrate": (["migrate"], "already at revision"),
    "drain": (["drain", "--parent", "run-b"], "drained 1 result(s)"),
    "requeue": (["requeue", "a1"], "requeued a1"),
    "purge-dry-run": (["purge", "--older-than", "2d", "--dry-run"], "would delete 2"),
    "purge": (["purge", "--older-than", "2d"], "deleted 2 finished task(s)"),
}


@pytest.mark.parametrize("case", list(ENTRY_CASES))
def test_entry_every_subcommand(db: Path, case: str) -> None:
    args, expected = ENTRY_CASES[case]
    assert expected in ok(*args, "--db", db, run=entry)


def test_entry_json_and_errors(db: Path, tmp_path: Path) -> None:
    document = json.loads(ok("tasks", "--db", db, "--json", "--limit", "3", run=entry))
    assert document["total"] == len(TASKS) and len(document["tasks"]) == 3
    assert "no database at" in fails("stats", "--db", tmp_path / "absent.db", run=entry)
    assert "invalid age" in fails("tasks", "--db", db, "--older-than", "1y", code=2, run=entry)
    assert ENV_VAR in fails("pending", code=2, run=entry)


def test_entry_installed_console_script(db: Path) -> None:
    script = BIN / "orbiter-bg"
    if not script.exists():
        pytest.skip("the orbiter-bg script is not installed in this environment")
    done = subprocess.run(
        [str(script), "stats", "--db", str(db), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"] == len(TASKS)


def test_help_lists_every_command() -> None:
    out = ok("--help")
    for command in ("demo", "tasks", "show", "pending", "stats", "migrate", "drain", "requeue"):
        assert command in out
    assert "purge" in out
    assert ok("--version").startswith("orbiter-bg ")


def test_no_command_is_a_usage_error() -> None:
    fails(code=2)


@pytest.mark.parametrize("where", ["before", "after"])
def test_demo_refuses_json_instead_of_ignoring_it(tmp_path: Path, where: str) -> None:
    demo_file = tmp_path / "demo.db"
    args: list[str | Path] = ["demo", "--db", demo_file]
    args = ["--json", *args] if where == "before" else [*args, "--json"]
    assert "demo does not take --json" in fails(*args, code=2)
    assert not demo_file.exists()  # refused before anything ran


# -- tasks -----------------------------------------------------------------------------


def test_tasks_json_shape_and_newest_first(db: Path) -> None:
    document = ok_json("tasks", "--db", db)
    assert list(document) == ["total", "limit", "offset", "tasks"]
    assert document["total"] == len(TASKS)
    assert (document["limit"], document["offset"]) == (50, 0)
    first = document["tasks"][0]
    assert list(first) == [
        "task_id",
        "parent_task_id",
        "status",
        "merge_mode",
        "created_at",
        "updated_at",
        "duration_s",
        "pending",
    ]
    created = [item["created_at"] for item in document["tasks"]]
    assert created == sorted(created, reverse=True)
    assert all(stamp.endswith("Z") for stamp in created)
    assert document["tasks"][-1]["task_id"] in AGED  # the aged rows are the oldest
    by_id = {item["task_id"]: item for item in document["tasks"]}
    assert by_id["a2"]["pending"] is True and by_id["a2"]["merge_mode"] == "wakeup"
    assert by_id["a1"]["pending"] is False and by_id["a1"]["duration_s"] >= 0
    assert by_id["a4"]["status"] == "running" and by_id["a4"]["duration_s"] is None


def test_tasks_filters(db: Path) -> None:
    def ids(*args: str) -> set[str]:
        return {item["task_id"] for item in ok_json("tasks", "--db", db, *args)["tasks"]}

    assert ids("--status", "failed") == {"a3", "old-failed"}
    assert ids("--status", "failed", "--status", "running") == {
        "a3",
        "a4",
        "old-failed",
        "old-running",
    }
    assert ids("--parent", "run-b") == {"b1", "b2"}
    assert ids("--older-than", "2d") == AGED
    assert ids("--newer-than", "1h") == set(TASKS) - AGED
    assert ids("--older-than", "1d", "--status", "success") == {"old-ok", "old-pending"}
    assert ids("--parent", "nobody") == set()


def test_tasks_paging(db: Path) -> None:
    pages = [ok_json("tasks", "--db", db, "--limit", "4", "--offset", str(n)) for n in (0, 4, 8)]
    seen = [item["task_id"] for page in pages for item in page["tasks"]]
    assert [len(page["tasks"]) for page in pages] == [4, 4, 2]
    assert sorted(seen) == sorted(TASKS)
    assert all(page["total"] == len(TASKS) for page in pages)


def test_tasks_table(db: Path) -> None:
    out = ok("tasks", "--db", db, "--parent", "run-a")
    for task_id in ("a1", "a2", "a3", "a4"):
        assert task_id in out
    assert "1-4 of 4, newest first" in out
    assert "b1" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "10x"], "invalid age"),
        (["--newer-than", ""], "invalid age"),
        (["--older-than=-5m"], "invalid age"),
        (["--status", "done"], "invalid choice"),
        (["--limit", "0"], "at least 1"),
        (["--offset", "-1"], "at least 0"),
        (["--limit", "many"], "invalid integer"),
        (["--bogus"], "unrecognized arguments"),
        # Beyond a date or a SQLite integer: usage errors, not tracebacks.
        (["--older-than", "1000000d"], "too large"),
        (["--newer-than", "99999999999999w"], "too large"),
        (["--limit", "99999999999999999999999"], "at most 9223372036854775807"),
        (["--offset", "9223372036854775808"], "at most 9223372036854775807"),
    ],
)
def test_tasks_bad_arguments(db: Path, args: list[str], message: str) -> None:
    assert message in fails("tasks", "--db", db, *args, code=2)


def test_the_largest_age_and_limit_are_accepted(db: Path) -> None:
    assert "a1" in ok("tasks", "--db", db, "--newer-than", "52178w", "--limit", str(2**63 - 1))
    assert "too large" in fails("purge", "--db", db, "--older-than", "800000d", "--dry-run", code=2)


# -- show ------------------------------------------------------------------------------


def test_show_json(db: Path) -> None:
    document = ok_json("show", "a2", "--db", db)
    assert list(document) == [
        "task_id",
        "parent_task_id",
        "status",
        "merge_mode",
        "created_at",
        "updated_at",
        "duration_s",
        "pending",
        "pending_seq",
        "enqueued_at",
        "payload",
        "result",
        "error",
    ]
    assert document["payload"] == {"id": "a2", "note": "plain"}
    assert document["result"] == {"value": "A2", "text": "ok"}
    assert document["pending"] is True and document["pending_seq"] >= 1
    failed = ok_json("show", "a3", "--db", db)
    assert failed["error"] == "a3 broke" and failed["result"] is None


def test_show_pretty_prints(db: Path) -> None:
    out = ok("show", "a1", "--db", db)
    assert '"value": "A1"' in out  # indented JSON, one key per line
    assert "payload" in out and "result" in out and "run-a" in out


def test_show_unknown_task(db: Path) -> None:
    assert "no task 'nope'" in fails("show", "nope", "--db", db)


@pytest.mark.parametrize("force_color", [False, True])
def test_stored_text_cannot_inject(db: Path, force_color: bool) -> None:
    env = {"FORCE_COLOR": "1", "TERM": "xterm-256color"} if force_color else {}
    for args in (["show", "b2"], ["tasks"], ["pending", "--parent", "run-b"], ["drain"]):
        out = ok(*args, "--db", db, env=env)
        assert "\x1b]0;pwned" not in out  # no terminal title change
        assert "\x9b" not in out and "\u202e" not in out and "\x07" not in out
        if not force_color:
            assert "\x1b" not in out
    shown = ok("show", "b2", "--db", db)
    assert "[bold red]markup[/]" in shown  # printed literally, not as rich markup
    assert "\\u001b]0;pwned" in shown  # the escape is made visible


# -- pending, stats --------------------------------------------------------------------


def test_pending(db: Path) -> None:
    document = ok_json("pending", "--db", db)
    assert list(document) == ["total", "limit", "offset", "pending"]
    items = document["pending"]
    assert [item["task_id"] for item in items] == ["a2", "b1", "old-pending"]  # enqueue order
    assert list(items[0]) == [
        "seq",
        "task_id",
        "parent_task_id",
        "status",
        "merge_mode",
        "enqueued_at",
        "result",
        "error",
        "held_by",
        "held_since",
    ]
    assert [item["held_by"] for item in items] == [None, None, None]
    assert [item["seq"] for item in items] == sorted(item["seq"] for item in items)
    assert items[0]["result"] == {"value": "A2", "text": "ok"}
    only_b = ok_json("pending", "--db", db, "--parent", "run-b")
    assert [item["task_id"] for item in only_b["pending"]] == ["b1"] and only_b["total"] == 1
    assert "a2" in ok("pending", "--db", db)


async def test_pending_shows_which_drain_holds_an_item(db: Path) -> None:
    handler = BackgroundTaskHandler(database=db)
    owner_id = handler._store.identity.owner_id  # type: ignore[attr-defined]
    drain = handler.drain_pending()
    first = await anext(drain)  # the drain holds its whole batch (all three) from here
    held = ok_json("pending", "--db", db)["pending"]
    assert first.task_id == held[0]["task_id"]
    assert {item["held_by"] for item in held} == {f"{owner_id}/1"}
    assert all(item["held_since"].endswith("Z") for item in held)
    assert "held by" in ok("pending", "--db", db)
    await drain.aclose()  # stopped early: the item in hand and the rest are free again
    free = ok_json("pending", "--db", db)["pending"]
    assert [item["held_by"] for item in free] == [None, None, None]
    assert "held by" not in ok("pending", "--db", db)
    await handler.aclose()


def test_a_file_name_that_is_not_utf8(db: Path) -> None:
    # What os.fsdecode makes of a byte 0xFF in a file name: a lone surrogate.
    odd = db.with_name(os.fsdecode(b"tasks-\xff.db"))
    for suffix in ("", "-wal", "-shm"):
        if (source := db.with_name(db.name + suffix)).exists():
            source.rename(odd.with_name(odd.name + suffix))
    assert ok_json("stats", "--db", odd)["total"] == len(TASKS)
    assert ok_json("tasks", "--db", odd)["total"] == len(TASKS)


#: Read commands a monitoring user runs; and write commands, which such a user is refused.
UNPRIVILEGED_READS = [("stats",), ("tasks",), ("pending",), ("orphans",), ("migrate", "--show")]
UNPRIVILEGED_WRITES = [("drain",), ("orphans", "--settle", "fail"), ("migrate",)]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root to become an unprivileged user",
)
@pytest.mark.parametrize(
    "directory_mode",
    [0o755, 0o1777],
    ids=["directory-read-only", "only-the-file-read-only"],
)
def test_read_commands_of_a_user_who_cannot_write_the_file_leave_nothing_beside_it(
    db: Path, directory_mode: int
) -> None:
    # In a shared directory (1777) SQLite would create a -wal and -shm of the reader's,
    # which the reader cannot remove (only a connection that may write the file does),
    # and which would then stop the file's owner from writing it.
    with BackgroundTaskHandler(database=db):
        pass  # a clean close folds the log into the file and removes it
    shared = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is private to root
    try:
        shared.chmod(directory_mode)
        target = shared / "tasks.db"
        shutil.copy(db, target)
        target.chmod(0o644)  # root's file: others may read it, not write it
        expected = [ok_json(*command, "--db", db) for command in UNPRIVILEGED_READS]
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: an unprivileged reader such as a monitoring user
            try:
                os.close(read_end)
                os.setgid(65534)
                os.setuid(65534)
                answers = []
                for command in UNPRIVILEGED_READS + UNPRIVILEGED_WRITES:
                    done = cli(*command, "--db", target, "--json")
                    answers.append([done.returncode, done.stdout, done.stderr])
                os.write(write_end, json.dumps(answers).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            answers = json.loads(pipe.read() or '[[-1, "", "the child said nothing"]]')
        os.waitpid(pid, 0)
        reads, writes = answers[: len(expected)], answers[len(expected) :]
        for (code, out, err), wanted in zip(reads, expected, strict=True):
            assert code == 0, err
            if "database" in wanted:
                wanted["database"] = str(target.resolve())
            assert json.loads(out) == wanted
        assert len(writes) == len(UNPRIVILEGED_WRITES), answers
        for code, _out, err in writes:
            assert (code, err.count("\n")) == (1, 1), err
            assert "read-only" in err
        assert [path.name for path in shared.iterdir()] == ["tasks.db"]  # nothing created
        with BackgroundTaskHandler(database=target) as handler:  # the owner still writes
            handler.submit("after-the-readers", "run")
    finally:
        shutil.rmtree(shared)


def test_db_and_json_may_come_before_the_command(db: Path, tmp_path: Path) -> None:
    expected = ok_json("stats", "--db", db)
    assert json.loads(ok("--db", db, "stats", "--json")) == expected
    assert json.loads(ok("--json", "--db", db, "stats")) == expected
    # Given in both places, the one after the command wins.
    assert (
        json.loads(ok("--db", tmp_path / "nowhere.db", "stats", "--db", db, "--json")) == expected
    )


def test_stats(db: Path) -> None:
    document = ok_json("stats", "--db", db)
    assert document == {
        "database": str(db.resolve()),
        "schema_revision": HEAD_REVISION,
        "total": len(TASKS),
        "by_status": {"init": 0, "running": 2, "success": 6, "failed": 2, "timeout": 0},
        "pending": 3,
        "oldest_pending_at": document["oldest_pending_at"],
    }
    assert document["oldest_pending_at"].endswith("Z")
    out = ok("stats", "--db", db)
    assert "success" in out and "pending" in out


def test_database_from_environment(db: Path) -> None:
    assert ok_json("stats", env={ENV_VAR: str(db)})["total"] == len(TASKS)
    assert ok_json("stats", env={ENV_VAR: f"sqlite:///{db}"})["total"] == len(TASKS)


def test_read_commands_leave_nothing_beside_a_closed_file(db: Path) -> None:
    # Reading a WAL file makes a -wal and a -shm beside it; with no handler open, the
    # read command removes them again (through SQLite, which folds the empty log).
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]
    before = _digest(db)
    for command in (
        ["tasks"],
        ["pending"],
        ["stats"],
        ["migrate", "--show"],
        ["purge", "--older-than", "1d", "--dry-run"],
    ):
        ok(*command, "--db", db)
        assert sorted(p.name for p in db.parent.iterdir()) == [db.name], command
    assert _digest(db) == before


@pytest.mark.parametrize(
    "command",
    [
        ["stats"],
        ["tasks"],
        ["pending"],
        ["show", "t0"],
        ["orphans"],
        ["migrate", "--show"],
        ["migrate"],
        ["purge", "--older-than", "1d", "--dry-run"],
        ["purge", "--older-than", "1d"],
        ["requeue", "t0"],
        ["drain"],
        ["orphans", "--settle", "fail"],
    ],
    ids=" ".join,
)
def test_every_command_refuses_a_damaged_file_as_a_handler_does(
    db: Path, command: list[str]
) -> None:
    # Garbage over a page that no command reads on its way (counts, the schema, the
    # revision): the root of drain_slots' index, empty here. Only the check a handler
    # makes at open finds it.
    with sqlite3.connect(db) as connection:
        (root,) = connection.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_drain_slots_1'"
        ).fetchone()
    connection.close()
    data = bytearray(db.read_bytes())
    data[(root - 1) * 4096 : root * 4096] = bytes(range(256)) * 16
    db.write_bytes(bytes(data))
    with pytest.raises(BackgroundTaskError, match="corrupt"):
        BackgroundTaskHandler(database=db)
    before = _digest(db)
    assert "corrupt" in fails(*command, "--db", db)
    assert _digest(db) == before
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]


async def test_read_commands_leave_a_live_handlers_files_alone(db: Path) -> None:
    async with BackgroundTaskHandler(database=db) as handler:
        handler.submit("live", "run")
        assert ok_json("stats", "--db", db)["total"] == len(TASKS) + 1
        assert db.with_name(db.name + "-shm").exists()
        # The handler goes on writing and reading through its log after the read.
        await handler.handle_result("live", {"ok": True}, is_main_running=False)
        assert handler.get_task("live").result == {"ok": True}  # type: ignore[union-attr]
        assert "live" in [item["task_id"] for item in ok_json("pending", "--db", db)["pending"]]


# -- migrate ---------------------------------------------------------------------------


def test_migrate_show_and_noop(db: Path) -> None:
    before = _digest(db)
    assert ok_json("migrate", "--show", "--db", db) == {
        "database": str(db.resolve()),
        "previous_revision": HEAD_REVISION,
        "revision": HEAD_REVISION,
        "head": HEAD_REVISION,
        "up_to_date": True,
    }
    assert f"revision {HEAD_REVISION} (up to date)" in ok("migrate", "--show", "--db", db)
    assert _digest(db) == before
    assert "already at revision" in ok("migrate", "--db", db)


def test_older_schema_is_refused_then_migrated(db: Path) -> None:
    older = KNOWN_REVISIONS[-2]
    downgrade(str(db), older)
    for args in (["tasks"], ["stats"], ["show", "a1"], ["pending"], ["requeue", "a1"]):
        message = fails(*args, "--db", db)
        assert f"revision {older}" in message and "orbiter-bg migrate --db" in message
    assert _revision(db) == older  # the read commands changed nothing
    shown = ok_json("migrate", "--show", "--db", db)
    assert shown["revision"] == older and shown["up_to_date"] is False
    upgraded = ok_json("migrate", "--db", db)
    assert (upgraded["previous_revision"], upgraded["revision"]) == (older, HEAD_REVISION)
    assert ok_json("stats", "--db", db)["total"] == len(TASKS)


def test_migrate_creates_a_new_database(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    out = ok("migrate", "--db", path)
    assert "created" in out and HEAD_REVISION in out
    assert _revision(path) == HEAD_REVISION
    assert ok_json("stats", "--db", path)["total"] == 0
    other = tmp_path / "other.db"
    document = ok_json("migrate", "--db", other)
    assert (document["previous_revision"], document["revision"]) == (None, HEAD_REVISION)
    assert other.stat().st_mode & 0o077 == 0  # results may hold secrets: owner only
    assert "does not exist" in fails("migrate", "--db", tmp_path / "no-such-dir" / "x.db")


def test_views(db: Path) -> None:
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        rows = {row["task_id"]: row for row in connection.execute("SELECT * FROM v_tasks")}
        pending = [row["task_id"] for row in connection.execute("SELECT * FROM v_pending")]
    connection.close()
    assert set(rows) == set(TASKS)
    a2 = rows["a2"]
    assert a2["is_pending"] == 1 and a2["status"] == "success" and a2["duration_s"] >= 0
    assert len(a2["created_utc"]) == 19  # YYYY-MM-DD HH:MM:SS
    assert rows["a4"]["duration_s"] is None
    assert rows["old-ok"]["age_s"] > 2 * 86400
    assert pending == ["a2", "b1", "old-pending"]


# -- drain, requeue --------------------------------------------------------------------


def test_drain_everything(db: Path) -> None:
    document = ok_json("drain", "--db", db)
    assert document["count"] == 3
    assert [item["task_id"] for item in document["drained"]] == ["a2", "b1", "old-pending"]
    assert list(document["drained"][0]) == [
        "task_id",
        "parent_task_id",
        "status",
        "merge_mode",
        "result",
        "error",
    ]
    assert document["drained"][0]["result"] == {"value": "A2", "text": "ok"}
    assert ok_json("pending", "--db", db)["total"] == 0
    assert "drained 0 result(s)" in ok("drain", "--db", db)


def test_drain_one_parent(db: Path) -> None:
    out = ok("drain", "--db", db, "--parent", "run-a")
    assert "drained a2" in out and "drained 1 result(s)" in out
    left = ok_json("pending", "--db", db)
    assert [item["task_id"] for item in left["pending"]] == ["b1", "old-pending"]
    assert ok_json("drain", "--db", db, "--parent", "run-a")["count"] == 0


def test_requeue(db: Path) -> None:
    assert ok_json("requeue", "a1", "--db", db) == {
        "task_id": "a1",
        "requeued": True,
        "already_pending": False,
    }
    assert ok_json("pending", "--db", db)["pending"][-1]["task_id"] == "a1"
    assert "already pending" in ok("requeue", "a1", "--db", db)
    assert ok_json("pending", "--db", db)["total"] == 4
    drained = ok_json("drain", "--db", db)
    assert "a1" in [item["task_id"] for item in drained["drained"]]


@pytest.mark.parametrize(("task_id", "message"), [("a3", "is failed"), ("a4", "is running")])
def test_requeue_refuses_unfinished_or_failed(db: Path, task_id: str, message: str) -> None:
    assert message in fails("requeue", task_id, "--db", db)


def test_requeue_unknown(db: Path) -> None:
    assert "no task 'ghost'" in fails("requeue", "ghost", "--db", db)


# -- purge -----------------------------------------------------------------------------


def test_purge_dry_run_changes_nothing(db: Path) -> None:
    before = _digest(db)
    document = ok_json("purge", "--older-than", "2d", "--dry-run", "--db", db)
    assert list(document) == ["dry_run", "older_than", "cutoff", "count", "task_ids"]
    assert document["dry_run"] is True and document["older_than"] == "2d"
    assert sorted(document["task_ids"]) == ["old-failed", "old-ok"]  # not pending, not running
    out = ok("purge", "--older-than", "2d", "--dry-run", "--db", db)
    assert "would delete 2" in out and "old-ok" in out and "nothing was deleted" in out
    assert _digest(db) == before


def test_purge_deletes_old_finished_tasks(db: Path) -> None:
    document = ok_json("purge", "--older-than", "2d", "--db", db, "--batch-size", "1")
    assert document["dry_run"] is False
    assert sorted(document["task_ids"]) == ["old-failed", "old-ok"]
    remaining = {item["task_id"] for item in ok_json("tasks", "--db", db)["tasks"]}
    assert remaining == set(TASKS) - {"old-failed", "old-ok"}
    assert "deleted 0" in ok("purge", "--older-than", "2d", "--db", db)


def test_purge_everything_finished(db: Path) -> None:
    ok("drain", "--db", db)
    out = ok("purge", "--older-than", "0s", "--db", db, "--batch-size", "2")
    assert "deleted 8 finished task(s)" in out
    left = ok_json("stats", "--db", db)
    assert left["total"] == 2 and left["by_status"]["running"] == 2


@pytest.mark.parametrize("batch", ["1", "3", "1000"])
def test_purge_lists_what_it_deleted_oldest_first_as_a_dry_run_does(db: Path, batch: str) -> None:
    ok("drain", "--db", db)
    planned = ok_json("purge", "--older-than", "0s", "--dry-run", "--db", db)["task_ids"]
    done = ok_json("purge", "--older-than", "0s", "--batch-size", batch, "--db", db)
    assert len(planned) == 8 and done["task_ids"] == planned


def test_purge_needs_an_age(db: Path) -> None:
    assert "--older-than" in fails("purge", "--db", db, code=2)
    assert "invalid age" in fails("purge", "--older-than", "soon", "--db", db, code=2)


# -- the database is missing, not ours, or the wrong revision ---------------------------

READ_COMMANDS = [["tasks"], ["show", "x"], ["pending"], ["stats"], ["migrate", "--show"]]
ALL_COMMANDS = [*READ_COMMANDS, ["drain"], ["requeue", "x"], ["purge", "--older-than", "1d"]]


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_missing_file(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "absent.db"
    assert "no database at" in fails(*command, "--db", path)
    assert not path.exists()


@pytest.mark.parametrize("command", [["tasks"], ["drain"], ["migrate"]])
def test_not_sqlite(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "notes.db"
    path.write_text("just some text, not a database\n" * 10)
    assert "not a SQLite database" in fails(*command, "--db", path)
    assert path.read_text().startswith("just some text")


@pytest.mark.parametrize("command", [["stats"], ["migrate", "--show"], ["drain"], ["migrate"]])
def test_foreign_sqlite(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    connection.close()
    before = _digest(path)
    assert "not an orbiter-background one" in fails(*command, "--db", path)
    assert _digest(path) == before


@pytest.mark.parametrize("command", [["tasks"], ["migrate"], ["purge", "--older-than", "1d"]])
def test_newer_schema(db: Path, command: list[str]) -> None:
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    connection.close()
    assert "'9999'" in fails(*command, "--db", db)


def test_empty_file_says_to_migrate(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    assert "orbiter-bg migrate --db" in fails("stats", "--db", path)
    assert path.stat().st_size == 0


def test_empty_sqlite_database_says_to_migrate(tmp_path: Path) -> None:
    path = tmp_path / "blank.db"
    sqlite3.connect(path).execute("PRAGMA user_version = 1").connection.close()
    assert "orbiter-bg migrate --db" in fails("tasks", "--db", path)


def test_directory(tmp_path: Path) -> None:
    assert "is a directory" in fails("stats", "--db", tmp_path)


def test_no_database_given() -> None:
    assert ENV_VAR in fails("stats", code=2)


def test_unsupported_url() -> None:
    assert "only SQLite" in fails("stats", "--db", "postgresql://u@h/db", code=2)


def test_read_commands_leave_the_file_alone(db: Path) -> None:
    before = _digest(db)
    for command in (["tasks"], ["show", "a1"], ["pending"], ["stats"], ["migrate", "--show"]):
        ok(*command, "--db", db)
    assert _digest(db) == before


# -- orphans ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["text", "json"])
def test_orphans_lists_then_settles_tasks_of_a_killed_process(tmp_path: Path, form: str) -> None:
    from tests.test_crash import kill, read_until, start_child

    path = tmp_path / "orphans.db"
    child = start_child("submit", str(path), "100000")
    read_until(child, "submitted 2")
    kill(child)
    with BackgroundTaskHandler(database=path) as live:
        live.submit("alive", "run")  # its owner is alive while we look
        listed = json.loads(ok("orphans", "--db", path, "--json", run=entry))
        assert listed["settled"] is None and listed["count"] >= 3
        assert {"t0", "t1", "t2"} <= {item["task_id"] for item in listed["orphans"]}
        assert "alive" not in {item["task_id"] for item in listed["orphans"]}
        assert all("exited" in item["reason"] for item in listed["orphans"])
        if form == "text":
            out = ok("orphans", "--db", path, "--settle", "timeout", run=entry)
            assert f"{listed['count']} orphaned task(s) marked TIMEOUT" in out
        else:
            settled = json.loads(ok("orphans", "--db", path, "--settle", "timeout", "--json"))
            assert (settled["settled"], settled["count"]) == ("timeout", listed["count"])
            assert {item["status"] for item in settled["orphans"]} == {"timeout"}
            owner_of = {item["task_id"]: item["owner_id"] for item in listed["orphans"]}
            assert {item["task_id"]: item["owner_id"] for item in settled["orphans"]} == owner_of
            assert None not in owner_of.values()
        assert ok_json("orphans", "--db", path)["count"] == 0
        assert ok_json("stats", "--db", path)["by_status"]["timeout"] == listed["count"]
    assert "invalid choice" in fails("orphans", "--db", path, "--settle", "nuke", code=2)
