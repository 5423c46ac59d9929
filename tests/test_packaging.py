"""The built wheel works on its own: it carries the migrations the handler runs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import asyncio, sqlite3, sys
import orbiter
from orbiter import migrate
from orbiter._internal.background import BackgroundTaskHandler
assert orbiter.__file__.startswith(sys.argv[2]), orbiter.__file__
assert str(migrate.migrations_path()).startswith(sys.argv[2]), migrate.migrations_path()
with BackgroundTaskHandler(database=sys.argv[1]) as handler:
    handler.submit("a", "run", payload={"k": 1})
    asyncio.run(handler.handle_result("a", 2, is_main_running=False))
print(sqlite3.connect(sys.argv[1]).execute("select version_num from alembic_version").fetchone()[0])
"""


def test_wheel_ships_migrations_and_runs_them(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("orbiter_background-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "orbiter/_migrations/env.py" in names
    assert any(n.startswith("orbiter/_migrations/versions/0001_") for n in names)
    assert "orbiter/py.typed" in names
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "w.db"), str(target)],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    from orbiter.store.schema import HEAD_REVISION

    assert completed.stdout.strip() == HEAD_REVISION
