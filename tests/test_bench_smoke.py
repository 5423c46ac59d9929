"""The benchmark cannot rot: its tiny smoke run (no peers, no timing asserted) must work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path: Path) -> None:
    output = tmp_path / "smoke.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--quick",
            "--no-venv",
            "--subjects",
            "orbiter,memory,dict-list,stdlib-percall,stdlib-batch,stdlib-drain,stdlib-ack",
            "--tmpdir",
            str(tmp_path),
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Issue 5 bars" in completed.stdout
    results = json.loads(output.read_text())
    assert results, "no results recorded"
