"""Output for ``orbiter-bg``: safe text, the ``--json`` shapes, and rich tables.

Stored text (ids, payloads, results, errors) is untrusted: :func:`sanitize` replaces
control characters (ESC, C1 controls such as CSI, bidi overrides) with visible ``\\uXXXX``
escapes, and it reaches rich only as :class:`rich.text.Text` (never parsed as markup) or
through :func:`rich.markup.escape`. ``--json`` output is ASCII-only JSON.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from orbiter.store.codec import TIMESTAMP_FORMAT

__all__ = [
    "emit_json",
    "format_duration",
    "markup_safe",
    "pending_item",
    "pending_table",
    "pretty_json",
    "safe",
    "sanitize",
    "task_detail",
    "task_summary",
    "tasks_table",
]

_FINISHED = frozenset({"success", "failed", "timeout"})
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_KEEP_LINES = re.compile(
    r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


# -- safe text -------------------------------------------------------------------------


def sanitize(text: str, *, keep_newlines: bool = False) -> str:
    """Replace control and bidi-override characters with visible ``\\uXXXX`` escapes."""
    pattern = _UNSAFE_KEEP_LINES if keep_newlines else _UNSAFE
    return pattern.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def safe(value: object, *, keep_newlines: bool = False) -> Text:
    """Stored text as a rich ``Text``: sanitized, never interpreted as markup."""
    return Text(sanitize("" if value is None else str(value), keep_newlines=keep_newlines))


def markup_safe(value: object) -> str:
    """Stored text for interpolation into a rich markup string."""
    return escape(sanitize(str(value)))


def pretty_json(value: Any) -> Text:
    """``value`` as indented, highlighted, sanitized JSON."""
    text = Text(sanitize(json.dumps(value, indent=2, ensure_ascii=False), keep_newlines=True))
    JSONHighlighter().highlight(text)
    return text


def emit_json(document: Mapping[Any, Any]) -> None:
    """Write one ``--json`` document to stdout (ASCII-only, so terminal-safe)."""
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=True) + "\n")


# -- values ----------------------------------------------------------------------------


def _parse_time(stored: str | None) -> datetime | None:
    if stored is None:
        return None
    try:
        return datetime.strptime(stored, TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def iso_time(stored: str | None) -> str | None:
    """A stored timestamp as ISO 8601 UTC (``2026-11-29T06:42:00.123456Z``)."""
    moment = _parse_time(stored)
    if moment is None:
        return stored
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def human_time(stored: str | None) -> str:
    """A stored timestamp to the second, for tables (UTC)."""
    return "" if stored is None else stored[:19]


def duration_s(status: str, created: str | None, updated: str | None) -> float | None:
    """Seconds from submission to outcome for a finished task, else None."""
    start, end = _parse_time(created), _parse_time(updated)
    if status not in _FINISHED or start is None or end is None:
        return None
    return round((end - start).total_seconds(), 6)


def format_duration(seconds: float | None) -> str:
    """``0.35s``, ``42.0s``, ``3m 12s``, ``2h 5m``, ``3d 4h``; empty for None."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    whole = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if whole >= size:
            return f"{whole // size}{unit} {(whole % size) // sub_size}{sub}"
    return f"{whole // 60}m {whole % 60}s"


def decode(stored: str | None) -> Any:
    """A stored JSON value; text that is not JSON comes back as the raw string."""
    if stored is None:
        return None
    try:
        return json.loads(stored)
    except ValueError:
        return stored


# -- the --json shapes (documented in docs/cli.md) --------------------------------------


