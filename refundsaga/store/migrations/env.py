"""Alembic environment of the OASIS store: resolves the database URL and runs the migrations."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, Engine, create_engine, event, pool, text

from refundsaga.store.engine import ensure_sqlite_directory
from refundsaga.store.schema import Base

# Any constant works; it only has to be the same for every process migrating this database.
_MIGRATION_LOCK_KEY = 0x0A515_0001

config = context.config

# Only the alembic CLI loads alembic.ini; refundsaga.store.migrate builds a Config without a
# file, so running migrations from the worker or the tests leaves their logging alone.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    # Run through the alembic CLI: the same URL the worker and the CLI would use.
    from refundsaga.settings import Settings

    return Settings().resolved_database_url


def _make_sqlite_ddl_transactional(engine: Engine) -> None:
    # sqlite3's legacy transaction control never opens a transaction before DDL, so each
    # CREATE/ALTER would commit on its own and a failed migration would leave half a schema.
    # Emitting BEGIN ourselves makes a revision all-or-nothing, as on PostgreSQL. Foreign keys
    # stay off (the default) so batch mode can recreate referenced tables.
    @event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection: object, _record: object) -> None:
        dbapi_connection.isolation_level = None  # type: ignore[attr-defined]

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")


def _configure(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode recreates the table instead.
        render_as_batch=sqlite,
        transactional_ddl=True if sqlite else None,
        compare_type=True,
    )


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Workers starting together may all migrate: one at a time, the others then find
            # the schema at head. PostgreSQL DDL is transactional, so the lock spans it all.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the migrations as SQL, without a database connection."""
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations against the database, on a given connection or a fresh engine."""
    given: Connection | None = config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    url = _database_url()
    ensure_sqlite_directory(url)
    engine = create_engine(url, poolclass=pool.NullPool)
    if engine.dialect.name == "sqlite":
        _make_sqlite_ddl_transactional(engine)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
