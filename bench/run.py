"""Run the orbiter-background benchmark suite (issue 5) and report medians and ratios.

    python3 bench/run.py --quick     # smoke run: tiny sizes, 1 repetition (CI)
    python3 bench/run.py             # full run: W3 and Open at 1M rows (~20 minutes)

The first run creates ``bench/.venv`` (the project, editable, plus the peers in
``bench/requirements.txt``) and re-runs itself inside it. Every measurement runs in a
fresh child process on a fresh copy of its starting file in a fresh temporary directory.
Results: a table on stdout, raw JSON and a Markdown table in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = BENCH / ".venv"
RESULTS = BENCH / "results"
STAMP = VENV / ".bench-installed"

HANDLER_SCHEMA = ("orbiter", "stdlib-percall", "stdlib-batch", "stdlib-drain", "stdlib-ack")
PEERS = ("persist-queue", "huey", "litequeue", "langgraph")
MEMORY = ("orbiter-memory", "dict-list")
#: Who takes part in W1/W2 (calls) and in W3 (draining).
CALLERS = ("orbiter", "stdlib-percall", "stdlib-batch", *PEERS)
DRAINERS = ("orbiter", "stdlib-drain", "stdlib-ack", "persist-queue", "huey", "litequeue")
SYNCS = ("FULL", "NORMAL")


# -- the benchmark's own environment ------------------------------------------------


def _venv_python() -> Path:
    """The benchmark venv's interpreter."""
    return VENV / "bin" / "python"


