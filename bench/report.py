"""Medians, the issue-5 bars as ratios, and the tables (terminal, Markdown, JSON)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

PEERS = ("persist-queue", "huey", "litequeue", "langgraph")
DISTRIBUTIONS = (
    "orbiter-background",
    "SQLAlchemy",
    "persist-queue",
    "huey",
    "litequeue",
    "langgraph-checkpoint-sqlite",
    "aiosqlite",
)

Medians = dict[str, dict[str, Any]]

GIT = shutil.which("git") or "/usr/bin/git"


# -- machine --------------------------------------------------------------------------


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _filesystem(path: Path) -> str:
    """The type and device of the mount holding ``path`` (from /proc/mounts)."""
    best, found = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return found
    resolved = str(path.resolve())
    for line in mounts:
        device, mount, fstype, *_ = line.split()
        if resolved.startswith(mount) and len(mount) >= len(best):
            best, found = mount, f"{fstype} ({device} on {mount})"
    return found


def _versions() -> dict[str, str]:
    """Installed versions of the measured distributions."""
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_state(repo: Path) -> dict[str, Any]:
    """The commit measured, and which files under src/ differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            [GIT, "-C", str(repo), *args], capture_output=True, text=True, check=False
        )
        return done.stdout

    changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    diff = hashlib.sha256(git("diff", "HEAD", "--", "src", "migrations").encode()).hexdigest()
    return {
        "head": git("rev-parse", "--short", "HEAD").strip(),
        "src_changed": changed,
        "src_diff_sha256": diff[:12] if changed else "",
    }


def machine_info(tmpdir: Path) -> dict[str, Any]:
    """What the numbers were measured on."""
    meminfo = Path("/proc/meminfo")
    total = meminfo.read_text().splitlines()[0] if meminfo.exists() else ""
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": total.split(":", 1)[-1].strip(),
        "tmp_filesystem": _filesystem(tmpdir),
        "tmpdir": str(tmpdir.parent),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "packages": _versions(),
    }


# -- medians --------------------------------------------------------------------------


def medians(records: list[dict[str, Any]]) -> Medians:
    """Per case key: the case's fields and the median of each metric over its good runs."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault(record["case"], []).append(record)
    result: Medians = {}
    for key, runs in grouped.items():
        good = [run["metrics"] for run in runs if run.get("ok")]
        fields = {
            k: runs[0][k]
            for k in ("workload", "subject", "synchronous", "n", "concurrency", "label")
        }
        values = {name: statistics.median(m[name] for m in good) for name in (good or [{}])[0]}
        result[key] = {
            **fields,
            "runs": len(runs),
            "ok_runs": len(good),
            "metrics": values,
            "error": None if good else runs[0].get("error"),
        }
    return result


def _find(table: Medians, metric: str, **fields: Any) -> float | None:
    """The median ``metric`` of the case matching ``fields``, if any."""
    for entry in table.values():
        if all(entry[k] == v for k, v in fields.items()) and metric in entry["metrics"]:
            return float(entry["metrics"][metric])
    return None


def _fastest_peer(table: Medians, metric: str, **fields: Any) -> tuple[str, float] | None:
    """The peer with the highest median ``metric`` among cases matching ``fields``."""
    found = [(p, v) for p in PEERS if (v := _find(table, metric, subject=p, **fields)) is not None]
    return max(found, key=lambda item: item[1]) if found else None


# -- bars -----------------------------------------------------------------------------


@dataclass
class Bar:
    """One bar of issue 5, evaluated on one ``synchronous`` level."""

    bar: str
    sync: str
    value: float | None
    unit: str
    baseline: str
    baseline_value: float | None
    ratio: float | None
    target: str
    met: bool | None


def _ratio_bar(
    name: str,
    sync: str,
    unit: str,
    value: float | None,
    baseline: tuple[str, float] | None,
    *,
    target: float,
    higher: bool = True,
) -> Bar:
    """A bar comparing ``value`` with ``baseline`` by ratio against ``target``."""
    base_name, base_value = baseline if baseline else ("(missing)", None)
    ratio = value / base_value if value is not None and base_value else None
    met = None if ratio is None else (ratio >= target if higher else ratio <= target)
    sign = ">=" if higher else "<="
    return Bar(name, sync, value, unit, base_name, base_value, ratio, f"{sign} {target:g}x", met)


def _named(table: Medians, subject: str, metric: str, **fields: Any) -> tuple[str, float] | None:
    """``(subject, median metric)`` of one subject's case, if it ran."""
    value = _find(table, metric, subject=subject, **fields)
    return None if value is None else (subject, value)


