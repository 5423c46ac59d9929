"""Profile the handler in one workload with py-spy (all threads) and summarise where time goes.

    bench/.venv/bin/python bench/profile.py w1 --sync FULL --n 3000
    bench/.venv/bin/python bench/profile.py w2 --concurrency 1000 --n 20000
    bench/.venv/bin/python bench/profile.py w3 --n 50000

Runs the same child as ``run.py`` under ``py-spy record --threads --idle`` (py-spy is in
``bench/requirements.txt``; it needs ptrace, i.e. root or ``CAP_SYS_PTRACE``) and prints,
per thread, the share of samples in each layer (orbiter, SQLAlchemy, sqlite3, asyncio,
waiting) and the functions with the most self and inclusive time. The raw collapsed
stacks are kept in ``bench/results/profile-<workload>-<sync>.txt`` for a flame graph.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

#: Frame-path fragments that name a layer, checked innermost frame first.
LAYERS = (
    ("sqlite3 (C, incl. fsync)", ("execute (sqlite3", "commit (sqlite3", "cursor.execute")),
    ("orbiter", ("orbiter/",)),
    ("SQLAlchemy", ("sqlalchemy/",)),
    ("asyncio / threading", ("asyncio/", "threading.py", "concurrent/futures")),
)


def _child(spec: dict[str, object]) -> list[str]:
    return [sys.executable, str(BENCH / "child.py"), json.dumps(spec)]


def record(spec: dict[str, object], output: Path, rate: int) -> None:
    """Run the measurement child under py-spy, writing collapsed stacks to ``output``."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [
        py_spy,
        "record",
        "--threads",
        "--idle",
        "--format",
        "raw",
        "--rate",
        str(rate),
        "--output",
        str(output),
        "--",
        *_child(spec),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:])


def _layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, markers in LAYERS:
            if any(marker in frame for marker in markers):
                return name
    return "other (benchmark, json, stdlib)"


def _waiting(frames: list[str]) -> bool:
    leaf = frames[-1] if frames else ""
    return any(
        word in leaf
        for word in ("wait (threading", "select (selectors", "_wait_for_tstate_lock", "acquire")
    )


def summarise(raw: Path, top: int) -> None:
    """Per thread: samples by layer, and the top self/inclusive functions."""
    threads: dict[str, Counter[str]] = {}
    selfs: dict[str, Counter[str]] = {}
    inclusive: dict[str, Counter[str]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0]
        count = int(count_text)
        layer = "waiting (idle)" if _waiting(frames) else _layer(frames)
        threads.setdefault(thread, Counter())[layer] += count
        selfs.setdefault(thread, Counter())[frames[-1]] += count
        for frame in set(frames[1:]):
            inclusive.setdefault(thread, Counter())[frame] += count
    for thread, layers in sorted(threads.items(), key=lambda item: -sum(item[1].values())):
        total = sum(layers.values())
        print(f"\n== {thread}: {total} samples")
        for layer, count in layers.most_common():
            print(f"   {100 * count / total:5.1f}%  {layer}")
        print("   top self:")
        for frame, count in selfs[thread].most_common(top):
            print(f"   {100 * count / total:5.1f}%  {frame}")
        print("   top inclusive (orbiter/sqlalchemy):")
        interesting = [
            (f, c)
            for f, c in inclusive[thread].most_common()
            if "orbiter/" in f or "sqlalchemy/" in f
        ]
        for frame, count in interesting[:top]:
            print(f"   {100 * count / total:5.1f}%  {frame}")


def main(argv: list[str]) -> int:
    """Prepare the workload's file, record it under py-spy, print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workload", choices=("w1", "w2", "w3", "open", "sync"))
    parser.add_argument("--sync", default="FULL")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    states = {
        "w1": "empty",
        "w2": "running",
        "w3": "pending",
        "open": "finished",
        "sync": "running",
    }
    directory = Path(tempfile.mkdtemp(prefix="orbiter-profile-"))
    try:
        prepare = {
            "action": "prepare",
            "dir": str(directory),
            "family": "handler",
            "state": states[args.workload],
            "n": args.n,
            "extra_running": 200,
        }
        subprocess.run(_child(prepare), check=True, capture_output=True)
        spec = {
            "action": "measure",
            "workload": args.workload,
            "subject": "orbiter",
            "synchronous": args.sync,
            "n": args.n,
            "concurrency": args.concurrency,
            "rounds": 200,
            "dir": str(directory),
        }
        RESULTS.mkdir(exist_ok=True)
        output = RESULTS / f"profile-{args.workload}-{args.sync.lower()}.txt"
        record(spec, output, args.rate)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    summarise(output, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
