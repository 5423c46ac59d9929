"""``orbiter-bg``: the demo, inspection and administration of an orbiter-background file.

Read commands (``tasks``, ``show``, ``pending``, ``stats``, ``migrate --show``,
``purge --dry-run``) open the database read-only; write commands (``migrate``, ``drain``,
``requeue``, ``purge``) check it first. Errors are one line on stderr: exit 1 for a
problem with the database or a task, 2 for a bad argument, 130 when interrupted.
Documented in ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from importlib import metadata
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy import exc as sa_exc

from orbiter.cli_db import (
    CliError,
    age_cutoff,
    open_for_reading,
    open_for_writing,
    parse_age,
    read_revision,
    resolve_target,
)
from orbiter.cli_render import (
    emit_json,
    iso_time,
    markup_safe,
    pending_item,
    pending_table,
    print_detail,
    safe,
    sanitize,
    task_detail,
    task_summary,
    tasks_table,
)
from orbiter.store import admin_queries as q
from orbiter.store.claims import enqueue
from orbiter.store.codec import utc_now_text
from orbiter.store.drain_acks import AckFile
from orbiter.store.engine import ENV_VAR
from orbiter.store.executor import Db
from orbiter.store.schema import HEAD_REVISION
from orbiter.store.sql_store import translate_error
from orbiter.types import OrbiterError

if TYPE_CHECKING:
    from orbiter.store.engine import DatabaseTarget

__all__ = ["build_parser", "main"]

STATUSES = ("init", "running", "success", "failed", "timeout")

#: Tasks a purge deletes per transaction (the write lock is released in between).
PURGE_BATCH = 500

#: Line width when stdout is not a terminal.
PIPE_WIDTH = 160

#: Rows a dry-run purge lists before summarising the rest.
DRY_RUN_SHOWN = 50

#: Task ids per query when looking up the owners of settled orphans.
OWNER_LOOKUP_BATCH = 500

Command = Callable[[argparse.Namespace, Console], int]


# -- argument parsing ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {sanitize(message)} (see `{self.prog} --help`)\n")


if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[_Parser]


def _age(text: str) -> tuple[str, timedelta]:
    try:
        return text, parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


#: The largest integer SQLite holds (a larger limit or offset is an OverflowError there).
_MAX_SQL_INT = 2**63 - 1


def _int_at_least(low: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        if value > _MAX_SQL_INT:
            raise argparse.ArgumentTypeError(f"must be at most {_MAX_SQL_INT}, not {value}")
        return value

    return convert


def _add_paging(parser: argparse.ArgumentParser, *, default_limit: int) -> None:
    parser.add_argument(
        "--limit",
        type=_int_at_least(1),
        default=default_limit,
        metavar="N",
        help=f"rows (default {default_limit})",
    )
    parser.add_argument(
        "--offset", type=_int_at_least(0), default=0, metavar="N", help="rows to skip"
    )


_DB_HELP = f"SQLite file or sqlite:/// URL (default: ${ENV_VAR})"
_JSON_HELP = "print one JSON document (shape: docs/cli.md)"


def _common() -> _Parser:
    """``--db`` and ``--json``, after the command. They may also come before it (the main
    parser has them too): SUPPRESS keeps a command from resetting what was given there."""
    parent = _Parser(add_help=False)
    parent.add_argument("--db", metavar="PATH_OR_URL", default=argparse.SUPPRESS, help=_DB_HELP)
    parent.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=_JSON_HELP)
    return parent


def _version() -> str:
    try:
        return metadata.version("orbiter-background")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``orbiter-bg`` argument parser."""
    parser = _Parser(
        prog="orbiter-bg",
        description="Demo, inspect and administer an orbiter-background SQLite database.",
        epilog="Read commands open the database read-only. Docs: docs/cli.md",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    parser.add_argument("--db", metavar="PATH_OR_URL", help=_DB_HELP)
    parser.add_argument("--json", action="store_true", help=_JSON_HELP)
    commands = parser.add_subparsers(title="commands", dest="command", required=True)
    common = _common()
    _add_demo(commands)
    _add_tasks(commands, common)
    _add_show(commands, common)
    _add_pending(commands, common)
    _add_stats(commands, common)
    _add_migrate(commands, common)
    _add_drain(commands, common)
    _add_requeue(commands, common)
    _add_purge(commands, common)
    _add_orphans(commands, common)
    return parser


def _add_demo(commands: Subparsers) -> None:
    demo = commands.add_parser(
        "demo",
        help="kill a host process with SIGKILL and show that no result is lost",
        description="Run the crash-and-restore demonstration on a fresh SQLite file.",
    )
    demo.add_argument(
        "--db",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="demo file (default ./orbiter-demo.db; replaced each run)",
    )
    demo.add_argument("--tasks", type=_int_at_least(2), default=8, help="tasks (default 8)")
    demo.add_argument("--seed", type=int, default=None, help="random seed for the delays")
    # Accepted here only to be refused by main() with the same message as before "demo".
    demo.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    demo.set_defaults(func=cmd_demo)


def _add_tasks(commands: Subparsers, common: _Parser) -> None:
    tasks = commands.add_parser(
        "tasks", parents=[common], help="list tasks, newest first", description="List tasks."
    )
    tasks.add_argument(
        "--status",
        action="append",
        choices=STATUSES,
        help="only tasks with this status (repeatable)",
    )
    tasks.add_argument("--parent", metavar="ID", help="only this parent's tasks")
    tasks.add_argument(
        "--older-than",
        type=_age,
        metavar="AGE",
        help="submitted more than AGE ago (90s, 10m, 2h, 3d, 1w, 1h30m)",
    )
    tasks.add_argument("--newer-than", type=_age, metavar="AGE", help="submitted at most AGE ago")
    _add_paging(tasks, default_limit=50)
    tasks.set_defaults(func=cmd_tasks)


def _add_show(commands: Subparsers, common: _Parser) -> None:
    show = commands.add_parser(
        "show", parents=[common], help="one task in full", description="Show one task in full."
    )
    show.add_argument("task_id", metavar="TASK_ID")
    show.set_defaults(func=cmd_show)


def _add_pending(commands: Subparsers, common: _Parser) -> None:
    pending = commands.add_parser(
        "pending",
        parents=[common],
        help="the pending (wake-up) queue",
        description="List queued results in enqueue order.",
    )
    pending.add_argument("--parent", metavar="ID", help="only this parent's items")
    _add_paging(pending, default_limit=100)
    pending.set_defaults(func=cmd_pending)


def _add_stats(commands: Subparsers, common: _Parser) -> None:
    stats = commands.add_parser(
        "stats", parents=[common], help="counts by status", description="Counts by status."
    )
    stats.set_defaults(func=cmd_stats)


def _add_migrate(commands: Subparsers, common: _Parser) -> None:
    migrate = commands.add_parser(
        "migrate",
        parents=[common],
        help="upgrade the schema to the current revision",
        description="Upgrade (or create) the database at the head revision.",
    )
    migrate.add_argument(
        "--show", action="store_true", help="only print the current revision (read-only)"
    )
    migrate.set_defaults(func=cmd_migrate)


def _add_drain(commands: Subparsers, common: _Parser) -> None:
    drain = commands.add_parser(
        "drain",
        parents=[common],
        help="remove and print pending results",
        description="Drain the pending queue (all of it, or one parent's items).",
    )
    drain.add_argument("--parent", metavar="ID", help="only this parent's items")
    drain.set_defaults(func=cmd_drain)


def _add_requeue(commands: Subparsers, common: _Parser) -> None:
    requeue = commands.add_parser(
        "requeue",
        parents=[common],
        help="queue a finished task's result again",
        description="Put a SUCCESS task back in the pending queue.",
    )
    requeue.add_argument("task_id", metavar="TASK_ID")
    requeue.set_defaults(func=cmd_requeue)


def _add_purge(commands: Subparsers, common: _Parser) -> None:
    purge = commands.add_parser(
        "purge",
        parents=[common],
        help="delete finished tasks older than an age",
        description="Delete success/failed/timeout tasks last updated more than AGE ago "
        "that are not pending.",
    )
    purge.add_argument(
        "--older-than", type=_age, metavar="AGE", required=True, help="e.g. 30d, 12h, 1w"
    )
    purge.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    purge.add_argument(
        "--batch-size", type=_int_at_least(1), default=PURGE_BATCH, help="tasks per transaction"
    )
    purge.set_defaults(func=cmd_purge)


# -- read commands ---------------------------------------------------------------------


def cmd_tasks(args: argparse.Namespace, out: Console) -> int:
    """``tasks``: filtered, newest first, paged."""
    target = resolve_target(args.db)
    flags = (
        bool(args.status),
        args.parent is not None,
        bool(args.older_than),
        bool(args.newer_than),
    )
    params: dict[str, Any] = {"limit": args.limit, "offset": args.offset}
    if args.status:
        params["statuses"] = sorted(set(args.status))
    if args.parent is not None:
        params["parent"] = args.parent
    if args.older_than:
        params["older_than"] = age_cutoff(args.older_than[1])
    if args.newer_than:
        params["newer_than"] = age_cutoff(args.newer_than[1])
    with open_for_reading(target) as connection:
        total = connection.execute(q.count_tasks(*flags), params).scalar_one()
        rows = connection.execute(q.select_task_page(*flags), params).mappings().all()
    items = [task_summary(row) for row in rows]
    if args.json:
        emit_json({"total": total, "limit": args.limit, "offset": args.offset, "tasks": items})
        return 0
    out.print(tasks_table(items, _page_caption(len(items), total, args.offset, "newest first")))
    return 0


def _page_caption(shown: int, total: int, offset: int, order: str) -> str:
    if shown == 0:
        return f"no rows (of {total} matching)"
    more = total - offset - shown
    hint = f"; --offset {offset + shown} for the next {min(more, shown)}" if more > 0 else ""
    return f"{offset + 1}-{offset + shown} of {total}, {order}{hint}"


def cmd_show(args: argparse.Namespace, out: Console) -> int:
    """``show TASK_ID``: one task with its payload and result."""
    target = resolve_target(args.db)
    with open_for_reading(target) as connection:
        row = connection.execute(q.select_task_detail(), {"id": args.task_id}).mappings().first()
    if row is None:
        raise CliError(f"no task {args.task_id!r} in {target.describe()}")
    item = task_detail(row)
    if args.json:
        emit_json(item)
    else:
        print_detail(out, item)
    return 0


def cmd_pending(args: argparse.Namespace, out: Console) -> int:
    """``pending``: queued results in enqueue order."""
    target = resolve_target(args.db)
    by_parent = args.parent is not None
    params = {"parent": args.parent, "limit": args.limit, "offset": args.offset}
    with open_for_reading(target) as connection:
        total = connection.execute(q.count_pending(by_parent), params).scalar_one()
        rows = connection.execute(q.select_pending(by_parent), params).mappings().all()
    items = [pending_item(row) for row in rows]
    if args.json:
        emit_json({"total": total, "limit": args.limit, "offset": args.offset, "pending": items})
        return 0
    out.print(pending_table(items, _page_caption(len(items), total, args.offset, "enqueue order")))
    return 0


def cmd_stats(args: argparse.Namespace, out: Console) -> int:
    """``stats``: counts by status and the queue's length."""
    target = resolve_target(args.db)
    with open_for_reading(target) as connection:
        counted = {str(status): int(n) for status, n in connection.execute(q.count_by_status())}
        pending = connection.execute(q.count_pending(False)).scalar_one()
        oldest = connection.execute(q.oldest_pending()).scalar()
    by_status = {status: counted.pop(status, 0) for status in STATUSES} | counted
    document = {
        "database": target.describe(),
        "schema_revision": HEAD_REVISION,
        "total": sum(by_status.values()),
        "by_status": by_status,
        "pending": pending,
        "oldest_pending_at": iso_time(oldest),
    }
    if args.json:
        emit_json(document)
        return 0
    table = Table(title=Text(sanitize(target.describe())), title_justify="left")
    table.add_column("status")
    table.add_column("tasks", justify="right")
    for status, count in by_status.items():
        table.add_row(safe(status), str(count))
    table.add_section()
    table.add_row("total", str(document["total"]), style="bold")
    table.add_row("pending", str(pending), style="yellow" if pending else "")
    out.print(table)
    if oldest is not None:
        out.print(f"oldest pending result queued at {markup_safe(oldest[:19])} UTC")
    return 0


# -- migrate ---------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, out: Console) -> int:
    """``migrate``: upgrade (or create) to head; ``--show`` only reads the revision."""
    target = resolve_target(args.db)
    if args.show:
        revision = read_revision(target)
        _report_revision(args, out, target.describe(), revision, revision)
        return 0
    from orbiter import migrate
    from orbiter.store.engine import check_sqlite_file, create_private_file

    path = target.path
    assert path is not None
    before = None
    if check_sqlite_file(path):
        before = read_revision(target)
    elif not path.exists():
        create_private_file(path)
        if not args.json:
            out.print(f"created {markup_safe(path)}")
    after = migrate.upgrade(str(path))
    _report_revision(args, out, target.describe(), before, after)
    return 0


def _report_revision(
    args: argparse.Namespace, out: Console, where: str, before: str | None, after: str | None
) -> None:
    document = {
        "database": where,
        "previous_revision": before,
        "revision": after,
        "head": HEAD_REVISION,
        "up_to_date": after == HEAD_REVISION,
    }
    if args.json:
        emit_json(document)
        return
    shown = markup_safe(after or "none")
    if args.show:
        state = "up to date" if after == HEAD_REVISION else f"this version needs {HEAD_REVISION}"
        out.print(f"{markup_safe(where)}: revision {shown} ({state})")
    elif before == after:
        out.print(f"{markup_safe(where)}: already at revision {shown} (head)")
    else:
        out.print(f"{markup_safe(where)}: upgraded from {markup_safe(before or 'none')} to {shown}")


# -- write commands --------------------------------------------------------------------


def cmd_drain(args: argparse.Namespace, out: Console) -> int:
    """``drain``: take results off the queue (all, or one parent's) and print them."""
    target = resolve_target(args.db)
    with open_for_reading(target):
        pass  # exists, is ours, is at head: the handler below will not create or migrate
    assert target.path is not None
    items = asyncio.run(_drain(str(target.path), args.parent, out, quiet=args.json))
    if args.json:
        emit_json({"count": len(items), "drained": items})
    else:
        out.print(f"drained {len(items)} result(s)")
    return 0


async def _drain(
    database: str, parent: str | None, out: Console, *, quiet: bool
) -> list[dict[str, Any]]:
    """Drain through the library (``drain_pending``: claim-aware, acknowledged per item)."""
    from orbiter._internal.background import BackgroundTaskHandler

    items: list[dict[str, Any]] = []
    async with BackgroundTaskHandler(database=database, auto_migrate=False) as handler:
        async for task in handler.drain_pending(parent):
            item = {
                "task_id": task.task_id,
                "parent_task_id": task.parent_task_id,
                "status": task.status.value,
                "merge_mode": task.merge_mode.value if task.merge_mode else None,
                "result": task.result,
                "error": task.error,
            }
            items.append(item)
            if not quiet:
                _print_drained(out, item)
    return items


def _print_drained(out: Console, item: dict[str, Any]) -> None:
    line = Text("drained ")
    line.append(safe(item["task_id"]))
    line.append(" (parent ")
    line.append(safe(item["parent_task_id"]))
    line.append(f", {item['status']}): ")
    outcome = item["error"] if item["error"] is not None else _one_line_json(item["result"])
    line.append(safe(outcome))
    out.print(line)


def _one_line_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def cmd_requeue(args: argparse.Namespace, out: Console) -> int:
    """``requeue TASK_ID``: queue a SUCCESS task's result for the next drain again."""
    target = resolve_target(args.db)
    with open_for_writing(target) as connection, connection.begin():
        state = connection.execute(q.task_queue_state(), {"id": args.task_id}).first()
        if state is None:
            raise CliError(f"no task {args.task_id!r} in {target.describe()}")
        status, _ = state
        if status != "success":
            raise CliError(
                f"task {args.task_id!r} is {status}; only a task that finished with "
                "status success can be requeued"
            )
        # As a handler's push does: an item a drain has merged (not deleted yet) goes.
        assert target.path is not None  # resolve_target gives file targets only
        acks = AckFile.beside(target.path)
        try:
            raw = connection.connection.driver_connection  # the transaction begun above
            queued = not enqueue(Db(raw), args.task_id, acks)  # type: ignore[arg-type]
        finally:
            acks.close()
    if args.json:
        emit_json(
            {"task_id": args.task_id, "requeued": not queued, "already_pending": bool(queued)}
        )
    elif queued:
        out.print(f"task {markup_safe(args.task_id)} is already pending; nothing changed")
    else:
        out.print(
            f"requeued {markup_safe(args.task_id)}: the next drain_pending() delivers it again"
        )
    return 0


def cmd_purge(args: argparse.Namespace, out: Console) -> int:
    """``purge --older-than AGE``: delete old finished tasks (or list them: ``--dry-run``)."""
    target = resolve_target(args.db)
    text, age = args.older_than
    cutoff = age_cutoff(age)
    if args.dry_run:
        with open_for_reading(target) as connection:
            rows = connection.execute(q.purgeable_tasks(), {"cutoff": cutoff}).all()
        ids = [str(row[0]) for row in rows]
        if not args.json:
            _print_dry_run(out, rows, text)
    else:
        ids = _purge(target, cutoff, args.batch_size, quiet=args.json)
        if not args.json:
            out.print(f"deleted {len(ids)} finished task(s) last updated more than {text} ago")
    if args.json:
        document = {
            "dry_run": args.dry_run,
            "older_than": text,
            "cutoff": iso_time(cutoff),
            "count": len(ids),
            "task_ids": ids,
        }
        emit_json(document)
    return 0


def _print_dry_run(out: Console, rows: Sequence[Any], age_text: str) -> None:
    out.print(
        f"dry run: would delete {len(rows)} finished task(s) last updated more than "
        f"{markup_safe(age_text)} ago (nothing was deleted)"
    )
    if not rows:
        return
    table = Table()
    for name in ("task", "status", "updated (UTC)"):
        table.add_column(name, overflow="fold")
    for task_id, status, updated in rows[:DRY_RUN_SHOWN]:
        table.add_row(safe(task_id), safe(status), safe(str(updated)[:19]))
    out.print(table)
    if len(rows) > DRY_RUN_SHOWN:
        out.print(f"... and {len(rows) - DRY_RUN_SHOWN} more (--json lists them all)")


def _purge(target: DatabaseTarget, cutoff: str, batch: int, *, quiet: bool) -> list[str]:
    """Delete in batches of ``batch`` tasks, one transaction each; return the ids."""
    deleted: list[str] = []
    with open_for_writing(target) as connection:
        with connection.begin():
            total = int(connection.execute(q.count_purgeable(), {"cutoff": cutoff}).scalar_one())
        if total == 0:
            return deleted
        errors = Console(stderr=True)
        progress = Progress(
            TextColumn("purging"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=errors,
            disable=quiet or total <= batch or not errors.is_terminal,
        )
        with progress:
            bar = progress.add_task("purge", total=total)
            while True:
                with connection.begin():
                    params = {"cutoff": cutoff, "batch": batch}
                    rows = connection.execute(q.delete_purgeable_batch(), params).all()
                # Oldest first, as a dry run lists them (each batch is older than the next).
                rows = sorted(rows, key=lambda row: (row.updated_at, row.task_id))
                deleted.extend(str(row.task_id) for row in rows)
                progress.update(bar, completed=len(deleted), total=max(total, len(deleted)))
                if len(rows) < batch:
                    return deleted


# -- demo ------------------------------------------------------------------------------


def _add_orphans(commands: Subparsers, common: _Parser) -> None:
    orphans = commands.add_parser(
        "orphans",
        parents=[common],
        help="list (or settle) running tasks whose owner process is gone",
        description=(
            "List running tasks whose owner is gone (its process exited on this host, its "
            "handler closed, or its lease expired). With --settle, mark them FAILED or TIMEOUT."
        ),
    )
    orphans.add_argument(
        "--settle", choices=("fail", "timeout"), help="settle them (default: only list)"
    )
    orphans.set_defaults(func=cmd_orphans)


def cmd_orphans(args: argparse.Namespace, out: Console) -> int:
    """``orphans``: running tasks whose owner is gone; ``--settle`` marks them."""
    target = resolve_target(args.db)
    if args.settle:
        with open_for_reading(target):
            pass  # exists, is ours, is at head
        assert target.path is not None
        found = asyncio.run(_settle_orphans(str(target.path), args.settle))
        _add_owners(target, found)
    else:
        found = _list_orphans(target)
    if args.json:
        emit_json({"settled": args.settle, "count": len(found), "orphans": found})
        return 0
    verb = {"fail": "marked FAILED", "timeout": "marked TIMEOUT", None: "found"}[args.settle]
    for item in found:
        line = Text(f"{verb}: ")
        line.append(safe(item["task_id"]))
        line.append(" (parent ")
        line.append(safe(item["parent_task_id"]))
        line.append("): ")
        line.append(safe(item["reason"]))
        out.print(line)
    out.print(f"{len(found)} orphaned task(s) {verb}")
    return 0


def _list_orphans(target: DatabaseTarget) -> list[dict[str, Any]]:
    from orbiter.store.owner import OwnerIdentity, owner_gone_reason
    from orbiter.store.queries import select_owners

    me, now = OwnerIdentity.of_this_process(), utc_now_text()
    found: list[dict[str, Any]] = []
    with open_for_reading(target) as connection:
        owners = {row.owner_id: dict(row._mapping) for row in connection.execute(select_owners())}
        for row in connection.execute(q.active_tasks_with_owner()):
            reason = owner_gone_reason(owners.get(row.owner_id), me, now)
            if reason is not None:
                found.append(
                    {
                        "task_id": row.task_id,
                        "parent_task_id": row.parent_task_id,
                        "owner_id": row.owner_id,
                        "reason": reason,
                    }
                )
    return found


async def _settle_orphans(database: str, action: str) -> list[dict[str, Any]]:
    from orbiter._internal.background import BackgroundTaskHandler

    async with BackgroundTaskHandler(database=database, auto_migrate=False) as handler:
        settled = await handler.recover_orphans(action)
    return [
        {
            "task_id": task.task_id,
            "parent_task_id": task.parent_task_id,
            "owner_id": None,  # see _add_owners
            "reason": task.error or "orphaned",
            "status": task.status.value,
        }
        for task in settled
    ]


def _add_owners(target: DatabaseTarget, settled: list[dict[str, Any]]) -> None:
    """Fill in the owner each settled task had (its row keeps it; the task object not)."""
    with open_for_reading(target) as connection:
        for start in range(0, len(settled), OWNER_LOOKUP_BATCH):
            batch = settled[start : start + OWNER_LOOKUP_BATCH]
            ids = [item["task_id"] for item in batch]
            rows = connection.execute(q.owners_of_tasks(), {"task_ids": ids})
            owner_of: dict[str, str | None] = {row.task_id: row.owner_id for row in rows}
            for item in batch:
                item["owner_id"] = owner_of.get(item["task_id"])


def cmd_demo(args: argparse.Namespace, out: Console) -> int:
    """``demo``: the crash-and-restore demonstration (see :mod:`orbiter.demo`)."""
    from orbiter.demo import run_demo

    return run_demo(args.db, tasks=args.tasks, seed=args.seed, console=out)


# -- entry point -----------------------------------------------------------------------


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"orbiter-bg: error: {sanitize(message)}\n")
    return code


def _stdout_console() -> Console:
    """Rich on stdout; piped output gets wide lines (ids stay whole) unless $COLUMNS is set."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console(highlight=False)
    return Console(width=PIPE_WIDTH, highlight=False)


def _configure_logging(verbosity: int) -> None:
    """The library only logs; the CLI decides what reaches stderr (errors; -v adds more).

    Outcomes the command reports itself (a settled orphan, a failed task) stay quiet.
    """
    root = logging.getLogger()
    if root.handlers:  # embedded (e.g. under a test runner): the host's logging decides
        return
    level = {0: logging.ERROR, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("orbiter-bg: %(levelname)s: %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(root.level, level) if root.level else level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``orbiter-bg``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.json:
        parser.error("demo does not take --json (its exit status says whether anything was lost)")
    _configure_logging(args.verbose)
    command: Command = args.func
    try:
        return command(args, _stdout_console())
    except CliError as exc:
        return _fail(str(exc), exc.exit_code)
    except OrbiterError as exc:
        return _fail(str(exc), 1)
    except (sa_exc.DBAPIError, sqlite3.Error) as exc:
        # Named as a handler names it ("corrupt", "locked", "full", ...) where it can be.
        translated = translate_error("database", exc)
        if translated is not exc:
            return _fail(str(translated), 1)
        return _fail(f"database error: {getattr(exc, 'orig', exc)}", 1)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
