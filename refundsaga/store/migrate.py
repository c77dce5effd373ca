"""Run the OASIS store's Alembic migrations from code: upgrade, downgrade, current, wait."""

from __future__ import annotations

import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, make_url, pool, text
from sqlalchemy.exc import OperationalError

from refundsaga.store.engine import sqlite_database_path
from refundsaga.store.errors import DatabaseUnavailable

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    """Build an Alembic configuration for the store's migrations and the given database.

    No ini file is read: the script location is this package's ``migrations`` directory and the
    URL is exactly ``url``, so whatever an ``alembic.ini`` says cannot redirect the migration.

    Args:
        url: SQLAlchemy URL of the database to migrate.

    Returns:
        A Config ready for ``alembic.command``.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    # ConfigParser interpolates '%', which URL-encoded passwords contain.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database up to ``revision``; safe to run again at head.

    Args:
        url: SQLAlchemy URL of the database.
        revision: Target revision, ``head`` by default.
    """
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database down to ``revision`` (``base`` drops every table).

    Args:
        url: SQLAlchemy URL of the database.
        revision: Target revision, e.g. ``base`` or ``-1``.
    """
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database is at.

    Args:
        url: SQLAlchemy URL of the database.

    Returns:
        The revision id, or None for a database that was never migrated (or does not exist).
    """
    path = sqlite_database_path(url)
    if path is not None and not path.exists():
        # Connecting would create an empty file as a side effect of a read-only question.
        return None
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def wait_for_database(url: str, timeout_s: float = 30) -> None:
    """Block until the database accepts connections, e.g. while its container starts.

    Args:
        url: SQLAlchemy URL of the database.
        timeout_s: How long to keep trying, in seconds.

    Raises:
        DatabaseUnavailable: The database did not answer within ``timeout_s``.
    """
    connect_args: dict[str, object] = {}
    if make_url(url).get_backend_name() == "postgresql":
        # Without it one attempt against a black-holed host could outlast the whole timeout.
        connect_args["connect_timeout"] = max(1, min(10, int(timeout_s)))
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    attempts = 0
    try:
        while True:
            attempts += 1
            try:
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                return
            except OperationalError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    shown = make_url(url).render_as_string(hide_password=True)
                    raise DatabaseUnavailable(
                        f"database {shown} not reachable after {timeout_s:g}s "
                        f"({attempts} attempts): {exc.orig or exc}"
                    ) from exc
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 2.0)
    finally:
        engine.dispose()
