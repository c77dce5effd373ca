"""The store's engine and transactions: SQLite made safe for concurrent writers, and the
read, write and Core-write transactions every part of the store runs in."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

# Long enough to ride out another writer's transaction, short enough that a stuck writer
# surfaces as an error within an activity's timeout.
SQLITE_BUSY_TIMEOUT_MS = 15_000

# SQLite allows 32766 bound parameters per statement; stay far below for IN lists.
IN_CHUNK = 500

# Connection execution option marking a transaction that will write (see _sqlite_begin).
_WRITE_OPTION = "refundsaga_write"

# What the store's helpers write through: an ORM session, or a plain connection where a
# method runs only Core statements (the saga's steps: no unit of work to track and flush).
Db = Session | Connection

_Item = TypeVar("_Item")


def sqlite_database_path(url: str) -> Path | None:
    """The file behind a SQLite URL.

    Args:
        url: Any SQLAlchemy URL.

    Returns:
        The database file's path, or None for other backends and in-memory or URI databases.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or parsed.query.get("uri"):
        return None
    return Path(database)


def ensure_sqlite_directory(url: str) -> None:
    """Create the directory of a SQLite database file, so a fresh data dir just works.

    Args:
        url: Any SQLAlchemy URL; only SQLite file URLs have an effect.
    """
    path = sqlite_database_path(url)
    if path is not None:
        # Purchases and the audit trail are personal data: owner only (SQLite gives its
        # journal files the database file's mode).
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        path.chmod(0o600)


def create_store_engine(url: str, *, pool_size: int) -> Engine:
    """An engine for the store at `url` (see ``OasisStore.from_url``)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_size=pool_size, pool_pre_ping=True)
    ensure_sqlite_directory(url)
    # Sessions hop between the worker's activity threads.
    connect_args = {"check_same_thread": False}
    if sqlite_database_path(url) is None and not parsed.query.get("uri"):
        # Each connection to :memory: is a separate, empty database: share one.
        return create_engine(url, connect_args=connect_args, poolclass=StaticPool)
    return create_engine(url, connect_args=connect_args, pool_size=pool_size)


def _sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    # sqlite3's legacy mode only opens a transaction at the first INSERT/UPDATE/DELETE, so the
    # reads a method makes before writing would not be isolated. _sqlite_begin emits BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL: readers and the single writer do not block each other.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # A write transaction takes the write lock up front: a deferred one that reads first and
    # then writes fails with SQLITE_BUSY, without waiting, if another writer got in between.
    if connection.get_execution_options().get(_WRITE_OPTION):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.exec_driver_sql("BEGIN")


def _configure_sqlite(engine: Engine) -> None:
    if not event.contains(engine, "connect", _sqlite_connect):
        event.listen(engine, "connect", _sqlite_connect)
    if not event.contains(engine, "begin", _sqlite_begin):
        event.listen(engine, "begin", _sqlite_begin)


def chunks(values: Sequence[_Item]) -> Iterator[Sequence[_Item]]:
    """`values` in slices short enough for one IN list."""
    for start in range(0, len(values), IN_CHUNK):
        yield values[start : start + IN_CHUNK]


class Transactions:
    """The transactions the store's parts run in, over one engine they share."""

    def __init__(self, engine: Engine) -> None:
        """Use an engine; for SQLite it is given foreign keys, WAL and explicit transactions.

        Args:
            engine: The engine to use; SQLite settings apply to connections opened from now on.
        """
        if engine.dialect.name == "sqlite":
            _configure_sqlite(engine)
        self.engine = engine
        self._reads = sessionmaker(engine, expire_on_commit=False)
        self._write_engine = engine.execution_options(**{_WRITE_OPTION: True})
        self._writes = sessionmaker(self._write_engine, expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read transaction in an ORM session."""
        with self._reads.begin() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction in an ORM session (on SQLite it takes the write lock up front)."""
        with self._writes.begin() as session:
            yield session

    @contextmanager
    def write_rows(self) -> Iterator[Connection]:
        """A write transaction on a plain connection, for methods of Core statements only."""
        with self._write_engine.begin() as connection:
            yield connection
