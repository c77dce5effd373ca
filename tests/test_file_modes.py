"""The store file, its directory and the stack's logs are the owner's only."""

from __future__ import annotations

import stat
from pathlib import Path

from console.stack import private_directory, private_log
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


def test_a_sandbox_state_file_and_its_new_directory_are_owner_only(tmp_path: Path) -> None:
    import os

    from sandboxes.common import StateFile

    state = tmp_path / "data" / "processor.json"
    previous = os.umask(0o022)  # the usual umask, which makes new directories world-readable
    try:
        StateFile(state).save({"charges": {"ch_1": {"amount": 2500}}})
        assert mode(state.parent) == 0o700 and mode(state) == 0o600
        # A file left world-readable by an older version is replaced by an owner-only one.
        state.chmod(0o644)
        StateFile(state).save({"charges": {}})
        assert mode(state) == 0o600
    finally:
        os.umask(previous)