def task_summary(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A task without payload/result: the ``tasks`` list item."""
    return {
        "task_id": row["task_id"],
        "parent_task_id": row["parent_task_id"],
        "status": row["status"],
        "merge_mode": row["merge_mode"],
        "created_at": iso_time(row["created_at"]),
        "updated_at": iso_time(row["updated_at"]),
        "duration_s": duration_s(row["status"], row["created_at"], row["updated_at"]),
        "pending": bool(row["is_pending"]),
    }


def task_detail(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A task in full: the ``show`` document."""
    return {
        **task_summary(row),
        "pending_seq": row["seq"],
        "enqueued_at": iso_time(row["enqueued_at"]),
        "payload": decode(row["payload"]),
        "result": decode(row["result"]),
        "error": row["error"],
    }


def pending_item(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A queued task: the ``pending`` list item."""
    return {
        "seq": row["seq"],
        "task_id": row["task_id"],
        "parent_task_id": row["parent_task_id"],
        "status": row["status"],
        "merge_mode": row["merge_mode"],
        "enqueued_at": iso_time(row["enqueued_at"]),
        "result": decode(row["result"]),
        "error": row["error"],
        "held_by": row["claimed_by"],
        "held_since": iso_time(row["claimed_at"]),
    }


# -- tables ----------------------------------------------------------------------------

_STATUS_STYLE = {
    "success": "green",
    "failed": "red",
    "timeout": "magenta",
    "running": "cyan",
    "init": "dim",
}


def status_text(status: str) -> Text:
    """A status, coloured."""
    return Text(sanitize(status), style=_STATUS_STYLE.get(status, ""))


def compact_json(value: Any, width: int = 60) -> Text:
    """``value`` as one-line JSON, shortened to ``width`` characters, sanitized."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if len(text) > width:
        text = text[: width - 1] + "…"
    return safe(text)


def tasks_table(items: Sequence[Mapping[Any, Any]], caption: str) -> Table:
    """The ``tasks`` listing."""
    table = Table(caption=caption, caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for name in ("task", "parent", "status", "merge", "created (UTC)", "duration", "pending"):
        table.add_column(name, overflow="fold")
    for item in items:
        table.add_row(
            safe(item["task_id"]),
            safe(item["parent_task_id"]),
            status_text(item["status"]),
            safe(item["merge_mode"]),
            safe(human_time(_stored(item["created_at"]))),
            safe(format_duration(item["duration_s"])),
            Text("yes", style="yellow") if item["pending"] else Text(""),
        )
    return table


def pending_table(items: Sequence[Mapping[Any, Any]], caption: str) -> Table:
    """The ``pending`` listing (also used by ``drain``)."""
    table = Table(caption=caption, caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    held = any(item.get("held_by") for item in items)  # the column only when a drain holds one
    names = ("seq", "task", "parent", "status", "queued (UTC)", "result")
    for name in (*names, "held by") if held else names:
        table.add_column(name, overflow="fold")
    for item in items:
        cells: list[Any] = [
            safe(item.get("seq", "")),
            safe(item["task_id"]),
            safe(item["parent_task_id"]),
            status_text(item["status"]),
            safe(human_time(_stored(item.get("enqueued_at")))),
            compact_json(item["result"]) if item["error"] is None else safe(item["error"]),
        ]
        if held:
            cells.append(safe(item.get("held_by") or ""))
        table.add_row(*cells)
    return table


def _stored(iso: str | None) -> str | None:
    """Back from ISO to the stored form's first 19 characters (for tables)."""
    return None if iso is None else iso.replace("T", " ").removesuffix("Z")


def detail_table(item: Mapping[Any, Any]) -> Table:
    """The ``show`` header: one row per field."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    queued = ""
    if item["pending"]:
        since = human_time(_stored(item["enqueued_at"]))
        queued = f"yes (position {item['pending_seq']}, since {since} UTC)"
    rows: list[tuple[str, Text]] = [
        ("task", safe(item["task_id"])),
        ("parent", safe(item["parent_task_id"])),
        ("status", status_text(item["status"])),
        ("merge mode", safe(item["merge_mode"] or "")),
        ("created", safe(f"{human_time(_stored(item['created_at']))} UTC")),
        ("updated", safe(f"{human_time(_stored(item['updated_at']))} UTC")),
        ("duration", safe(format_duration(item["duration_s"]))),
        ("pending", safe(queued or "no")),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_detail(console: Console, item: Mapping[Any, Any]) -> None:
    """Print one task in full: fields, payload, result, error."""
    console.print(detail_table(item))
    console.print(Text("\npayload", style="bold"))
    console.print(pretty_json(item["payload"]))
    console.print(Text("\nresult", style="bold"))
    console.print(pretty_json(item["result"]))
    if item["error"] is not None:
        console.print(Text("\nerror", style="bold red"))
        console.print(safe(item["error"], keep_newlines=True))
