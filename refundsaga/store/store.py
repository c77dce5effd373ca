"""The OASIS store: purchases, the refund ledger, course progress and the audit trail."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Select,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    make_url,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from refundsaga.models import (
    AccessFacts,
    EntitlementSource,
    LedgerEntry,
    PurchaseSnapshot,
    PurchaseStatus,
    Record,
    RecordRefundsResult,
    RevokeResult,
)
from refundsaga.store import claims
from refundsaga.store.errors import (
    PurchaseNotFound,
    StoreError,
)
from refundsaga.store.runs import current_run
from refundsaga.store.schema import (
    AuditEventRow,
    CourseProgress,
    Product,
    ProgressArchive,
    Purchase,
    Refund,
    RefundBatchItem,
    User,
    utcnow,
)

SYSTEM_ACTOR = "refund-saga"
"""The actor of the audit events the store writes on the saga's behalf."""

# Statuses under which a purchase still entitles its buyer to the product.
ENTITLING_STATUSES: tuple[PurchaseStatus, ...] = ("active", "partially_refunded")

# Long enough to ride out another writer's transaction, short enough that a stuck writer
# surfaces as an error within an activity's timeout.
SQLITE_BUSY_TIMEOUT_MS = 15_000

# SQLite allows 32766 bound parameters per statement; stay far below for IN lists.
_IN_CHUNK = 500

# Connection execution option marking a transaction that will write (see _sqlite_begin).
_WRITE_OPTION = "refundsaga_write"

# What the store's helpers write through: an ORM session, or a plain connection where a
# method runs only Core statements (the saga's steps: no unit of work to track and flush).
_Db = Session | Connection

# The saga's statements, built once with bound parameters. Building a statement and its cache
# key on every call cost more CPU than the database's own work on these one-row queries
# (bench/README.md, "Statements built once").
_PROGRESS_OF_PURCHASE = (
    select(func.count())
    .select_from(CourseProgress)
    .where(
        CourseProgress.user_id == Purchase.user_id,
        CourseProgress.product_id == Purchase.product_id,
    )
    .correlate(Purchase)
    .scalar_subquery()
)
# A purchase as a refund sees it (PurchaseSnapshot): one saga's, or a batch's many.
_PURCHASE_SNAPSHOTS = (
    select(
        Purchase.id.label("purchase_id"),
        Purchase.user_id,
        Purchase.product_id,
        Product.code.label("product_code"),
        Product.entitlement_source,
        User.ams_member_id,
        Purchase.amount_cents,
        Purchase.currency,
        Purchase.refunded_cents,
        Purchase.status,
        Purchase.processor_charge_id,
        _PROGRESS_OF_PURCHASE.label("progress_count"),
    )
    .join(Product, Product.id == Purchase.product_id)
    .join(User, User.id == Purchase.user_id)
)
_LOAD_PURCHASE = _PURCHASE_SNAPSHOTS.where(Purchase.id == bindparam("purchase_id"))
_ACCESS_FACTS = select(
    select(func.count())
    .select_from(CourseProgress)
    .where(
        CourseProgress.user_id == bindparam("user_id"),
        CourseProgress.product_id == bindparam("product_id"),
    )
    .scalar_subquery(),
    exists().where(
        Purchase.user_id == bindparam("user_id"),
        Purchase.product_id == bindparam("product_id"),
        Purchase.status.in_(ENTITLING_STATUSES),
    ),
)
# FOR UPDATE serializes the saga's writes to one purchase on PostgreSQL (SQLite's BEGIN
# IMMEDIATE already serializes all writers).
_LOCK_PURCHASE = (
    select(Purchase.__table__).where(Purchase.id == bindparam("purchase_id")).with_for_update()
)
_SET_PURCHASE_STATUS = (
    update(Purchase)
    .where(Purchase.id == bindparam("purchase_id"))
    .values(status=bindparam("new_status"))
)
_SET_PURCHASE_REFUNDED = (
    update(Purchase)
    .where(Purchase.id == bindparam("purchase_id"))
    .values(refunded_cents=bindparam("new_refunded_cents"), status=bindparam("new_status"))
)
# The purchase's whole ledger and any row that already holds one of the named refund ids.
_LEDGER_AND_NAMED = select(Refund.__table__).where(
    or_(
        Refund.purchase_id == bindparam("purchase_id"),
        Refund.processor_refund_id.in_(bindparam("refund_ids", expanding=True)),
    )
)
_EVENTS_HELD = (
    select(AuditEventRow.event)
    .where(
        AuditEventRow.workflow_id == bindparam("workflow_id"),
        AuditEventRow.event.in_(bindparam("events", expanding=True)),
    )
    .distinct()
)
# Within a run: what one saga run wrote, not an earlier saga's under the same workflow id.
_RUN_EVENTS_HELD = _EVENTS_HELD.where(AuditEventRow.run_id == bindparam("run_id"))
_PROGRESS_ROWS = (
    select(CourseProgress.__table__)
    .where(
        CourseProgress.user_id == bindparam("user_id"),
        CourseProgress.product_id == bindparam("product_id"),
    )
    .order_by(CourseProgress.id)
    .with_for_update()
)
_INSERT_AUDIT = insert(AuditEventRow)
_INSERT_REFUND = insert(Refund)
# By the processor's refund id, unique in the ledger: also a row inserted in the same call.
_SET_REFUND_STATUS = (
    update(Refund)
    .where(Refund.processor_refund_id == bindparam("refund_id"))
    .values(status=bindparam("new_status"))
)
_DELETE_PROGRESS = delete(CourseProgress).where(
    CourseProgress.id.in_(bindparam("ids", expanding=True))
)


class AccessSubject(Record):
    """Who and what an access check is about, as identifiers."""

    entitlement_source: EntitlementSource
    product_code: str
    ams_member_id: str | None


