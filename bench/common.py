"""Shared pieces of the benchmark: payloads, ids, percentiles, memory readings."""

from __future__ import annotations

import json
import math
import resource
from datetime import UTC, datetime, timedelta
from typing import Any

#: The parent task every benchmark task hangs off.
PARENT = "bench-main-run"

#: A payload of about 200 bytes of JSON (the issue's "~200-byte JSON dicts").
PAYLOAD: dict[str, Any] = {
    "url": "https://example.com/api/v1/search?q=background+tasks",
    "method": "GET",
    "headers": {"accept": "application/json", "x-request-id": "7f3c2a9e-1b44"},
    "attempt": 1,
    "timeout_s": 30.0,
    "tags": ["bench", "orbiter", "w1"],
}

#: A result of about 200 bytes of JSON.
RESULT: dict[str, Any] = {
    "status": 200,
    "items": [{"id": 1, "score": 0.93}, {"id": 2, "score": 0.71}],
    "summary": "three documents matched; the first two are relevant to the query",
    "elapsed_ms": 412.5,
    "cached": False,
    "source": "index-eu-west-1",
}

#: The same values as the stored JSON text (compact, like the handler's codec).
PAYLOAD_JSON = json.dumps(PAYLOAD, separators=(",", ":"))
RESULT_JSON = json.dumps(RESULT, separators=(",", ":"))

#: Stored timestamp format, as ``orbiter.store.codec.utc_now_text`` writes it.
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


def task_id(index: int) -> str:
    """The id of benchmark task ``index`` (fixed width, so ids sort like indices)."""
    return f"task-{index:08d}"


def utc_now_text() -> str:
    """The current UTC time in the stored format."""
    return datetime.now(UTC).strftime(TIMESTAMP_FORMAT)


def fake_timestamp(index: int) -> str:
    """A deterministic, increasing timestamp for prepared row ``index``."""
    return (_EPOCH + timedelta(microseconds=index)).strftime(TIMESTAMP_FORMAT)


def percentile(samples: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``samples`` (``fraction`` in 0..1); NaN if empty."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def latency_metrics(name: str, seconds: list[float]) -> dict[str, float]:
    """p50/p99/max of per-call latencies, in milliseconds, keyed ``<name>_p50_ms`` etc."""
    return {
        f"{name}_p50_ms": percentile(seconds, 0.50) * 1e3,
        f"{name}_p99_ms": percentile(seconds, 0.99) * 1e3,
        f"{name}_max_ms": (max(seconds) if seconds else math.nan) * 1e3,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Current resident set size of this process, in MB."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / (1024 * 1024)
