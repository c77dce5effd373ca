"""The store file, its directory and the stack's logs are the owner's only."""

from __future__ import annotations

import stat
from pathlib import Path

from refundsaga.stack import private_directory, private_log
from refundsaga.store.store import ensure_sqlite_directory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_sqlite_store_is_created_owner_only(tmp_path: Path) -> None:
    database = tmp_path / "data" / "oasis.db"
    ensure_sqlite_directory(f"sqlite:///{database}")
    assert mode(database.parent) == 0o700 and mode(database) == 0o600


def test_an_existing_world_readable_store_is_made_owner_only(tmp_path: Path) -> None:
    database = tmp_path / "oasis.db"
    database.write_bytes(b"")
    database.chmod(0o644)
    ensure_sqlite_directory(f"sqlite:///{database}")
    assert mode(database) == 0o600


def test_the_stack_logs_and_directories_are_owner_only(tmp_path: Path) -> None:
    logs = tmp_path / "data" / "logs"
    private_directory(logs)
    with private_log(logs / "worker.log") as log:
        log.write(b"line\n")
    assert mode(logs) == 0o700 and mode(logs / "worker.log") == 0o600