class AuditEvent(Record):
    """One entry of the audit trail, as the store returns it."""

    at: datetime
    event: str
    actor: str
    workflow_id: str | None
    purchase_id: int | None
    detail: dict[str, Any]
    run_id: str | None = None


class RestoreRefused(StoreError):
    """A restore of archived progress that must not happen: expired, conflicting, or done."""


class PlannedItem(Record):
    """One purchase of a batch refund as planned (identifiers and money only)."""

    purchase_id: int
    included: bool
    skip_reason: str | None
    amount_cents: int
    currency: str | None
    already_refunded: bool
    progress_records: int
    ams_action: str


class SnapshotInfo(Record):
    """What the archive holds for one saga's revoke, for a restore to be judged on."""

    workflow_id: str
    saga_state: str | None
    revoked: bool
    purchase_id: int | None
    user_id: int | None
    product_id: int | None
    rows: int
    archived_at: datetime | None
    restored_at: datetime | None
    restored_by: str | None
    conflicts: int


class RestoreOutcome(Record):
    """Progress rows put back by a restore."""

    restored: int
    purchase_id: int
    user_id: int
    product_id: int


class PurgeOutcome(Record):
    """Archived progress rows deleted because their retention ran out."""

    deleted: int
    sagas: int


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


def _purchase_status(refunded_cents: int, amount_cents: int) -> PurchaseStatus:
    if refunded_cents >= amount_cents:
        return "refunded"
    if refunded_cents > 0:
        return "partially_refunded"
    return "active"


