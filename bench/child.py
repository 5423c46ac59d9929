"""One measurement (or one preparation) in a fresh process; prints one JSON line.

Usage: ``python child.py '<json spec>'``, as ``run.py`` calls it. The spec names the
``action`` (``prepare`` or ``measure``), the ``workload``, the ``subject``, the
``synchronous`` level, the case ``dir`` and the sizes. The last stdout line is
``{"ok": true, "metrics": {...}}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common import (
    PARENT,
    PAYLOAD,
    RESULT,
    current_rss_mb,
    latency_metrics,
    peak_rss_mb,
    task_id,
)
from prepare import prepare
from subjects import MEMORY, Subject, database_path, open_subject

Metrics = dict[str, float]


async def _w1_throughput(subject: Subject, n: int, first: int) -> float:
    """W1 without per-call clocks (their cost matters for in-memory subjects)."""
    start = time.perf_counter()
    for index in range(first, first + n):
        tid = task_id(index)
        await subject.submit(tid, PAYLOAD)
        await subject.complete(tid, RESULT)
    return n / (time.perf_counter() - start)


async def w1_sequential(subject: Subject, n: int, in_memory: bool) -> Metrics:
    """W1: submit then complete, one task at a time; throughput and per-call latency.

    In-memory subjects measure throughput in a separate pass with no per-call clocks.
    """
    uninstrumented = await _w1_throughput(subject, n, n) if in_memory else None
    submit_s: list[float] = []
    result_s: list[float] = []
    clock = time.perf_counter
    start = clock()
    for index in range(n):
        tid = task_id(index)
        t0 = clock()
        await subject.submit(tid, PAYLOAD)
        t1 = clock()
        await subject.complete(tid, RESULT)
        t2 = clock()
        submit_s.append(t1 - t0)
        result_s.append(t2 - t1)
    await subject.flush()
    elapsed = clock() - start
    return {
        "tasks_per_s": uninstrumented or n / elapsed,
        **latency_metrics("submit", submit_s),
        **latency_metrics("result", result_s),
    }


async def _complete_all(subject: Subject, ids: list[str]) -> None:
    for tid in ids:
        await subject.complete(tid, RESULT)


async def w2_concurrent(subject: Subject, n: int, concurrency: int) -> Metrics:
    """W2: complete n submitted tasks with ``concurrency`` calls in flight (gather)."""
    ids = [task_id(index) for index in range(n)]
    lanes = [ids[lane::concurrency] for lane in range(concurrency)]
    start = time.perf_counter()
    await asyncio.gather(*(_complete_all(subject, lane) for lane in lanes))
    await subject.flush()
    elapsed = time.perf_counter() - start
    return {"completions_per_s": n / elapsed}


async def w3_drain(subject: Subject, n: int) -> Metrics:
    """W3: consume n queued results to the end; throughput and peak RSS."""
    rss_before = current_rss_mb()
    start = time.perf_counter()
    drained = await subject.drain()
    elapsed = time.perf_counter() - start
    if drained != n:
        raise RuntimeError(f"drained {drained} items, expected {n}")
    return {
        "items_per_s": n / elapsed,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss_before,
        "rss_after_mb": current_rss_mb(),
    }


def _import_handler_module() -> float:
    """Import the handler's module (and with it the durable store); seconds taken."""
    t0 = time.perf_counter()
    import orbiter._internal.background  # noqa: F401

    return time.perf_counter() - t0


def _open_once(path: Path, synchronous: str, probe: str) -> tuple[float, float]:
    """Construct a handler on ``path`` and make a first call; (construct, first call) s."""
    from orbiter._internal.background import BackgroundTaskHandler

    t0 = time.perf_counter()
    handler = BackgroundTaskHandler(database=path, synchronous=synchronous)
    t1 = time.perf_counter()
    handler.get_task(probe)
    t2 = time.perf_counter()
    handler.close()
    return t1 - t0, t2 - t1


def open_first_call(path: Path, synchronous: str, probe: str) -> Metrics:
    """Open: time to a handler's first answer, cold (the process's first handler, right
    after importing the module) and warm (a second open). The import itself (SQLAlchemy
    included, once per process) is reported on its own."""
    imported = _import_handler_module()
    construct, first_call = _open_once(path, synchronous, probe)
    warm_construct, warm_first_call = _open_once(path, synchronous, probe)
    return {
        "import_ms": imported * 1e3,
        "open_ms": (construct + first_call) * 1e3,
        "construct_ms": construct * 1e3,
        "first_call_ms": first_call * 1e3,
        "open_warm_ms": (warm_construct + warm_first_call) * 1e3,
        "construct_warm_ms": warm_construct * 1e3,
        "first_call_warm_ms": warm_first_call * 1e3,
    }


