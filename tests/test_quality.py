"""The code stays lint-clean and strictly typed (part of the one test command)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*command: str) -> None:
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_ruff_lint() -> None:
    run(str(BIN / "ruff"), "check", "src", "tests", "migrations", "bench")


def test_ruff_format() -> None:
    run(str(BIN / "ruff"), "format", "--check", "src", "tests", "migrations", "bench")


def test_mypy_strict() -> None:
    run(str(BIN / "mypy"))