def _install_fingerprint() -> str:
    """Changes when what the venv must hold changes."""
    digest = hashlib.sha256()
    for path in (BENCH / "requirements.txt", REPO / "pyproject.toml"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    """Create ``bench/.venv`` and install the project and the peers, unless up to date."""
    fingerprint = _install_fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return
    if not _venv_python().exists():
        print(f"creating {VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    print("installing the project and bench/requirements.txt into it", file=sys.stderr)
    pip = [str(_venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run(
        [*pip, "-e", str(REPO), "-r", str(BENCH / "requirements.txt")],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"pip install failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    STAMP.write_text(fingerprint)


def in_venv() -> bool:
    """Whether this interpreter is the benchmark venv's."""
    return Path(sys.prefix).resolve() == VENV.resolve()


# -- what to run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One measured combination; run ``reps`` times, each in a fresh process and file."""

    workload: str  # w1 | w2 | w3 | open | sync
    subject: str
    synchronous: str  # FULL | NORMAL | "-" for in-memory subjects
    n: int
    reps: int
    concurrency: int = 0
    rounds: int = 0
    state: str | None = None  # what the starting file holds (see prepare.STATES)
    extra_running: int = 0
    label: str = ""  # tells cases of one workload apart in the report (e.g. "empty")

    @property
    def family(self) -> str:
        """Which prepared file the case starts from."""
        return "handler" if self.subject in HANDLER_SCHEMA else self.subject

    @property
    def key(self) -> str:
        """A stable name for the case in the results."""
        parts = [self.workload, self.label or f"n={self.n}", self.subject, self.synchronous]
        if self.concurrency:
            parts.insert(2, f"c={self.concurrency}")
        return " ".join(parts)


@dataclass(frozen=True)
class Config:
    """Sizes and repetitions (see ``parse_args``)."""

    quick: bool
    reps: int
    big_reps: int
    syncs: tuple[str, ...]
    subjects: tuple[str, ...]
    workloads: tuple[str, ...]
    w1_n: int
    w2_n: int
    concurrency: tuple[int, ...]
    w3_sizes: tuple[int, ...]
    big_peer_limit: int
    open_n: int
    sync_n: int
    sync_rounds: int
    timeout: float
    tmpdir: str | None


def _w1_cases(cfg: Config, subjects: tuple[str, ...]) -> list[Case]:
    """W1 for every durable subject and level."""
    cases = []
    for sync in cfg.syncs:
        for subject in subjects:
            state = "empty" if subject in HANDLER_SCHEMA else None
            cases.append(Case("w1", subject, sync, cfg.w1_n, cfg.reps, state=state))
    return cases


def _w2_cases(cfg: Config, subjects: tuple[str, ...]) -> list[Case]:
    """W2 for every durable subject, level and (handler only) concurrency."""
    cases = []
    for sync in cfg.syncs:
        for subject in subjects:
            # Only the handler overlaps calls; the others commit one call at a time
            # whatever the concurrency, so they run at the lowest one.
            levels = cfg.concurrency if subject == "orbiter" else cfg.concurrency[:1]
            for level in levels:
                cases.append(Case("w2", subject, sync, cfg.w2_n, cfg.reps, level, state="running"))
    return cases


def _w3_cases(cfg: Config, subjects: tuple[str, ...]) -> list[Case]:
    """W3 for every drainer, size and level (only the handler and stdlib at 1M)."""
    cases = []
    drainers = [s for s in subjects if s in DRAINERS]
    for size in cfg.w3_sizes:
        big = size > cfg.big_peer_limit
        for sync in cfg.syncs:
            for subject in drainers:
                if big and subject not in ("orbiter", "stdlib-drain", "stdlib-ack"):
                    continue  # peers take one or two commits per item: minutes at 1M
                reps = cfg.big_reps if big else cfg.reps
                cases.append(Case("w3", subject, sync, size, reps, state="pending"))
    return cases


def _open_cases(cfg: Config) -> list[Case]:
    """Open on the big file and on an empty one."""
    cases = []
    for sync in cfg.syncs:
        cases.append(
            Case("open", "orbiter", sync, cfg.open_n, cfg.reps, state="finished", label="full-file")
        )
        cases.append(Case("open", "orbiter", sync, 0, cfg.reps, state="empty", label="empty-file"))
    return cases


def _sync_cases(cfg: Config) -> list[Case]:
    """Sync-call latency while async completions are in flight."""
    return [
        Case(
            "sync",
            "orbiter",
            sync,
            cfg.sync_n,
            cfg.reps,
            cfg.concurrency[0],
            cfg.sync_rounds,
            state="running",
            extra_running=cfg.sync_rounds,
        )
        for sync in cfg.syncs
    ]


#: How many times the durable cases' sizes the in-memory cases run (W1, W2, W3): a call
#: costs microseconds there, and a case must last a few hundred ms to be measured at all
#: (at the durable sizes W2 took ~10 ms and W3 ~3 ms, and their ratios swung by 0.1-0.3).
MEMORY_SCALE = (100, 40, 20)
#: The most tasks an in-memory case holds (all stay in memory, with their values).
MEMORY_MAX_N = 500_000


def _memory_cases(cfg: Config, subjects: tuple[str, ...]) -> list[Case]:
    """W1-W3 for the in-memory subjects (no file, no level)."""
    durable = (cfg.w1_n, cfg.w2_n, cfg.w3_sizes[0])
    n1, n2, n3 = (min(n * k, MEMORY_MAX_N) for n, k in zip(durable, MEMORY_SCALE, strict=True))
    cases = []
    for subject in subjects:
        if "w1" in cfg.workloads:
            cases.append(Case("w1", subject, "-", n1, cfg.reps))
        if "w2" in cfg.workloads:
            cases.append(Case("w2", subject, "-", n2, cfg.reps, cfg.concurrency[0]))
        if "w3" in cfg.workloads:
            cases.append(Case("w3", subject, "-", n3, cfg.reps))
    return cases


def plan(cfg: Config) -> list[Case]:
    """Every case the configuration asks for."""
    callers = tuple(s for s in cfg.subjects if s in CALLERS)
    memory = tuple(s for s in cfg.subjects if s in MEMORY)
    cases: list[Case] = []
    if "w1" in cfg.workloads:
        cases += _w1_cases(cfg, callers)
    if "w2" in cfg.workloads:
        cases += _w2_cases(cfg, callers)
    if "w3" in cfg.workloads:
        cases += _w3_cases(cfg, tuple(s for s in cfg.subjects if s in DRAINERS))
    if "open" in cfg.workloads and "orbiter" in cfg.subjects:
        cases += _open_cases(cfg)
    if "sync" in cfg.workloads and "orbiter" in cfg.subjects:
        cases += _sync_cases(cfg)
    return cases + _memory_cases(cfg, memory)


# -- running children -----------------------------------------------------------------


def snapshot_source(root: Path) -> Path:
    """Copy ``src/orbiter`` and ``migrations/`` under ``root`` and point the children's
    ``PYTHONPATH`` at the copy, so every measurement of a run uses the same code even if
    the working tree changes meanwhile (the editable install would pick changes up)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    target = root / "snapshot"
    shutil.copytree(REPO / "src" / "orbiter", target / "src" / "orbiter", ignore=ignore)
    shutil.copytree(REPO / "migrations", target / "migrations", ignore=ignore)
    os.environ["PYTHONPATH"] = str(target / "src")
    return target


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``child.py`` with ``spec`` in a fresh process; its JSON outcome."""
    command = [sys.executable, str(BENCH / "child.py"), json.dumps(spec)]
    try:
        done = subprocess.run(
            command, cwd=BENCH, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    try:
        return dict(json.loads(lines[-1]))
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}


class Templates:
    """Starting files, each prepared once per run and copied for every measurement."""

    def __init__(self, root: Path, timeout: float) -> None:
        self._root = root
        self._timeout = timeout
        self._built: dict[tuple[str, str, int, int], Path] = {}

    def get(self, case: Case) -> Path:
        """The template directory for ``case`` (built on first use)."""
        assert case.state is not None
        key = (case.family, case.state, case.n, case.extra_running)
        if key not in self._built:
            directory = Path(tempfile.mkdtemp(prefix="template-", dir=self._root))
            spec = {
                "action": "prepare",
                "dir": str(directory),
                "family": case.family,
                "state": case.state,
                "n": case.n,
                "extra_running": case.extra_running,
            }
            started = time.perf_counter()
            outcome = run_child(spec, self._timeout * 2)
            if not outcome.get("ok"):
                raise RuntimeError(f"preparing {key} failed: {outcome.get('error')}")
            log(
                f"  prepared {case.family} {case.state} n={case.n} "
                f"in {time.perf_counter() - started:.1f} s"
            )
            self._built[key] = directory
        return self._built[key]


def log(message: str) -> None:
    """Progress, on stderr."""
    print(message, file=sys.stderr, flush=True)


def run_case(
    case: Case, rep: int, templates: Templates, root: Path, timeout: float
) -> dict[str, Any]:
    """One repetition of ``case`` in a fresh directory; the raw record."""
    directory = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    try:
        if case.state is not None:
            shutil.copytree(templates.get(case), directory, dirs_exist_ok=True)
            # Write the copy out before measuring: otherwise the kernel is still flushing
            # it (700 MB for the 1M-row files) and every fsync of the case pays for that.
            os.sync()
        spec = {"action": "measure", **asdict(case), "dir": str(directory)}
        started = time.perf_counter()
        outcome = run_child(spec, timeout)
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"case": case.key, **asdict(case), "rep": rep, "wall_s": wall, **outcome}


def _headline(record: dict[str, Any]) -> str:
    """One line about a finished run, for the progress log."""
    if not record.get("ok"):
        return ("skipped: " if record.get("skipped") else "FAILED: ") + str(record.get("error"))
    metrics = record["metrics"]
    for name in ("tasks_per_s", "completions_per_s", "items_per_s"):
        if name in metrics:
            return f"{metrics[name]:,.0f} {name.removesuffix('_per_s')}/s"
    if "open_ms" in metrics:
        return f"{metrics['open_ms']:.1f} ms to open + first call"
    return f"sync-call p99 {max(v for k, v in metrics.items() if k.endswith('_p99_ms')):.2f} ms"


def run_all(cases: list[Case], cfg: Config, root: Path) -> list[dict[str, Any]]:
    """Every repetition of every case, repetitions interleaved across cases."""
    templates = Templates(root, cfg.timeout)
    records: list[dict[str, Any]] = []
    total = sum(case.reps for case in cases)
    for rep in range(max(case.reps for case in cases)):
        for case in cases:
            if rep >= case.reps:
                continue
            record = run_case(case, rep, templates, root, cfg.timeout)
            records.append(record)
            log(
                f"[{len(records)}/{total}] {case.key} rep {rep + 1}: {_headline(record)}"
                f" ({record['wall_s']:.1f} s)"
            )
    return records


# -- configuration --------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    """Parse ``1,000,10_000`` style lists."""
    return tuple(int(part.replace("_", "")) for part in text.split(",") if part)


def _names(text: str) -> tuple[str, ...]:
    """Parse comma-separated names."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    """Command-line options; ``--quick`` changes the defaults of every size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="smoke run: tiny sizes, 1 repetition")
    add("--reps", type=int, help="repetitions per case (default 3; quick 1)")
    add("--big-reps", type=int, default=1, help="repetitions of the 1M-row W3 cases")
    add("--syncs", type=_names, default=SYNCS, help="FULL,NORMAL (default both)")
    add("--subjects", type=_names, default=HANDLER_SCHEMA + PEERS + MEMORY)
    add("--workloads", type=_names, default=("w1", "w2", "w3", "open", "sync"))
    add("--w1-n", type=int, help="tasks in W1 (default 1000; quick 50)")
    add("--w2-n", type=int, help="tasks in W2 (default 5000; quick 300)")
    add("--concurrency", type=_ints, help="W2 concurrency levels (default 100,1000; quick 100)")
    add(
        "--sizes",
        "--w3-sizes",
        dest="w3_sizes",
        type=_ints,
        help="W3 queue lengths (default 10000,1000000; quick 300)",
    )
    add("--open-n", type=int, help="finished tasks in the Open file (default 1000000)")
    add("--timeout", type=float, help="seconds one child may take (default 1800; quick 120)")
    add("--tmpdir", help="where the fresh files go (default: the system temp dir)")
    add("--no-venv", action="store_true", help="run in this interpreter (peers may be missing)")
    add(
        "--live-src",
        action="store_true",
        help="run the working tree's src/ as it changes (default: a copy taken at start)",
    )
    add("--output", type=Path, help="results JSON path (default bench/results/<time>.json)")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    cfg = Config(
        quick=quick,
        reps=args.reps or (1 if quick else 3),
        big_reps=args.big_reps,
        syncs=tuple(s.upper() for s in args.syncs),
        subjects=args.subjects,
        workloads=args.workloads,
        w1_n=args.w1_n or (50 if quick else 1000),
        w2_n=args.w2_n or (300 if quick else 5000),
        concurrency=args.concurrency or ((100,) if quick else (100, 1000)),
        w3_sizes=args.w3_sizes or ((300,) if quick else (10_000, 1_000_000)),
        big_peer_limit=100_000,
        open_n=args.open_n or (2_000 if quick else 1_000_000),
        sync_n=300 if quick else 30_000,
        sync_rounds=10 if quick else 200,
        timeout=args.timeout or (120.0 if quick else 1800.0),
        tmpdir=args.tmpdir,
    )
    return args, cfg


def main(argv: list[str]) -> int:
    """Set up the venv if needed, run every case, report, write the results."""
    args, cfg = parse_args(argv)
    if not args.no_venv and not in_venv():
        ensure_venv()
        python = str(_venv_python())
        os.execv(python, [python, str(Path(__file__).resolve()), *argv])  # noqa: S606
    import plot
    import report

    cases = plan(cfg)
    root = Path(tempfile.mkdtemp(prefix="orbiter-bench-", dir=cfg.tmpdir))
    log(f"{len(cases)} cases, files in {root}")
    git_at_start = report.git_state(REPO)
    if not args.live_src:
        snapshot_source(root)
    started = time.time()
    try:
        records = run_all(cases, cfg, root)
        machine = {
            **report.machine_info(root),
            "git_at_start": git_at_start,
            "git_at_end": report.git_state(REPO),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results = report.build_results(records, asdict(cfg), machine, time.time() - started)
    output = args.output or RESULTS / time.strftime(
        f"{'quick' if cfg.quick else 'full'}-%Y%m%d-%H%M%S.json"
    )
    report.write(results, output)
    report.print_tables(results)
    log(f"raw results: {output}\nmarkdown table: {output.with_suffix('.md')}")
    if plot.write_png(results, output.with_suffix(".png")):
        log(f"plot: {output.with_suffix('.png')}")
    failed = [r for r in records if not r.get("ok") and not r.get("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
