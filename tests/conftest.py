"""Shared fixtures: a fresh SQLite file per test, and a handler per backend."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orbiter._internal.background import BackgroundTaskHandler

HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A path for a new SQLite database file (not created yet)."""
    return tmp_path / "tasks.db"


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run a test against the in-memory handler and the durable one."""
    return str(request.param)


@pytest.fixture
def make_handler(backend: str, db_path: Path) -> Iterator[Callable[..., BackgroundTaskHandler]]:
    """Build handlers for the current backend; all are closed after the test."""
    made: list[BackgroundTaskHandler] = []

    def make(**kwargs: Any) -> BackgroundTaskHandler:
        if backend == "sqlite":
            kwargs.setdefault("database", db_path)
        handler = BackgroundTaskHandler(**kwargs)
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.close()


@pytest.fixture
def handler(make_handler: Callable[..., BackgroundTaskHandler]) -> BackgroundTaskHandler:
    """A handler for the current backend."""
    return make_handler()


@pytest.fixture
async def durable(db_path: Path) -> AsyncIterator[BackgroundTaskHandler]:
    """A durable handler on a fresh file."""
    handler = BackgroundTaskHandler(database=db_path)
    yield handler
    await handler.aclose()


def run_helper(script: str, *args: str, timeout: float = 60, check: bool = True) -> str:
    """Run ``tests/helpers/<script>`` in a fresh Python process; return its stdout."""
    completed = subprocess.run(
        [sys.executable, str(HELPERS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    if check and completed.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(args)} exited {completed.returncode}:\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
    return completed.stdout
