"""Draw a run's throughput per workload as a PNG (one panel per workload and size).

    bench/.venv/bin/python bench/plot.py bench/results/<run>.json   # writes <run>.png

``run.py`` calls :func:`write_png` after each run. Bars are the medians of the run, on a
log scale (subjects differ by orders of magnitude), FULL and NORMAL side by side; the
handler's bar is drawn first and darker. Needs matplotlib (in ``bench/requirements.txt``);
without it the run's tables and JSON are written as usual and the plot is skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: (workload, metric, unit) of each panel's y axis.
PANELS = (
    ("w1", "tasks_per_s", "tasks/s"),
    ("w2", "completions_per_s", "completions/s"),
    ("w3", "items_per_s", "items/s"),
)
HANDLER = "orbiter"


def _panels(medians: dict[str, Any]) -> list[tuple[str, str, dict[tuple[str, str], float]]]:
    """Each panel's title, y label and ``{(subject, sync): median}``, in a stable order."""
    found: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    units: dict[tuple[str, str], str] = {}
    for case in medians.values():
        for workload, metric, unit in PANELS:
            value = case["metrics"].get(metric) if case["workload"] == workload else None
            if value is None or case["synchronous"] == "-":
                continue
            size = f"c={case['concurrency']:,}" if workload == "w2" else f"n={case['n']:,}"
            key = (workload.upper(), size)
            found.setdefault(key, {})[(case["subject"], case["synchronous"])] = value
            units[key] = unit
    return [
        (f"{workload} {size}", units[(workload, size)], found[(workload, size)])
        for workload, size in sorted(found, key=lambda k: (k[0], int(k[1][2:].replace(",", ""))))
    ]


def write_png(results: dict[str, Any], output: Path) -> bool:
    """Draw the run's throughput panels to ``output``; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = _panels(results["medians"])
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    syncs = sorted({sync for _, _, values in panels for _, sync in values})
    colours = {"FULL": "#1f77b4", "NORMAL": "#ff7f0e"}
    for ax, (title, unit, values) in zip(axes[0], panels, strict=True):
        subjects = sorted({subject for subject, _ in values}, key=lambda s: (s != HANDLER, s))
        width = 0.8 / len(syncs)
        for offset, sync in enumerate(syncs):
            heights = [values.get((subject, sync), 0.0) for subject in subjects]
            positions = [i + offset * width for i in range(len(subjects))]
            bars = ax.bar(positions, heights, width, label=sync, color=colours.get(sync))
            for bar, subject in zip(bars, subjects, strict=True):
                if subject != HANDLER:
                    bar.set_alpha(0.55)
        ax.set_xticks([i + width * (len(syncs) - 1) / 2 for i in range(len(subjects))])
        ax.set_xticklabels(subjects, rotation=40, ha="right", fontsize=8)
        ax.set_yscale("log")
        positive = [value for value in values.values() if value > 0]
        ax.set_ylim(min(positive) / 3, max(positive) * 2)  # bars rise from a common floor
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(title="synchronous")
    commit = results.get("machine", {}).get("git_at_start", {}).get("head", "")
    figure.suptitle(f"orbiter-background benchmark, medians ({commit[:7] or 'working tree'})")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: plot.py RESULTS.json", file=sys.stderr)
        return 2
    source = Path(argv[0])
    output = source.with_suffix(".png")
    if not write_png(json.loads(source.read_text()), output):
        print("nothing drawn (matplotlib missing, or no W1/W2/W3 results)", file=sys.stderr)
        return 1
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