def _w1_bars(table: Medians, sync: str) -> list[Bar]:
    """W1 against the fastest peer and the per-call limit."""
    mine = _find(table, "tasks_per_s", workload="w1", subject="orbiter", synchronous=sync)
    peer = _fastest_peer(table, "tasks_per_s", workload="w1", synchronous=sync)
    stdlib = _named(table, "stdlib-percall", "tasks_per_s", workload="w1", synchronous=sync)
    return [
        _ratio_bar("W1 vs fastest peer", sync, "tasks/s", mine, peer, target=1.0),
        _ratio_bar("W1 vs stdlib per-call", sync, "tasks/s", mine, stdlib, target=0.5),
    ]


def _w2_bars(table: Medians, sync: str) -> list[Bar]:
    """W2 at each concurrency against the batch limit and the fastest peer."""
    bars = []
    levels = sorted(
        {
            e["concurrency"]
            for e in table.values()
            if e["workload"] == "w2" and e["subject"] == "orbiter" and e["synchronous"] == sync
        }
    )
    batch = _named(table, "stdlib-batch", "completions_per_s", workload="w2", synchronous=sync)
    peer = _fastest_peer(table, "completions_per_s", workload="w2", synchronous=sync)
    for level in levels:
        mine = _find(
            table,
            "completions_per_s",
            workload="w2",
            subject="orbiter",
            synchronous=sync,
            concurrency=level,
        )
        bars.append(
            _ratio_bar(f"W2 c={level} vs stdlib batch", sync, "compl/s", mine, batch, target=0.7)
        )
        bars.append(
            _ratio_bar(f"W2 c={level} vs fastest peer", sync, "compl/s", mine, peer, target=10.0)
        )
    return bars


def _w3_bars(table: Medians, sync: str) -> list[Bar]:
    """W3 against the drain-all limit (and the per-item one), and RSS growth."""
    bars = []
    sizes = sorted(
        {
            e["n"]
            for e in table.values()
            if e["workload"] == "w3" and e["subject"] == "orbiter" and e["synchronous"] == sync
        }
    )
    for size in sizes:
        fields = {"workload": "w3", "synchronous": sync, "n": size}
        mine = _find(table, "items_per_s", subject="orbiter", **fields)
        stdlib = _named(table, "stdlib-drain", "items_per_s", **fields)
        bars.append(
            _ratio_bar(
                f"W3 n={size:,} vs stdlib drain-all", sync, "items/s", mine, stdlib, target=0.7
            )
        )
        per_item = _named(table, "stdlib-ack", "items_per_s", **fields)
        if per_item is not None:
            info = _ratio_bar(
                f"W3 n={size:,} vs stdlib commit-per-item (info)",
                sync,
                "items/s",
                mine,
                per_item,
                target=0.7,
            )
            bars.append(replace(info, target="(info: same contract)", met=None))
    if len(sizes) >= 2:
        small, big = (
            _find(table, "peak_rss_mb", workload="w3", subject="orbiter", synchronous=sync, n=size)
            for size in (sizes[0], sizes[-1])
        )
        delta = big - small if big is not None and small is not None else None
        bars.append(
            Bar(
                f"W3 peak RSS n={sizes[-1]:,} minus n={sizes[0]:,}",
                sync,
                delta,
                "MB",
                f"n={sizes[0]:,} run",
                small,
                None,
                "<= +50 MB",
                None if delta is None else delta <= 50,
            )
        )
    return bars


