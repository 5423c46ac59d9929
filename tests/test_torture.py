"""The torture test in its short forms (the long run is in the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TORTURE = Path(__file__).parent / "torture" / "torture.py"


def torture(tmp_path: Path, *args: str) -> dict[str, object]:
    completed = subprocess.run(
        [sys.executable, str(TORTURE), "--dir", str(tmp_path), "--seed", "7", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = dict(json.loads(completed.stdout))
    assert completed.returncode == 0, report
    return report


@pytest.mark.slow
def test_random_sigkills_lose_nothing(tmp_path: Path) -> None:
    report = torture(tmp_path, "--kills", "60", "--workers", "3", "--max-seconds", "300")
    assert report["kills"] == 60
    assert report["problem_count"] == 0
    assert report["integrity"] == "ok"
    assert int(report["wakeup_results"]) > 0 and int(report["drained"]) > 0  # type: ignore[call-overload]


@pytest.mark.slow
def test_four_processes_five_thousand_operations_each(tmp_path: Path) -> None:
    report = torture(tmp_path, "--kills", "0", "--ops", "5000", "--workers", "4")
    assert report["problem_count"] == 0
    assert report["redelivered_after_kill"] == 0
    assert int(report["submitted"]) > 4 * 5000 * 0.3  # type: ignore[call-overload]