def _jsonable(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def _parse_time(value: object) -> datetime | None:
    # Archived payloads hold times as ISO strings (see revoke_progress).
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _chunks(values: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


class OasisStore:
    """The OASIS platform's data, through SQLAlchemy, for the refund saga.

    Every method runs in a transaction of its own and is safe to call again with the same
    arguments, because activities are retried. Records carry identifiers and money only:
    personal data stays in the database.

    Errors: ``StoreError`` (and ``PurchaseNotFound``) when the request contradicts the data,
    which a retry will not change; SQLAlchemy errors for the database itself, which may pass.
    """

    def __init__(self, engine: Engine) -> None:
        """Use an engine; for SQLite it is given foreign keys, WAL and explicit transactions.

        Args:
            engine: The engine to use. The caller keeps ownership: ``close`` leaves it open.
                SQLite settings apply to connections opened from now on, so pass a fresh engine.
        """
        if engine.dialect.name == "sqlite":
            _configure_sqlite(engine)
        self._engine = engine
        self._owns_engine = False
        self._reads = sessionmaker(engine, expire_on_commit=False)
        self._write_engine = engine.execution_options(**{_WRITE_OPTION: True})
        self._writes = sessionmaker(self._write_engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 5) -> OasisStore:
        """Create a store with an engine of its own.

        Args:
            url: SQLAlchemy URL, ``sqlite:///path`` or ``postgresql+psycopg://...``.
            pool_size: Connections kept open (PostgreSQL); size it to the worker's concurrency.

        Returns:
            A store that disposes of its engine on ``close``.
        """
        parsed = make_url(url)
        engine: Engine
        if parsed.get_backend_name() == "sqlite":
            ensure_sqlite_directory(url)
            # Sessions hop between the worker's activity threads.
            connect_args = {"check_same_thread": False}
            if sqlite_database_path(url) is None and not parsed.query.get("uri"):
                # Each connection to :memory: is a separate, empty database: share one.
                engine = create_engine(url, connect_args=connect_args, poolclass=StaticPool)
            else:
                engine = create_engine(url, connect_args=connect_args, pool_size=pool_size)
        else:
            engine = create_engine(url, pool_size=pool_size, pool_pre_ping=True)
        store = cls(engine)
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

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reads.begin() as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._writes.begin() as session:
            yield session

    @contextmanager
    def _write_rows(self) -> Iterator[Connection]:
        """A write transaction on a plain connection, for methods of Core statements only."""
        with self._write_engine.begin() as connection:
            yield connection

    # -- purchases -------------------------------------------------------------------------

    def load_purchase(self, purchase_id: int) -> PurchaseSnapshot | None:
        """Load a purchase with its product, the buyer's AMS id and their progress count.

        Args:
            purchase_id: The purchase.

        Returns:
            The snapshot, or None if there is no such purchase.
        """
        with self._engine.begin() as connection:
            row = connection.execute(_LOAD_PURCHASE, {"purchase_id": purchase_id}).one_or_none()
        return None if row is None else PurchaseSnapshot.model_validate(dict(row._mapping))

    @staticmethod
    def _locked_purchase(db: _Db, purchase_id: int) -> Row[Any]:
        """The purchase's row, locked for the rest of the transaction."""
        purchase = db.execute(_LOCK_PURCHASE, {"purchase_id": purchase_id}).one_or_none()
        if purchase is None:
            raise PurchaseNotFound(purchase_id)
        return purchase

    def claim_purchase(
        self, *, purchase_id: int, request_id: str, workflow_id: str, nonce: str | None = None
    ) -> str:
        """Claim a purchase for one refund request (see ``claims.claim``), and record the nonce
        of a signed request as used by it.

        Raises:
            PurchaseNotFound: No such purchase.
            PurchaseClaimed: Another saga holds it.
            RequestReplayed: Another saga used the signed request's nonce.
        """
        with self._write_rows() as db:
            self._locked_purchase(db, purchase_id)
            if nonce is not None:
                claims.use_nonce(db, nonce=nonce, request_id=request_id)
            outcome = claims.claim(
                db, purchase_id=purchase_id, request_id=request_id, workflow_id=workflow_id
            )
            if outcome == "taken_over":
                self._audit(
                    db,
                    event="claim_taken_over",
                    workflow_id=workflow_id,
                    purchase_id=purchase_id,
                    detail={"request_id": request_id},
                )
            return outcome

    def check_refund(self, *, purchase_id: int, request_id: str, amount_cents: int) -> None:
        """Refuse a refund its claim or the ledger does not allow (see ``claims.check_refund``).

        Raises:
            PurchaseNotFound: No such purchase.
            RefundRefused: The request does not hold the claim or the ledger has less left.
        """
        with self._engine.begin() as db:
            claims.check_refund(
                db, purchase_id=purchase_id, request_id=request_id, amount_cents=amount_cents
            )

    def record_refunds(
        self, purchase_id: int, entries: list[LedgerEntry], *, workflow_id: str | None
    ) -> RecordRefundsResult:
        """Record refunds in the ledger and bring the purchase's refunded amount up to date.

        Entries already in the ledger (by processor refund id) are not duplicated; only a
        changed status is applied. The purchase's refunded amount is the sum of its ledger
        rows that did not fail, capped at the purchase amount; its status follows, except
        that a revoked purchase stays revoked.

        Args:
            purchase_id: The purchase refunded.
            entries: Refunds to record, e.g. the processor's list for the charge.
            workflow_id: The refund saga recording them, if any.

        Returns:
            How many entries were new, and the purchase's refunded amount and status.

        Raises:
            PurchaseNotFound: No such purchase.
            StoreError: An entry's currency differs from the purchase's, or its refund id is
                already recorded for another purchase or with another amount.
        """
        with self._write_rows() as db:
            purchase = self._locked_purchase(db, purchase_id)
            for entry in entries:
                if entry.currency != purchase.currency:
                    raise StoreError(
                        f"refund {entry.processor_refund_id} is in {entry.currency}, "
                        f"purchase {purchase_id} in {purchase.currency}"
                    )
            refund_ids = sorted({entry.processor_refund_id for entry in entries})
            # One read: the purchase's whole ledger (its refunded amount is their sum) and any
            # row that already holds one of these refund ids, for another purchase too.
            rows = db.execute(
                _LEDGER_AND_NAMED, {"purchase_id": purchase_id, "refund_ids": refund_ids}
            ).all()
            # refund id -> (purchase id, amount, status) as the ledger holds them after this call
            ledger = {
                row.processor_refund_id: (row.purchase_id, row.amount_cents, row.status)
                for row in rows
            }

            recorded = 0
            for entry in entries:
                held = ledger.get(entry.processor_refund_id)
                if held is None:
                    db.execute(
                        _INSERT_REFUND,
                        {
                            "purchase_id": purchase_id,
                            "processor_refund_id": entry.processor_refund_id,
                            "amount_cents": entry.amount_cents,
                            "currency": entry.currency,
                            "source": entry.source,
                            "status": entry.status,
                            "workflow_id": workflow_id,
                        },
                    )
                    ledger[entry.processor_refund_id] = (
                        purchase_id,
                        entry.amount_cents,
                        entry.status,
                    )
                    recorded += 1
                    self._audit(
                        db,
                        event="refund_recorded",
                        workflow_id=workflow_id,
                        purchase_id=purchase_id,
                        detail=entry.model_dump(mode="json"),
                    )
                    continue
                held_purchase, held_amount, held_status = held
                if held_purchase != purchase_id or held_amount != entry.amount_cents:
                    raise StoreError(
                        f"refund {entry.processor_refund_id} is already recorded as "
                        f"{held_amount} for purchase {held_purchase}"
                    )
                if held_status != entry.status:
                    self._audit(
                        db,
                        event="refund_status_changed",
                        workflow_id=workflow_id,
                        purchase_id=purchase_id,
                        detail={
                            "processor_refund_id": entry.processor_refund_id,
                            "from": held_status,
                            "to": entry.status,
                        },
                    )
                    db.execute(
                        _SET_REFUND_STATUS,
                        {"refund_id": entry.processor_refund_id, "new_status": entry.status},
                    )
                    ledger[entry.processor_refund_id] = (held_purchase, held_amount, entry.status)

            counted = sum(
                amount
                for held_purchase, amount, status in ledger.values()
                if held_purchase == purchase_id and status != "failed"
            )
            # Refunds made outside OASIS can exceed what OASIS charged; the ledger keeps them
            # all, the purchase never shows more refunded than paid.
            refunded_cents = min(counted, purchase.amount_cents)
            status = purchase.status
            if status != "revoked":
                status = _purchase_status(refunded_cents, purchase.amount_cents)
            if (refunded_cents, status) != (purchase.refunded_cents, purchase.status):
                db.execute(
                    _SET_PURCHASE_REFUNDED,
                    {
                        "purchase_id": purchase_id,
                        "new_refunded_cents": refunded_cents,
                        "new_status": status,
                    },
                )
            return RecordRefundsResult(
                recorded=recorded,
                refunded_cents=refunded_cents,
                purchase_status=cast(PurchaseStatus, status),
            )

    def complete_refund(
        self, *, purchase_id: int, workflow_id: str, outcome: str, revoked: bool
    ) -> PurchaseStatus:
        """Close the books on a refund: final purchase status and a ``refund_completed`` event.

        A purchase whose progress was revoked becomes ``revoked`` unless it is fully refunded,
        which says more. The event is written once per workflow however often this runs.

        Args:
            purchase_id: The purchase refunded.
            workflow_id: The refund saga.
            outcome: How the saga ended, for the audit trail.
            revoked: Whether the saga revoked the buyer's progress.

        Returns:
            The purchase's status afterwards.

        Raises:
            PurchaseNotFound: No such purchase.
        """
        with self._write_rows() as db:
            status, _ = self._complete_refund(
                db,
                purchase_id=purchase_id,
                workflow_id=workflow_id,
                outcome=outcome,
                revoked=revoked,
            )
            return status

    def _complete_refund(
        self,
        db: _Db,
        *,
        purchase_id: int,
        workflow_id: str,
        outcome: str,
        revoked: bool,
        also: Collection[str] = (),
    ) -> tuple[PurchaseStatus, set[str]]:
        return self._settle_purchase(
            db,
            purchase_id=purchase_id,
            workflow_id=workflow_id,
            revoke=revoked,
            event="refund_completed",
            detail={"outcome": outcome, "revoked": revoked},
            also=also,
        )

    def _settle_purchase(
        self,
        db: _Db,
        *,
        purchase_id: int,
        workflow_id: str,
        revoke: bool,
        event: str,
        detail: dict[str, Any],
        also: Collection[str] = (),
    ) -> tuple[PurchaseStatus, set[str]]:
        """Lock the purchase, make it ``revoked`` when asked unless it is fully refunded (which
        says more), and write `event` with the status once per workflow.

        Returns:
            The purchase's status, and which of `event` and `also` the workflow had written
            before (read in the same query, under the purchase's lock).
        """
        status = self._locked_purchase(db, purchase_id).status
        if revoke and status not in ("refunded", "revoked"):
            status = "revoked"
            db.execute(_SET_PURCHASE_STATUS, {"purchase_id": purchase_id, "new_status": status})
        held = self._events_held(
            db, workflow_id=workflow_id, events=(event, *also), run_id=current_run()
        )
        if event not in held:
            self._audit(
                db,
                event=event,
                workflow_id=workflow_id,
                purchase_id=purchase_id,
                detail={**detail, "status": status},
            )
        return cast(PurchaseStatus, status), held

    def end_entitlement(self, *, purchase_id: int, workflow_id: str) -> PurchaseStatus:
        """End the entitlement an OASIS purchase grants (products whose source is `oasis`).

        A fully refunded purchase grants nothing already; any other becomes ``revoked``. The
        ``entitlement_ended`` event is written once per workflow however often this runs.

        Raises:
            PurchaseNotFound: No such purchase.
        """
        with self._write_rows() as db:
            status, _ = self._settle_purchase(
                db,
                purchase_id=purchase_id,
                workflow_id=workflow_id,
                revoke=True,
                event="entitlement_ended",
                detail={},
            )
            return status

    # -- progress and access ---------------------------------------------------------------

    def revoke_progress(
        self, *, purchase_id: int, user_id: int, product_id: int, workflow_id: str
    ) -> RevokeResult:
        """Archive, then delete, all of a user's progress in a product, in one transaction.

        Deleting progress is what removes access granted by progress, and cannot be undone in
        OASIS; the archive keeps each row as it was. A second run finds nothing left and
        returns zeros.

        Args:
            purchase_id: The refunded purchase, which must be the user's, of the product.
            user_id: The buyer.
            product_id: The product.
            workflow_id: The refund saga, recorded with each archived row.

        Returns:
            How many rows were archived and deleted (always equal).

        Raises:
            PurchaseNotFound: No such purchase.
            StoreError: The purchase is not this user's purchase of this product.
        """
        with self._write_rows() as db:
            purchase = self._locked_purchase(db, purchase_id)
            if (purchase.user_id, purchase.product_id) != (user_id, product_id):
                raise StoreError(
                    f"purchase {purchase_id} is not user {user_id}'s purchase of "
                    f"product {product_id}"
                )
            rows = db.execute(_PROGRESS_ROWS, {"user_id": user_id, "product_id": product_id}).all()
            archived_at = utcnow()
            if rows:
                db.execute(
                    insert(ProgressArchive),
                    [
                        {
                            "original_progress_id": row.id,
                            "user_id": row.user_id,
                            "product_id": row.product_id,
                            "item_key": row.item_key,
                            "payload": {k: _jsonable(v) for k, v in row._mapping.items()},
                            "archived_at": archived_at,
                            "workflow_id": workflow_id,
                            "purchase_id": purchase_id,
                        }
                        for row in rows
                    ],
                )
            # Delete exactly the rows archived: progress written meanwhile is not lost unseen,
            # the saga's access check will find it.
            deleted = 0
            for ids in _chunks([row.id for row in rows]):
                result = db.execute(_DELETE_PROGRESS, {"ids": list(ids)})
                deleted += result.rowcount
            if deleted != len(rows):
                # Raising rolls the archive back too: nothing is half done.
                raise StoreError(
                    f"progress of user {user_id} in product {product_id} changed while "
                    "revoking; nothing was deleted"
                )
            if deleted or not self._has_event(
                db, workflow_id=workflow_id, event="progress_revoked", run_id=current_run()
            ):
                self._audit(
                    db,
                    event="progress_revoked",
                    workflow_id=workflow_id,
                    purchase_id=purchase_id,
                    detail={
                        "user_id": user_id,
                        "product_id": product_id,
                        "archived": len(rows),
                        "deleted": deleted,
                    },
                )
            return RevokeResult(deleted=deleted, archived=len(rows))

    def access_facts(self, user_id: int, product_id: int) -> AccessFacts:
        """What OASIS knows about a user's access: progress, and an entitling purchase.

        Args:
            user_id: The user.
            product_id: The product.

        Returns:
            The progress count and whether a purchase of the product is active or only
            partially refunded.
        """
        params = {"user_id": user_id, "product_id": product_id}
        with self._engine.begin() as connection:
            row = connection.execute(_ACCESS_FACTS, params).one()
        return AccessFacts(progress_count=int(row[0]), active_purchase=bool(row[1]))

    def access_subject(self, user_id: int, product_id: int) -> AccessSubject | None:
        """The identifiers the access rule needs besides the facts: where entitlement comes
        from for the product, and the user's AMS member id. None when either is unknown."""
        statement = select(Product.entitlement_source, Product.code, User.ams_member_id).where(
            Product.id == product_id, User.id == user_id
        )
        with self._read() as session:
            row = session.execute(statement).one_or_none()
        if row is None:
            return None
        return AccessSubject(entitlement_source=row[0], product_code=row[1], ams_member_id=row[2])

    def archived_progress(self, *, workflow_id: str) -> int:
        """Count the progress rows a refund saga archived.

        Args:
            workflow_id: The refund saga.

        Returns:
            The number of archived rows.
        """
        with self._read() as session:
            count = session.scalar(
                select(func.count())
                .select_from(ProgressArchive)
                .where(ProgressArchive.workflow_id == workflow_id)
            )
        return int(count or 0)

    # -- batches, restores and purges ------------------------------------------------------

    def batch_candidates(
        self, *, product_id: int | None = None, purchase_ids: Sequence[int] | None = None
    ) -> list[PurchaseSnapshot]:
        """Every purchase of a product, or the given purchases, as a refund would see them.

        Args:
            product_id: All purchases of this product (uses the product_id index).
            purchase_ids: Or exactly these purchases; ids with no purchase are left out.

        Returns:
            Snapshots ordered by purchase id.

        Raises:
            ValueError: Neither or both of product_id and purchase_ids given.
        """
        if (product_id is None) == (purchase_ids is None):
            raise ValueError("batch_candidates needs a product_id or purchase_ids")
        base = _PURCHASE_SNAPSHOTS.order_by(Purchase.id)
        statements = (
            [base.where(Purchase.product_id == product_id)]
            if purchase_ids is None
            else [base.where(Purchase.id.in_(ids)) for ids in _chunks(sorted(set(purchase_ids)))]
        )
        found: list[PurchaseSnapshot] = []
        with self._read() as session:
            for statement in statements:
                found.extend(
                    PurchaseSnapshot.model_validate(dict(row._mapping))
                    for row in session.execute(statement)
                )
        return sorted(found, key=lambda snapshot: snapshot.purchase_id)

    def save_batch_items(self, batch_id: str, items: Sequence[PlannedItem]) -> None:
        """Record a batch's plan, replacing any earlier plan of the same batch (retries).

        Args:
            batch_id: The batch's workflow id.
            items: One per purchase considered, included or skipped.
        """
        with self._write() as session:
            session.execute(delete(RefundBatchItem).where(RefundBatchItem.batch_id == batch_id))
            now = utcnow()
            rows = [
                {"batch_id": batch_id, "created_at": now, **item.model_dump()} for item in items
            ]
            for start in range(0, len(rows), _IN_CHUNK):
                session.execute(insert(RefundBatchItem), rows[start : start + _IN_CHUNK])

    def batch_page(self, batch_id: str, *, after_purchase_id: int, limit: int) -> list[PlannedItem]:
        """The next included purchases of a batch, by purchase id.

        Args:
            batch_id: The batch's workflow id.
            after_purchase_id: The last purchase already handed out (0 at first).
            limit: At most this many.

        Returns:
            Planned items in increasing purchase id; empty when the batch has no more.
        """
        return self._batch_items(
            select(RefundBatchItem)
            .where(
                RefundBatchItem.batch_id == batch_id,
                RefundBatchItem.included.is_(True),
                RefundBatchItem.purchase_id > after_purchase_id,
            )
            .order_by(RefundBatchItem.purchase_id)
            .limit(limit)
        )

    def batch_items(self, batch_id: str) -> list[PlannedItem]:
        """A batch's whole plan as recorded, by purchase id."""
        return self._batch_items(
            select(RefundBatchItem)
            .where(RefundBatchItem.batch_id == batch_id)
            .order_by(RefundBatchItem.purchase_id)
        )

    def _batch_items(self, statement: Select[RefundBatchItem]) -> list[PlannedItem]:
        with self._read() as session:
            return [
                PlannedItem(
                    purchase_id=row.purchase_id,
                    included=row.included,
                    skip_reason=row.skip_reason,
                    amount_cents=row.amount_cents,
                    currency=row.currency,
                    already_refunded=row.already_refunded,
                    progress_records=row.progress_records,
                    ams_action=row.ams_action,
                )
                for row in session.scalars(statement)
            ]

    def snapshot_info(self, workflow_id: str) -> SnapshotInfo:
        """What a restore of a saga's revoke would put back, and what stands in its way.

        The snapshot is the saga's latest revoke (rows archived together share a time); rows
        restored already are not counted. Conflicts are archived items the user has progress
        in again, which a restore would overwrite.

        Args:
            workflow_id: The refund saga that revoked the progress.
        """
        archive = ProgressArchive
        with self._read() as session:
            ended = session.scalar(
                select(AuditEventRow.detail)
                .where(
                    AuditEventRow.workflow_id == workflow_id,
                    AuditEventRow.event == "saga_ended",
                )
                .order_by(AuditEventRow.at.desc(), AuditEventRow.id.desc())
                .limit(1)
            )
            revoked = self._has_event(session, workflow_id=workflow_id, event="progress_revoked")
            latest = session.execute(
                select(
                    archive.archived_at, archive.purchase_id, archive.user_id, archive.product_id
                )
                .where(archive.workflow_id == workflow_id)
                .order_by(archive.archived_at.desc(), archive.id.desc())
                .limit(1)
            ).one_or_none()
            info: dict[str, Any] = {
                "workflow_id": workflow_id,
                "saga_state": (ended or {}).get("state"),
                "revoked": revoked,
                "purchase_id": None,
                "user_id": None,
                "product_id": None,
                "rows": 0,
                "archived_at": None,
                "restored_at": None,
                "restored_by": None,
                "conflicts": 0,
            }
            if latest is None:
                return SnapshotInfo(**info)
            archived_at, purchase_id, user_id, product_id = latest
            rows = session.execute(
                select(archive.item_key, archive.restored_at, archive.restored_by).where(
                    archive.workflow_id == workflow_id, archive.archived_at == archived_at
                )
            ).all()
            pending = [row.item_key for row in rows if row.restored_at is None]
            restored = [row for row in rows if row.restored_at is not None]
            info.update(
                purchase_id=purchase_id,
                user_id=user_id,
                product_id=product_id,
                rows=len(pending),
                archived_at=archived_at,
                restored_at=max((r.restored_at for r in restored), default=None),
                restored_by=restored[0].restored_by if restored else None,
                conflicts=self._conflicts(session, user_id, product_id, pending),
            )
            return SnapshotInfo(**info)

    @staticmethod
    def _conflicts(session: Session, user_id: int, product_id: int, keys: Sequence[str]) -> int:
        count = 0
        for start in range(0, len(keys), _IN_CHUNK):
            count += int(
                session.scalar(
                    select(func.count())
                    .select_from(CourseProgress)
                    .where(
                        CourseProgress.user_id == user_id,
                        CourseProgress.product_id == product_id,
                        CourseProgress.item_key.in_(keys[start : start + _IN_CHUNK]),
                    )
                )
                or 0
            )
        return count

    def restore_progress(
        self,
        *,
        saga_workflow_id: str,
        archived_at: datetime,
        not_before: datetime,
        restore_workflow_id: str,
        operator: str,
        detail: dict[str, Any],
    ) -> RestoreOutcome:
        """Put a saga's archived progress back, in one transaction, and say so in the trail.

        Safe to run again: a second run by the same restore finds its own rows and returns
        the same outcome.

        Args:
            saga_workflow_id: The refund saga whose revoke is undone.
            archived_at: Which snapshot (the one the approvers saw).
            not_before: Snapshots archived before this have expired (now minus the retention).
            restore_workflow_id: The restore, recorded on each row it puts back.
            operator: Who asked for the restore (the audit event's actor).
            detail: Facts for the audit event (approvers, reason); identifiers only.

        Raises:
            RestoreRefused: The snapshot expired, is gone or already restored, or the user has
                progress again in an archived item (restoring would overwrite it).
        """
        archive = ProgressArchive
        with self._write() as session:
            done = session.scalars(
                select(archive).where(
                    archive.workflow_id == saga_workflow_id,
                    archive.restored_by == restore_workflow_id,
                )
            ).all()
            if done:
                first = done[0]
                return RestoreOutcome(
                    restored=len(done),
                    purchase_id=first.purchase_id,
                    user_id=first.user_id,
                    product_id=first.product_id,
                )
            if archived_at < not_before:
                raise RestoreRefused(
                    f"the progress snapshot of {saga_workflow_id} (archived "
                    f"{archived_at:%Y-%m-%d %H:%M} UTC) has expired: restores are possible "
                    "within the retention window only"
                )
            rows = session.scalars(
                select(archive)
                .where(
                    archive.workflow_id == saga_workflow_id,
                    archive.archived_at == archived_at,
                    archive.restored_at.is_(None),
                )
                .order_by(archive.id)
                .with_for_update()
            ).all()
            if not rows:
                raise RestoreRefused(
                    f"{saga_workflow_id} has no archived progress left to restore "
                    "(restored already, or purged)"
                )
            first = rows[0]
            keys = [row.item_key for row in rows]
            conflicts = self._conflicts(session, first.user_id, first.product_id, keys)
            if conflicts:
                raise RestoreRefused(
                    f"user {first.user_id} has new progress in {conflicts} of the "
                    f"{len(rows)} archived item(s) of product {first.product_id}: a restore "
                    "would overwrite it"
                )
            now = utcnow()
            session.execute(
                insert(CourseProgress),
                [
                    {
                        "user_id": row.user_id,
                        "product_id": row.product_id,
                        "item_key": row.item_key,
                        "percent": int(row.payload.get("percent") or 0),
                        "completed_at": _parse_time(row.payload.get("completed_at")),
                        "created_at": _parse_time(row.payload.get("created_at")) or now,
                    }
                    for row in rows
                ],
            )
            for row in rows:
                row.restored_at = now
                row.restored_by = restore_workflow_id
            self._audit(
                session,
                event="progress_restored",
                actor=operator,
                workflow_id=saga_workflow_id,
                purchase_id=first.purchase_id,
                detail={
                    **detail,
                    "restore_workflow_id": restore_workflow_id,
                    "user_id": first.user_id,
                    "product_id": first.product_id,
                    "restored": len(rows),
                    "archived_at": archived_at.isoformat(),
                },
            )
            return RestoreOutcome(
                restored=len(rows),
                purchase_id=first.purchase_id,
                user_id=first.user_id,
                product_id=first.product_id,
            )

    def purge_expired_snapshots(self, *, cutoff: datetime) -> PurgeOutcome:
        """Delete archived progress older than the cutoff: it can no longer be restored.

        Args:
            cutoff: Rows archived before this go (now minus the restore retention).

        Returns:
            How many rows went, from how many sagas; a ``snapshots_purged`` audit event says
            the same when any did.
        """
        archive = ProgressArchive
        with self._write() as session:
            sagas = int(
                session.scalar(
                    select(func.count(func.distinct(archive.workflow_id))).where(
                        archive.archived_at < cutoff
                    )
                )
                or 0
            )
            result = session.execute(
                delete(archive).where(archive.archived_at < cutoff),
                execution_options={"synchronize_session": False},
            )
            deleted = int(result.rowcount or 0)  # type: ignore[attr-defined]
            if deleted:
                self._audit(
                    session,
                    event="snapshots_purged",
                    workflow_id=None,
                    purchase_id=None,
                    detail={"cutoff": cutoff.isoformat(), "deleted": deleted, "sagas": sagas},
                )
            return PurgeOutcome(deleted=deleted, sagas=sagas)

    def record_workflow_end(
        self,
        *,
        workflow_id: str,
        run_key: str,
        event: str,
        purchase_id: int | None,
        decisions: list[tuple[str, str, dict[str, Any]]],
        detail: dict[str, Any],
    ) -> bool:
        """Write a batch's or a restore's decisions and its end into the trail, once per run.

        Args:
            workflow_id: The batch or restore workflow.
            run_key: Tells this execution from an earlier one with the same workflow id; kept
                in the end event's detail as ``run``.
            event: Its end event, e.g. ``batch_ended``.
            purchase_id: The purchase it concerned, if one.
            decisions: ``(event, actor, detail)`` of each request, approval or rejection.
            detail: Facts of the end; identifiers and money only.

        Returns:
            False when this run's end had been recorded already (a retried activity).
        """
        with self._write() as session:
            ended = session.scalars(
                select(AuditEventRow.detail).where(
                    AuditEventRow.workflow_id == workflow_id, AuditEventRow.event == event
                )
            )
            if any(held.get("run") == run_key for held in ended):
                return False
            self._audit_end(
                session,
                workflow_id=workflow_id,
                purchase_id=purchase_id,
                decisions=decisions,
                event=event,
                detail={**detail, "run": run_key},
            )
            return True

    # -- audit -----------------------------------------------------------------------------

    @staticmethod
    def _audit(
        db: _Db,
        *,
        event: str,
        workflow_id: str | None,
        purchase_id: int | None,
        detail: dict[str, Any],
        actor: str = SYSTEM_ACTOR,
    ) -> None:
        # A Core insert: no object for the unit of work to track and flush.
        db.execute(
            _INSERT_AUDIT,
            {
                "at": utcnow(),
                "event": event,
                "actor": actor,
                "workflow_id": workflow_id,
                "run_id": current_run(),
                "purchase_id": purchase_id,
                "detail": detail,
            },
        )

    @classmethod
    def _audit_end(
        cls,
        db: _Db,
        *,
        workflow_id: str,
        purchase_id: int | None,
        decisions: list[tuple[str, str, dict[str, Any]]],
        event: str,
        detail: dict[str, Any],
    ) -> None:
        """Write a workflow's ``(event, actor, detail)`` decisions, in order, then its end."""
        for decision, actor, decision_detail in decisions:
            cls._audit(
                db,
                event=decision,
                actor=actor,
                workflow_id=workflow_id,
                purchase_id=purchase_id,
                detail=decision_detail,
            )
        cls._audit(db, event=event, workflow_id=workflow_id, purchase_id=purchase_id, detail=detail)

    @staticmethod
    def _events_held(
        db: _Db, *, workflow_id: str, events: Collection[str], run_id: str | None = None
    ) -> set[str]:
        """Which of `events` the workflow (only `run_id`'s, when given) has in the trail."""
        params = {"workflow_id": workflow_id, "events": list(events), "run_id": run_id}
        return set(db.scalars(_EVENTS_HELD if run_id is None else _RUN_EVENTS_HELD, params))

    @classmethod
    def _has_event(
        cls, db: _Db, *, workflow_id: str, event: str, run_id: str | None = None
    ) -> bool:
        return event in cls._events_held(
            db, workflow_id=workflow_id, events=(event,), run_id=run_id
        )

    def add_audit(
        self,
        *,
        event: str,
        actor: str,
        workflow_id: str | None = None,
        purchase_id: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append an event to the audit trail (events may repeat).

        Args:
            event: What happened, e.g. ``approved``.
            actor: Who did it: a person's handle or a system name, never an email.
            workflow_id: The refund saga it belongs to, if any.
            purchase_id: The purchase it concerns, if any.
            detail: JSON-serializable facts; identifiers and money only.
        """
        with self._write() as session:
            self._audit(
                session,
                event=event,
                actor=actor,
                workflow_id=workflow_id,
                purchase_id=purchase_id,
                detail=detail or {},
            )

    def close_saga(
        self,
        *,
        workflow_id: str,
        purchase_id: int,
        state: str,
        revoked: bool,
        decisions: list[tuple[str, str, dict[str, Any]]],
        detail: dict[str, Any],
        request_id: str | None = None,
    ) -> bool:
        """A saga's last step, in one transaction: ``complete_refund`` when it COMPLETED, the
        release of its claim on the purchase, then its decisions and its end into the trail.
        Each part is written once per workflow.

        Args:
            workflow_id: The refund saga.
            purchase_id: The purchase it concerned (it may not exist: a refused request).
            state: The end state, e.g. ``COMPLETED``.
            revoked: Whether the saga revoked the buyer's progress.
            decisions: ``(event, actor, detail)`` of each approval, rejection, confirmation
                and ops resolution, in order.
            detail: Facts of the end; identifiers and money only.
            request_id: The saga's refund request, whose claim on the purchase ends here.

        Returns:
            False when the end had been recorded already (a retried activity).

        Raises:
            PurchaseNotFound: A COMPLETED saga's purchase does not exist.
        """
        with self._write_rows() as db:
            if state == "COMPLETED":
                _, held = self._complete_refund(
                    db,
                    purchase_id=purchase_id,
                    workflow_id=workflow_id,
                    outcome=state,
                    revoked=revoked,
                    also=("saga_ended",),
                )
            else:
                held = self._events_held(
                    db, workflow_id=workflow_id, events=("saga_ended",), run_id=current_run()
                )
            if request_id is not None:
                claims.release(db, purchase_id=purchase_id, request_id=request_id)
            if "saga_ended" in held:
                return False
            self._audit_end(
                db,
                workflow_id=workflow_id,
                purchase_id=purchase_id,
                decisions=decisions,
                event="saga_ended",
                detail={"state": state, **detail},
            )
            return True

    def audit_trail(
        self, *, workflow_id: str | None = None, purchase_id: int | None = None
    ) -> list[AuditEvent]:
        """The audit events of a saga and/or a purchase, oldest first.

        Args:
            workflow_id: Only this saga's events.
            purchase_id: Only this purchase's events.

        Returns:
            The matching events in the order they were written.

        Raises:
            ValueError: Neither filter given (the whole trail is not a query the saga makes).
        """
        if workflow_id is None and purchase_id is None:
            raise ValueError("audit_trail needs a workflow_id or a purchase_id")
        statement = select(AuditEventRow).order_by(AuditEventRow.at, AuditEventRow.id)
        if workflow_id is not None:
            statement = statement.where(AuditEventRow.workflow_id == workflow_id)
        if purchase_id is not None:
            statement = statement.where(AuditEventRow.purchase_id == purchase_id)
        return self._audit_events(statement)

    def purchase_audit(self, purchase_id: int) -> list[AuditEvent]:
        """Everything the trail holds about a purchase: every run of every saga, restore and
        batch that concerned it (a batch's own events name no purchase), oldest first."""
        batches = select(RefundBatchItem.batch_id).where(RefundBatchItem.purchase_id == purchase_id)
        statement = (
            select(AuditEventRow)
            .where(
                or_(
                    AuditEventRow.purchase_id == purchase_id,
                    AuditEventRow.workflow_id.in_(batches),
                )
            )
            .order_by(AuditEventRow.at, AuditEventRow.id)
        )
        return self._audit_events(statement)

    def _audit_events(self, statement: Select[AuditEventRow]) -> list[AuditEvent]:
        with self._read() as session:
            return [
                AuditEvent(
                    at=row.at,
                    event=row.event,
                    actor=row.actor,
                    workflow_id=row.workflow_id,
                    run_id=row.run_id,
                    purchase_id=row.purchase_id,
                    detail=row.detail,
                )
                for row in session.scalars(statement)
            ]

    # -- seeding (demo data, tests) --------------------------------------------------------

    def create_user(self, *, name: str, email: str, ams_member_id: str | None = None) -> int:
        """Create a user, or return the id of the user with this email.

        Args:
            name: Display name (personal data).
            email: Email address (personal data), unique.
            ams_member_id: The user's member id in the AMS, if the AMS knows them.

        Returns:
            The user's id.
        """

        def existing(session: Session) -> int | None:
            return session.scalar(select(User.id).where(User.email == email))

        def create(session: Session) -> int:
            user = User(name=name, email=email, ams_member_id=ams_member_id)
            session.add(user)
            session.flush()
            return user.id

        return self._get_or_create(existing, create)

    def create_product(
        self, *, code: str, title: str, entitlement_source: EntitlementSource
    ) -> int:
        """Create a product, or return the id of the product with this code as it is.

        Args:
            code: The AMS product code, unique.
            title: The product's title.
            entitlement_source: Where entitlement to the product comes from.

        Returns:
            The product's id.
        """

        def existing(session: Session) -> int | None:
            return session.scalar(select(Product.id).where(Product.code == code))

        def create(session: Session) -> int:
            product = Product(code=code, title=title, entitlement_source=entitlement_source)
            session.add(product)
            session.flush()
            return product.id

        return self._get_or_create(existing, create)

    def create_purchase(
        self,
        *,
        user_id: int,
        product_id: int,
        amount_cents: int,
        currency: str,
        processor_charge_id: str,
    ) -> int:
        """Create an active purchase, or return the one already made with this charge.

        Args:
            user_id: The buyer.
            product_id: The product bought.
            amount_cents: The amount charged, in cents.
            currency: ISO currency code, lower case.
            processor_charge_id: The processor's charge id, unique.

        Returns:
            The purchase's id.

        Raises:
            StoreError: The charge is already recorded for a different purchase.
        """
        wanted = (user_id, product_id, amount_cents, currency)

        def existing(session: Session) -> int | None:
            purchase = session.scalar(
                select(Purchase).where(Purchase.processor_charge_id == processor_charge_id)
            )
            if purchase is None:
                return None
            held = (
                purchase.user_id,
                purchase.product_id,
                purchase.amount_cents,
                purchase.currency,
            )
            if held != wanted:
                raise StoreError(
                    f"charge {processor_charge_id} already belongs to purchase {purchase.id}"
                )
            return purchase.id

        def create(session: Session) -> int:
            purchase = Purchase(
                user_id=user_id,
                product_id=product_id,
                amount_cents=amount_cents,
                currency=currency,
                processor_charge_id=processor_charge_id,
                status="active",
                refunded_cents=0,
            )
            session.add(purchase)
            session.flush()
            return purchase.id

        return self._get_or_create(existing, create)

    def add_progress(self, *, user_id: int, product_id: int, items: int) -> int:
        """Give a user completed items ``module-1/lesson-1`` .. ``module-1/lesson-<items>``.

        Args:
            user_id: The user.
            product_id: The product.
            items: How many items the user has completed.

        Returns:
            How many rows were created (items the user already had are skipped).
        """
        keys = [f"module-1/lesson-{i}" for i in range(1, items + 1)]
        with self._write() as session:
            held = set(
                session.scalars(
                    select(CourseProgress.item_key).where(
                        CourseProgress.user_id == user_id, CourseProgress.product_id == product_id
                    )
                )
            )
            now = utcnow()
            new = [
                {
                    "user_id": user_id,
                    "product_id": product_id,
                    "item_key": key,
                    "percent": 100,
                    "completed_at": now,
                    "created_at": now,
                }
                for key in keys
                if key not in held
            ]
            if new:
                session.execute(insert(CourseProgress), new)
            return len(new)

    def _get_or_create(
        self,
        existing: Callable[[Session], int | None],
        create: Callable[[Session], int],
    ) -> int:
        with self._write() as session:
            found = existing(session)
            if found is not None:
                return found
            try:
                with session.begin_nested():
                    return create(session)
            except IntegrityError:
                # Lost a race with a concurrent creator (PostgreSQL): theirs is the row.
                found = existing(session)
                if found is None:
                    raise
                return found