def _open_bars(table: Medians, sync: str) -> list[Bar]:
    """Open on the big file against the empty one, and in absolute terms."""
    sizes = [e["n"] for e in table.values() if e["label"] == "full-file"]
    rows = f"{sizes[0]:,}" if sizes else "?"
    bars = []
    for metric, how in (("open_ms", "cold, 1st open"), ("open_warm_ms", "warm, 2nd open")):
        full = _find(table, metric, workload="open", synchronous=sync, label="full-file")
        empty = _find(table, metric, workload="open", synchronous=sync, label="empty-file")
        baseline = None if empty is None else ("empty file", empty)
        bars.append(
            _ratio_bar(
                f"Open {rows}-task file vs empty ({how})",
                sync,
                "ms",
                full,
                baseline,
                target=2.0,
                higher=False,
            )
        )
        met = None if full is None else full < 100
        bars.append(
            Bar(
                f"Open {rows}-task file, absolute ({how})",
                sync,
                full,
                "ms",
                "",
                None,
                None,
                "< 100 ms",
                met,
            )
        )
    return bars


def _sync_bars(table: Medians, sync: str) -> list[Bar]:
    """Each sync call's p99 against one stdlib commit's p99."""
    commit = _find(
        table, "result_p99_ms", workload="w1", subject="stdlib-percall", synchronous=sync
    )
    baseline = None if commit is None else ("one stdlib commit p99", commit)
    bars = []
    for call in ("submit", "handle_error", "get_task"):
        p99 = _find(table, f"{call}_p99_ms", workload="sync", synchronous=sync)
        bars.append(
            _ratio_bar(
                f"sync {call} p99 (async calls in flight)",
                sync,
                "ms",
                p99,
                baseline,
                target=1.0,
                higher=False,
            )
        )
    return bars


def _memory_bars(table: Medians) -> list[Bar]:
    """The in-memory handler against the dict-and-list implementation."""
    bars = []
    for workload, metric, unit in (
        ("w1", "tasks_per_s", "tasks/s"),
        ("w2", "completions_per_s", "compl/s"),
        ("w3", "items_per_s", "items/s"),
    ):
        mine = _find(table, metric, workload=workload, subject="orbiter-memory")
        plain = _named(table, "dict-list", metric, workload=workload)
        if mine is not None or plain is not None:
            bars.append(
                _ratio_bar(
                    f"memory mode {workload.upper()} vs dict-and-list",
                    "-",
                    unit,
                    mine,
                    plain,
                    target=0.5,
                )
            )
    return bars


def bars(table: Medians, syncs: list[str]) -> list[Bar]:
    """Every bar of issue 5 that the run has data for."""
    makers: list[Callable[[Medians, str], list[Bar]]] = [
        _w1_bars,
        _w2_bars,
        _w3_bars,
        _open_bars,
        _sync_bars,
    ]
    result = [bar for sync in syncs for make in makers for bar in make(table, sync)]
    return result + _memory_bars(table)


def build_results(
    records: list[dict[str, Any]], config: dict[str, Any], machine: dict[str, Any], wall_s: float
) -> dict[str, Any]:
    """Everything the JSON file holds: config, machine, raw runs, medians, bars."""
    table = medians(records)
    return {
        "config": config,
        "machine": machine,
        "wall_s": wall_s,
        "runs": records,
        "medians": table,
        "bars": [asdict(bar) for bar in bars(table, list(config["syncs"]))],
    }


# -- rendering ------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    """A number for a table cell."""
    if value is None:
        return "n/a"
    if digits == 0 and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{max(digits, 2) if abs(value) < 10 else 1}f}"


def bar_rows(results: dict[str, Any]) -> list[list[str]]:
    """The bars table as text cells."""
    rows = []
    for bar in results["bars"]:
        met = {True: "met", False: "NOT MET", None: "no data"}[bar["met"]]
        if bar["target"].startswith("(info"):
            met = "info"
        ratio = "n/a" if bar["ratio"] is None else f"{bar['ratio']:.2f}x"
        baseline = bar["baseline"]
        if bar["baseline_value"] is not None:
            baseline = f"{baseline} {_num(bar['baseline_value'])}"
        rows.append(
            [
                bar["bar"],
                bar["sync"],
                f"{_num(bar['value'])} {bar['unit']}",
                baseline,
                ratio,
                bar["target"],
                met,
            ]
        )
    return rows


BAR_HEADER = ["Bar", "sync", "orbiter", "baseline (median)", "ratio", "target", "verdict"]
DETAIL_HEADER = ["workload", "case", "subject", "sync", "median", "more (medians)", "runs"]


