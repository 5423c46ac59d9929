"""Alembic environment for orbiter-background.

Two ways in:
* from code (the handler, ``orbiter.migrate``, the CLI): a ready sync connection arrives in
  ``config.attributes["connection"]`` and the caller owns the transaction;
* from the ``alembic`` command: the database comes from ``ORBITER_BG_DATABASE`` (a path or
  a SQLAlchemy URL) and is opened through the async driver (aiosqlite).
"""

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.pool import NullPool

from orbiter.migrate import check_foreign_keys
from orbiter.store.engine import (
    ENV_VAR,
    configure_sqlite_engine,
    enable_wal,
    guarded_open,
    ready_file,
    resolve_database,
    run_pragma,
)
from orbiter.store.schema import metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_from_env() -> str:
    database = os.environ.get(ENV_VAR, "").strip()
    if not database:
        raise SystemExit(f"set {ENV_VAR} to the database path or URL, e.g. {ENV_VAR}=tasks.db")
    return database


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,  # SQLite rebuilds tables to alter them
        compare_type=True,
    )


def run_migrations(connection: Connection) -> None:
    """Run the migrations on a sync connection inside one transaction."""
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    """The ``alembic`` command's path: open ORBITER_BG_DATABASE through aiosqlite."""
    from sqlalchemy.ext.asyncio import create_async_engine

    target = resolve_database(_database_from_env())
    with guarded_open(ready_file(target), target.describe()):
        pass  # a damaged file is refused, as a handler refuses it, and left as it was
    engine = create_async_engine(target.async_url, poolclass=NullPool)
    configure_sqlite_engine(engine.sync_engine)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_pragma, "PRAGMA foreign_keys=OFF")
            async with connection.begin():
                await connection.run_sync(run_migrations)
                await connection.run_sync(check_foreign_keys)
            await connection.run_sync(enable_wal)
    finally:
        await engine.dispose()


def run_offline() -> None:
    """Print the SQL instead of running it (``alembic upgrade head --sql``)."""
    context.configure(
        url=resolve_database(_database_from_env()).url,
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
elif (given := config.attributes.get("connection")) is not None:
    run_migrations(given)
else:
    asyncio.run(run_async_migrations())