async def sync_calls(path: Path, synchronous: str, spec: dict[str, Any]) -> Metrics:
    """Sync calls on the loop thread (submit, handle_error, get_task) while
    ``concurrency`` async ``handle_result`` calls are in flight; their latencies."""
    from orbiter._internal.background import BackgroundTaskHandler

    n, concurrency, rounds = spec["n"], spec["concurrency"], spec["rounds"]
    handler = BackgroundTaskHandler(database=path, synchronous=synchronous)

    async def lane(ids: list[str]) -> None:
        for tid in ids:
            await handler.handle_result(tid, RESULT, is_main_running=False)

    ids = [task_id(index) for index in range(n)]
    background = asyncio.gather(*(lane(ids[k::concurrency]) for k in range(concurrency)))
    await asyncio.sleep(0)
    samples: dict[str, list[float]] = {"submit": [], "handle_error": [], "get_task": []}
    calls: dict[str, Callable[[int], object]] = {
        "submit": lambda r: handler.submit(f"new-{r:06d}", PARENT, payload=PAYLOAD),
        "handle_error": lambda r: handler.handle_error(task_id(n + r), "failed in bench"),
        "get_task": lambda r: handler.get_task(task_id(r)),
    }
    overlapped = 0
    for r in range(rounds):
        if background.done():
            break
        overlapped += 1
        for name, call in calls.items():
            t0 = time.perf_counter()
            call(r)
            samples[name].append(time.perf_counter() - t0)
            await asyncio.sleep(0)
    await background
    await handler.aclose()
    metrics: Metrics = {"rounds_in_flight": float(overlapped)}
    for name, seconds in samples.items():
        metrics.update(latency_metrics(name, seconds))
    return metrics


async def _prefill_memory(subject: Subject, workload: str, n: int) -> None:
    """In-memory subjects cannot be prepared in another process: fill them here."""
    if workload in ("w2", "w3"):
        for index in range(n):
            await subject.submit(task_id(index), PAYLOAD)
    if workload == "w3":
        for index in range(n):
            await subject.complete(task_id(index), RESULT)


async def measure_subject(spec: dict[str, Any]) -> Metrics:
    """Open the subject, run W1/W2/W3 on it, close it."""
    name, workload, n = spec["subject"], spec["workload"], spec["n"]
    directory = None if name in MEMORY else Path(spec["dir"])
    subject = await open_subject(name, directory, spec["synchronous"])
    try:
        if name in MEMORY:
            await _prefill_memory(subject, workload, n)
        runs: dict[str, Callable[[], Awaitable[Metrics]]] = {
            "w1": lambda: w1_sequential(subject, n, name in MEMORY),
            "w2": lambda: w2_concurrent(subject, n, spec["concurrency"]),
            "w3": lambda: w3_drain(subject, n),
        }
        return await runs[workload]()
    finally:
        await subject.close()


def measure(spec: dict[str, Any]) -> Metrics:
    """Run the measurement ``spec`` describes."""
    workload = spec["workload"]
    if workload == "open":
        path = database_path(Path(spec["dir"]), "orbiter")
        return open_first_call(path, spec["synchronous"], task_id(spec["n"] // 2))
    if workload == "sync":
        path = database_path(Path(spec["dir"]), "orbiter")
        return asyncio.run(sync_calls(path, spec["synchronous"], spec))
    return asyncio.run(measure_subject(spec))


def main(argv: list[str]) -> int:
    """Entry point: run the spec in ``argv[1]``, print the JSON outcome."""
    spec = json.loads(argv[1])
    try:
        if spec["action"] == "prepare":
            prepare(
                Path(spec["dir"]),
                spec["family"],
                spec["state"],
                spec["n"],
                spec.get("extra_running", 0),
            )
            outcome: dict[str, Any] = {"ok": True, "metrics": {}}
        else:
            outcome = {"ok": True, "metrics": measure(spec)}
    except ImportError as exc:
        outcome = {"ok": False, "skipped": True, "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:
        outcome = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    sys.stdout.write(json.dumps(outcome) + "\n")
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