def _detail_cells(metrics: dict[str, float]) -> tuple[str, str]:
    """The headline and the secondary medians of one case."""
    if "tasks_per_s" in metrics:
        more = (
            f"submit p50/p99 {_num(metrics['submit_p50_ms'], 3)}/"
            f"{_num(metrics['submit_p99_ms'], 3)} ms; result p50/p99 "
            f"{_num(metrics['result_p50_ms'], 3)}/{_num(metrics['result_p99_ms'], 3)} ms"
        )
        return f"{_num(metrics['tasks_per_s'])} tasks/s", more
    if "completions_per_s" in metrics:
        return f"{_num(metrics['completions_per_s'])} compl/s", ""
    if "items_per_s" in metrics:
        return (
            f"{_num(metrics['items_per_s'])} items/s",
            f"peak RSS {_num(metrics['peak_rss_mb'], 1)} MB "
            f"(after open {_num(metrics['rss_before_mb'], 1)} MB)",
        )
    if "open_ms" in metrics:
        return (
            f"{_num(metrics['open_ms'], 2)} ms cold",
            f"import (once per process) {_num(metrics.get('import_ms', float('nan')), 1)} ms; "
            f"cold: construct {_num(metrics['construct_ms'], 2)} + first get_task "
            f"{_num(metrics['first_call_ms'], 2)} ms; warm (2nd open): "
            f"{_num(metrics['construct_warm_ms'], 2)} + {_num(metrics['first_call_warm_ms'], 2)}"
            " ms",
        )
    parts = [
        f"{call} {_num(metrics[f'{call}_p50_ms'], 3)}/{_num(metrics[f'{call}_p99_ms'], 3)}"
        for call in ("submit", "handle_error", "get_task")
    ]
    rounds = int(metrics.get("rounds_in_flight", 0))
    return "p50/p99 ms", "; ".join(parts) + f" ({rounds} rounds in flight)"


def detail_rows(results: dict[str, Any]) -> list[list[str]]:
    """Every case's medians as text cells."""
    rows = []
    for entry in results["medians"].values():
        case = entry["label"] or f"n={entry['n']:,}"
        if entry["concurrency"]:
            case += f" c={entry['concurrency']}"
        if entry["metrics"]:
            value, more = _detail_cells(entry["metrics"])
        else:
            value, more = "failed", str(entry["error"])[:80]
        rows.append(
            [
                entry["workload"].upper(),
                case,
                entry["subject"],
                entry["synchronous"],
                value,
                more,
                f"{entry['ok_runs']}/{entry['runs']}",
            ]
        )
    return rows


def markdown(results: dict[str, Any]) -> str:
    """Both tables and the machine, as Markdown."""

    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + [
            "| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows
        ]

    machine = results["machine"]
    code = machine.get("git_at_start", {})
    dirty = (
        f" + uncommitted src changes ({code['src_diff_sha256']})" if code.get("src_changed") else ""
    )
    head = [
        f"Code measured: commit {code.get('head', '?')}{dirty}, copied at the start of the run.",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']} RAM, "
        f"temp files on {machine['tmp_filesystem']}; Python {machine['python']}, "
        f"SQLite {machine['sqlite']}. Wall time {results['wall_s'] / 60:.1f} min.",
        "",
    ]
    return (
        "\n".join(
            head
            + table(BAR_HEADER, bar_rows(results))
            + [""]
            + table(DETAIL_HEADER, detail_rows(results))
        )
        + "\n"
    )


def write(results: dict[str, Any], output: Path) -> None:
    """The raw JSON and the Markdown tables beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1, default=str))
    output.with_suffix(".md").write_text(markdown(results))


def print_tables(results: dict[str, Any]) -> None:
    """Both tables on the terminal (rich if installed, else Markdown)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(results))
        return
    console = Console(width=max(160, Console().width))
    for title, header, rows in (
        ("Issue 5 bars (medians, ratios measured side by side)", BAR_HEADER, bar_rows(results)),
        ("All cases (medians)", DETAIL_HEADER, detail_rows(results)),
    ):
        table = Table(title=title, show_lines=False)
        for column in header:
            table.add_column(column)
        for row in rows:
            style = "red" if row[-1] == "NOT MET" else ("green" if row[-1] == "met" else None)
            table.add_row(*row, style=style)
        console.print(table)
