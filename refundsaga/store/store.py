"""The OASIS store's one entry point: the store's parts over one engine, behind the methods
the activities, CLI and tests call."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Engine

from refundsaga.store.audit import SYSTEM_ACTOR, AuditEvent, AuditTrail
from refundsaga.store.batches import Batches, PlannedItem
from refundsaga.store.engine import (
    SQLITE_BUSY_TIMEOUT_MS,
    Transactions,
    create_store_engine,
    ensure_sqlite_directory,
    sqlite_database_path,
)
from refundsaga.store.ledger import Ledger
from refundsaga.store.progress import ENTITLING_STATUSES, AccessSubject, Progress
from refundsaga.store.purchases import Purchases
from refundsaga.store.seeding import SeedWriter
from refundsaga.store.snapshots import (
    PurgeOutcome,
    RestoreOutcome,
    RestoreRefused,
    SnapshotInfo,
    Snapshots,
)

__all__ = [
    "ENTITLING_STATUSES",
    "SQLITE_BUSY_TIMEOUT_MS",
    "SYSTEM_ACTOR",
    "AccessSubject",
    "AuditEvent",
    "OasisStore",
    "PlannedItem",
    "PurgeOutcome",
    "RestoreOutcome",
    "RestoreRefused",
    "SnapshotInfo",
    "ensure_sqlite_directory",
    "sqlite_database_path",
]

_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


def _delegate(
    part: str, method: Callable[Concatenate[Any, _Params], _Result]
) -> Callable[Concatenate[OasisStore, _Params], _Result]:
    """A method of the store that calls `method` on the part named `part`, with the same
    signature and docstring, so each signature is written once, where the work is done."""

    @functools.wraps(method)
    def call(store: OasisStore, /, *args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        return method(getattr(store, part), *args, **kwargs)

    return call


class OasisStore:
    """The OASIS platform's data, through SQLAlchemy, for the refund saga.

    Every method runs in a transaction of its own and is safe to call again with the same
    arguments, because activities are retried. Records carry identifiers and money only:
    personal data stays in the database. Each method hands over to the part of the store
    that owns it (``purchases``, ``ledger``, ``progress``, ``snapshots``, ``batches``,
    ``audit``, ``seed``), where it is documented.

    Errors: ``StoreError`` (and ``PurchaseNotFound``) when the request contradicts the data,
    which a retry will not change; SQLAlchemy errors for the database itself, which may pass.
    """

    def __init__(self, engine: Engine) -> None:
        """Use an engine; for SQLite it is given foreign keys, WAL and explicit transactions.

        Args:
            engine: The engine to use. The caller keeps ownership: ``close`` leaves it open.
                SQLite settings apply to connections opened from now on, so pass a fresh engine.
        """
        transactions = Transactions(engine)
        self._engine = engine
        self._owns_engine = False
        self.purchases = Purchases(transactions)
        self.ledger = Ledger(transactions)
        self.progress = Progress(transactions)
        self.snapshots = Snapshots(transactions)
        self.batches = Batches(transactions)
        self.audit = AuditTrail(transactions)
        self.seed = SeedWriter(transactions)

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 5) -> OasisStore:
        """Create a store with an engine of its own.

        Args:
            url: SQLAlchemy URL, ``sqlite:///path`` or ``postgresql+psycopg://...``.
            pool_size: Connections kept open (PostgreSQL); size it to the worker's concurrency.

        Returns:
            A store that disposes of its engine on ``close``.
        """
        store = cls(create_store_engine(url, pool_size=pool_size))
        store._owns_engine = True
        return store

    @property
    def engine(self) -> Engine:
        """The engine the store uses."""
        return self._engine

    def close(self) -> None:
        """Close the pooled connections of an engine made by ``from_url``."""
        if self._owns_engine:
            self._engine.dispose()

    def __enter__(self) -> OasisStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- purchases -------------------------------------------------------------------------
    load_purchase = _delegate("purchases", Purchases.load_purchase)
    claim_purchase = _delegate("purchases", Purchases.claim_purchase)
    check_refund = _delegate("purchases", Purchases.check_refund)

    # -- ledger ----------------------------------------------------------------------------
    ledger_entries = _delegate("ledger", Ledger.ledger_entries)
    record_refunds = _delegate("ledger", Ledger.record_refunds)
    complete_refund = _delegate("ledger", Ledger.complete_refund)
    end_entitlement = _delegate("ledger", Ledger.end_entitlement)
    close_saga = _delegate("ledger", Ledger.close_saga)

    # -- progress and access ---------------------------------------------------------------
    revoke_progress = _delegate("progress", Progress.revoke_progress)
    access_facts = _delegate("progress", Progress.access_facts)
    access_subject = _delegate("progress", Progress.access_subject)
    archived_progress = _delegate("progress", Progress.archived_progress)

    # -- restores and purges ---------------------------------------------------------------
    snapshot_info = _delegate("snapshots", Snapshots.snapshot_info)
    restore_progress = _delegate("snapshots", Snapshots.restore_progress)
    purge_expired_snapshots = _delegate("snapshots", Snapshots.purge_expired_snapshots)

    # -- batches ---------------------------------------------------------------------------
    batch_candidates = _delegate("batches", Batches.batch_candidates)
    save_batch_items = _delegate("batches", Batches.save_batch_items)
    batch_page = _delegate("batches", Batches.batch_page)
    batch_items = _delegate("batches", Batches.batch_items)

    # -- audit -----------------------------------------------------------------------------
    add_audit = _delegate("audit", AuditTrail.add_audit)
    record_workflow_end = _delegate("audit", AuditTrail.record_workflow_end)
    audit_trail = _delegate("audit", AuditTrail.audit_trail)
    purchase_audit = _delegate("audit", AuditTrail.purchase_audit)

    # -- seeding (demo data, tests) --------------------------------------------------------
    create_user = _delegate("seed", SeedWriter.create_user)
    create_product = _delegate("seed", SeedWriter.create_product)
    create_purchase = _delegate("seed", SeedWriter.create_purchase)
    add_progress = _delegate("seed", SeedWriter.add_progress)
