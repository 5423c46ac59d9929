"""Spell the check on background_tasks.status as comparisons joined by OR, not an IN list.

The two accept exactly the same values. SQLite, though, evaluates a CHECK whose IN list
has more than two constants by building a temporary b-tree of the list every time the
check runs, that is for every task inserted and every status change: about 1.6 us per
``submit`` and 3 us per ``handle_result`` on the machine of the README's benchmark, where
the OR form costs almost nothing.

On SQLite only the text of the constraint in ``sqlite_schema`` changes, the way SQLite's
documentation describes for changes that leave the stored rows as they are ("ALTER
TABLE", section "Making Other Kinds Of Table Schema Changes"): in the migration's
transaction, with ``writable_schema`` on and ``schema_version`` raised by one, so that
every open connection reads the schema again. The new table text is first checked by
creating the table in a scratch in-memory database. This takes the same time on a file
of a million tasks as on an empty one. A file whose table text does not hold the
expected check (changed by hand) is left as it is, since both spellings mean the same;
so is a file on a connection that may not edit its schema (SQLite's defensive mode, on
by default in some builds), and ``alembic upgrade --sql`` writes only a comment (the
edit needs the table's current text). The connection that runs the migration goes on
with the old definition until the migration's transaction commits (the same values are
accepted); every other connection reads the new one.
Other databases are left as they are: they evaluate an IN list of constants without such
a cost, and the two spellings mean the same.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import logging
import sqlite3
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = ("init", "running", "success", "failed", "timeout")
_AS_IN_LIST = "status IN ({})".format(", ".join(f"'{status}'" for status in _STATUSES))
_AS_COMPARISONS = " OR ".join(f"status = '{status}'" for status in _STATUSES)

logger = logging.getLogger("orbiter.migrate")

#: How SQLite words a refusal to edit sqlite_schema: defensive mode ("table sqlite_master
#: may not be modified") or an authorizer ("not authorized").
_REFUSALS = ("may not be modified", "not authorized")


def upgrade() -> None:
    _respell(_AS_IN_LIST, _AS_COMPARISONS)


def downgrade() -> None:
    _respell(_AS_COMPARISONS, _AS_IN_LIST)


def _respell(old: str, new: str) -> None:
    if context.is_offline_mode():
        op.execute(f"-- 0006: the check stays {old!r}: respelling it needs a live file")
        return
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    select_sql = sa.text(
        "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'background_tasks'"
    )
    table_sql = bind.execute(select_sql).scalar_one()
    if table_sql.count(f"CHECK ({old})") != 1:
        return  # not the text the migrations wrote: the same constraint either way
    new_sql = table_sql.replace(f"CHECK ({old})", f"CHECK ({new})")
    scratch = sqlite3.connect(":memory:")
    try:
        scratch.execute(new_sql)  # a typo here would make the file unreadable: try it first
    finally:
        scratch.close()
    version = bind.exec_driver_sql("PRAGMA schema_version").scalar_one()
    bind.exec_driver_sql("PRAGMA writable_schema=ON")
    try:
        with bind.begin_nested():  # a refused edit is undone, and the migration goes on
            bind.execute(
                sa.text(
                    "UPDATE sqlite_schema SET sql = :sql "
                    "WHERE type = 'table' AND name = 'background_tasks'"
                ),
                {"sql": new_sql},
            )
            bind.exec_driver_sql(f"PRAGMA schema_version={int(version) + 1}")
    except sa.exc.DBAPIError as exc:
        if not any(refusal in str(exc.orig) for refusal in _REFUSALS):
            raise  # a full disk, an I/O error...: the migration fails, the file unchanged
        logger.info("status check left as %r: SQLite refused the edit (%s)", old, exc.orig)
    finally:
        bind.exec_driver_sql("PRAGMA writable_schema=OFF")
