"""SQLAlchemy ORM models of the OASIS store: users, products, purchases, ledger, progress, audit."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names: the migrations name every constraint explicitly, and SQLite
# batch migrations and downgrades can only address constraints that have a name.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ENTITLEMENT_SOURCES = ("oasis", "ams", "ams_manual")
PURCHASE_STATUSES = ("active", "partially_refunded", "refunded", "revoked")
# "chargeback": a lost dispute, by its dispute id (migration 0005).
LEDGER_SOURCES = ("processor", "external", "chargeback")
LEDGER_STATUSES = ("succeeded", "pending", "failed")
PROCESSOR_EVENT_SOURCES = ("webhook", "sweep")


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    listed = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({listed})"


def _currency_code(column: str) -> str:
    # Portable spelling of ^[a-z]{3}$: each character must change under upper(), which only
    # letters do, and must equal its lower() form. SQLite has no regex operator by default.
    letters = " AND ".join(
        f"substr({column}, {i}, 1) <> upper(substr({column}, {i}, 1))" for i in (1, 2, 3)
    )
    return f"length({column}) = 3 AND {column} = lower({column}) AND {letters}"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware.

    SQLite keeps no offset, so values go in as naive UTC and come back tagged as UTC;
    PostgreSQL stores ``timestamptz`` and returns it in the session time zone, converted here.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use an aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSONB on PostgreSQL so payloads are stored parsed and compactly; plain JSON text elsewhere.
JSONDocument = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    """Declarative base of the OASIS store's tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONDocument}


class User(Base):
    """A platform user. Name and email are personal data and never leave the store."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("email"), UniqueConstraint("ams_member_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320))
    ams_member_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class Product(Base):
    """A course or product sold in OASIS, identified by its AMS product code."""

    __tablename__ = "products"
    __table_args__ = (
        UniqueConstraint("code"),
        CheckConstraint(_one_of("entitlement_source", ENTITLEMENT_SOURCES), "entitlement_source"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(300))
    entitlement_source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class Purchase(Base):
    """A purchase made in OASIS and paid through the processor."""

    __tablename__ = "purchases"
    __table_args__ = (
        UniqueConstraint("processor_charge_id"),
        CheckConstraint("amount_cents > 0", "amount_positive"),
        CheckConstraint(_currency_code("currency"), "currency_code"),
        CheckConstraint(_one_of("status", PURCHASE_STATUSES), "status"),
        CheckConstraint(
            "refunded_cents >= 0 AND refunded_cents <= amount_cents", "refunded_within_amount"
        ),
        Index(None, "user_id", "product_id"),
        # A batch lists every purchase of a cancelled product (migration 0002).
        Index(None, "product_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    amount_cents: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3))
    processor_charge_id: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32), default="active", server_default="active")
    refunded_cents: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=func.now()
    )


class Refund(Base):
    """One row of the refund ledger: a refund the processor made (or one made elsewhere)."""

    __tablename__ = "refunds"
    __table_args__ = (
        UniqueConstraint("processor_refund_id"),
        CheckConstraint("amount_cents > 0", "amount_positive"),
        CheckConstraint(_currency_code("currency"), "currency_code"),
        CheckConstraint(_one_of("source", LEDGER_SOURCES), "source"),
        CheckConstraint(_one_of("status", LEDGER_STATUSES), "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    purchase_id: Mapped[int] = mapped_column(ForeignKey("purchases.id"), index=True)
    processor_refund_id: Mapped[str] = mapped_column(String(255))
    amount_cents: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3))
    source: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    workflow_id: Mapped[str | None] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class CourseProgress(Base):
    """One item of a user's progress in a product; any row at all grants access."""

    __tablename__ = "course_progress"
    __table_args__ = (
        # Its index also serves every (user_id, product_id) lookup: a separate index on that
        # prefix would only slow down writes on the largest table.
        UniqueConstraint("user_id", "product_id", "item_key"),
        CheckConstraint("percent >= 0 AND percent <= 100", "percent_range"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    item_key: Mapped[str] = mapped_column(String(200))
    percent: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    completed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class ProgressArchive(Base):
    """A progress row as it was just before a refund deleted it: deletion is irreversible."""

    __tablename__ = "progress_archive"
    # archived_at: the purge of expired snapshots (migration 0002).
    __table_args__ = (Index(None, "user_id", "product_id"), Index(None, "archived_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    original_progress_id: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[int] = mapped_column(Integer)
    product_id: Mapped[int] = mapped_column(Integer)
    item_key: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]]
    archived_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    workflow_id: Mapped[str] = mapped_column(String(255), index=True)
    purchase_id: Mapped[int] = mapped_column(ForeignKey("purchases.id"))
    # Set when `refund restore-progress` put the row back (migration 0002).
    restored_at: Mapped[datetime | None]
    restored_by: Mapped[str | None] = mapped_column(String(255))


class RefundBatchItem(Base):
    """One purchase of a batch refund as planned and approved (migration 0002).

    The batch's children are started from these rows, so the set approved is the set refunded
    even when purchases of the product are added later.
    """

    __tablename__ = "refund_batch_items"

    batch_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    # No foreign key: a list of purchases may name one that does not exist (skipped, and why).
    purchase_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    included: Mapped[bool] = mapped_column(Boolean)
    skip_reason: Mapped[str | None] = mapped_column(String(300))
    amount_cents: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str | None] = mapped_column(String(3))
    already_refunded: Mapped[bool] = mapped_column(Boolean)
    progress_records: Mapped[int] = mapped_column(Integer)
    ams_action: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class AuditEventRow(Base):
    """One entry of the audit trail. Events may repeat; the store decides when not to write."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    # No foreign key: the trail also records attempts on purchases that do not exist.
    workflow_id: Mapped[str | None] = mapped_column(String(255), index=True)
    # The workflow run that wrote it (migration 0003): every saga for a purchase shares a
    # workflow id, and a reset makes a new run.
    run_id: Mapped[str | None] = mapped_column(String(64))
    purchase_id: Mapped[int | None] = mapped_column(Integer, index=True)
    event: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(128))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class RefundClaim(Base):
    """The one refund request in flight for a purchase (migration 0003).

    A saga claims its purchase before it asks for approval and releases it at its end, so a
    second saga, however it was started, is refused before it can move money.
    """

    __tablename__ = "refund_claims"

    purchase_id: Mapped[int] = mapped_column(ForeignKey("purchases.id"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(255))
    workflow_id: Mapped[str] = mapped_column(String(255))
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class RefundRequestNonce(Base):
    """A signed request's nonce, once a saga has used it (migration 0003): one saga per
    signed request, so a signature read from Temporal's history cannot start another."""

    __tablename__ = "refund_request_nonces"

    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(255))
    used_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class ProcessorEventRow(Base):
    """A processor event RefundSaga has acted on (migration 0004).

    The processor delivers an event more than once and out of order, and the sweep finds what
    a webhook already brought: one row per event id makes every later delivery do nothing.
    """

    __tablename__ = "processor_events"
    __table_args__ = (CheckConstraint(_one_of("source", PROCESSOR_EVENT_SOURCES), "source"),)

    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    outcome: Mapped[str] = mapped_column(String(64))


class ProcessorSweepMark(Base):
    """How far a reconciliation sweep has read the processor's lists (migration 0004): the
    creation time (Unix seconds, as the processor filters by) and id of the last object seen."""

    __tablename__ = "processor_sweep_marks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created: Mapped[int] = mapped_column(BigInteger)
    last_object_id: Mapped[str | None] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=func.now()
    )
