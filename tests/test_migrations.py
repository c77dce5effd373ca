"""Tests of the store's Alembic migrations on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, pool

from refundsaga.store import DatabaseUnavailable, OasisStore
from refundsaga.store.migrate import (
    MIGRATIONS_DIR,
    alembic_config,
    current,
    downgrade,
    upgrade,
    wait_for_database,
)
from refundsaga.store.schema import Base

REPO = Path(__file__).resolve().parents[1]
TABLES = {
    "users",
    "products",
    "purchases",
    "refunds",
    "course_progress",
    "progress_archive",
    "audit_events",
    "refund_claims",
    "refund_request_nonces",
    "processor_events",
    "processor_sweep_marks",
}
# Indexes the saga's queries depend on (unique constraints are indexes too).
INDEXED = {
    "purchases": [["user_id", "product_id"], ["processor_charge_id"]],
    "refunds": [["purchase_id"], ["workflow_id"], ["processor_refund_id"]],
    "course_progress": [["user_id", "product_id", "item_key"]],
    "progress_archive": [["user_id", "product_id"], ["workflow_id"]],
    "audit_events": [["workflow_id"], ["purchase_id"]],
    "products": [["code"]],
    "users": [["ams_member_id"]],
}


def head() -> str | None:
    """The head revision of the store's migrations."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def table_names(url: str) -> set[str]:
    """The tables in the database."""
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_up_down_up(store_url: str) -> None:
    assert current(store_url) is None

    upgrade(store_url)
    assert current(store_url) == head() == "0005"
    assert table_names(store_url) >= TABLES

    downgrade(store_url, "base")
    assert current(store_url) is None
    assert table_names(store_url) & TABLES == set()

    upgrade(store_url)
    assert current(store_url) == head()
    # The schema is usable after the round trip, not just present.
    with OasisStore.from_url(store_url) as store:
        user_id = store.create_user(name="A", email="a@example.org")
        product_id = store.create_product(code="C", title="C", entitlement_source="oasis")
        assert store.access_facts(user_id, product_id).progress_count == 0


def test_upgrade_at_head_is_a_no_op(store_url: str) -> None:
    upgrade(store_url)
    upgrade(store_url)

    assert current(store_url) == head()


def test_migrations_match_the_models(store_url: str) -> None:
    upgrade(store_url)
    engine = create_engine(store_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()

    assert diff == []


def test_saga_lookups_have_indexes(store_url: str) -> None:
    upgrade(store_url)
    engine = create_engine(store_url, poolclass=pool.NullPool)
    try:
        inspector = inspect(engine)
        for table, wanted in INDEXED.items():
            indexed = {tuple(index["column_names"]) for index in inspector.get_indexes(table)}
            indexed |= {
                tuple(unique["column_names"]) for unique in inspector.get_unique_constraints(table)
            }
            for columns in wanted:
                assert tuple(columns) in indexed, f"{table}{columns} has no index"
    finally:
        engine.dispose()


def test_alembic_config_uses_the_given_url_and_package_scripts() -> None:
    url = "postgresql+psycopg://user:p%40ss@db.example:5432/oasis"

    config = alembic_config(url)

    assert config.get_main_option("sqlalchemy.url") == url
    assert Path(str(config.get_main_option("script_location"))) == MIGRATIONS_DIR
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert config.config_file_name is None  # no alembic.ini can redirect it


def test_sqlite_parent_directory_is_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'data' / 'oasis.db'}"

    upgrade(url)

    assert (tmp_path / "nested" / "data" / "oasis.db").is_file()
    assert current(url) == head()


def test_current_of_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    database = tmp_path / "absent.db"

    assert current(f"sqlite:///{database}") is None
    assert not database.exists()


def test_alembic_cli_reads_the_url_from_settings(tmp_path: Path) -> None:
    database = tmp_path / "cli" / "oasis.db"
    env = {**os.environ, "REFUND_DATABASE_URL": f"sqlite:///{database}"}

    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", "refundsaga/store/alembic.ini", "upgrade", "head"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )

    assert current(f"sqlite:///{database}") == head()


def test_wait_for_database_returns_when_reachable(store_url: str) -> None:
    wait_for_database(store_url, timeout_s=5)


def test_wait_for_database_gives_up_with_a_clear_error() -> None:
    # Port 1 on localhost refuses at once: the test measures the retry loop, not the network.
    url = "postgresql+psycopg://postgres:secret@127.0.0.1:1/nothing"
    started = time.monotonic()

    with pytest.raises(DatabaseUnavailable, match=r"not reachable after 0.5s") as raised:
        wait_for_database(url, timeout_s=0.5)

    assert time.monotonic() - started < 5
    assert "secret" not in str(raised.value)
