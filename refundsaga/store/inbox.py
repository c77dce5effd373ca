"""What the webhook receiver and the reconciliation sweep ask of the OASIS store: which processor
events were acted on, which purchase a charge paid for, what the ledger holds, and how far the
sweep has read.

Each method runs in a transaction of its own on the store's engine (pass `OasisStore.engine`,
which carries the SQLite settings) and is safe to call again.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import Engine, FromClause, Table, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite

from refundsaga.models import Record
from refundsaga.processor_events import EventSource
from refundsaga.store.schema import (
    ProcessorEventRow,
    ProcessorSweepMark,
    Purchase,
    Refund,
    utcnow,
)

_HANDLED = select(
    ProcessorEventRow.event_id,
    ProcessorEventRow.type,
    ProcessorEventRow.source,
    ProcessorEventRow.received_at,
    ProcessorEventRow.outcome,
).where(ProcessorEventRow.event_id == bindparam("event_id"))
# A purchase paid by a charge may be stored under the charge (ch_) or its PaymentIntent (pi_).
_PURCHASE_OF_CHARGE = (
    select(Purchase.id)
    .where(Purchase.processor_charge_id.in_(bindparam("charge_ids", expanding=True)))
    .order_by(Purchase.id)
    .limit(1)
)
_LEDGER_STATUS = select(Refund.status).where(Refund.processor_refund_id == bindparam("object_id"))
_MARK = select(
    ProcessorSweepMark.name, ProcessorSweepMark.created, ProcessorSweepMark.last_object_id
).where(ProcessorSweepMark.name == bindparam("name"))


class HandledEvent(Record):
    """A processor event as the inbox recorded it."""

    event_id: str
    type: str
    source: EventSource
    received_at: datetime
    outcome: str


class SweepMark(Record):
    """How far a sweep has read: the creation time (Unix seconds) and id of the last object."""

    name: str
    created: int
    last_object_id: str | None


class ProcessorInbox:
    """The store's side of processor events: idempotence, lookups, the sweep's marks."""

    def __init__(self, engine: Engine) -> None:
        """Use the store's engine (`OasisStore.engine`); the caller keeps ownership."""
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"the inbox runs on SQLite or PostgreSQL, not {engine.dialect.name}")
        self._engine = engine

    def handled(self, event_id: str) -> HandledEvent | None:
        """The event as recorded, or None if it was never acted on."""
        with self._engine.begin() as db:
            row = db.execute(_HANDLED, {"event_id": event_id}).one_or_none()
        return None if row is None else HandledEvent.model_validate(dict(row._mapping))

    def seen(self, event_id: str) -> bool:
        """Whether the event was acted on already."""
        return self.handled(event_id) is not None

    def record(
        self,
        event_id: str,
        *,
        event_type: str,
        source: EventSource,
        outcome: str,
        received_at: datetime | None = None,
    ) -> bool:
        """Record that the event was acted on, after it was.

        Returns:
            True if this call recorded it, False if it was recorded already (the first
            record stays).
        """
        statement = (
            _upsert_into(self._engine, ProcessorEventRow.__table__)
            .values(
                event_id=event_id,
                type=event_type[:64],
                source=source,
                received_at=received_at or utcnow(),
                outcome=outcome[:64],
            )
            .on_conflict_do_nothing(index_elements=["event_id"])
            # What was inserted comes back; rowcount is not reliable for ON CONFLICT on psycopg.
            .returning(ProcessorEventRow.event_id)
        )
        with self._engine.begin() as db:
            return db.execute(statement).scalar_one_or_none() is not None

    def purchase_for_charge(
        self, charge_id: str, payment_intent_id: str | None = None
    ) -> int | None:
        """The OASIS purchase paid by the charge (or its PaymentIntent), or None: a charge
        OASIS did not make, which is not ours to reconcile."""
        ids = [charge_id] if payment_intent_id is None else [charge_id, payment_intent_id]
        with self._engine.begin() as db:
            found = db.execute(_PURCHASE_OF_CHARGE, {"charge_ids": ids}).scalar_one_or_none()
        return found

    def ledger_status(self, processor_object_id: str) -> str | None:
        """The ledger's status of a refund (re_...) or a lost dispute (dp_...), or None when
        the ledger does not hold it."""
        with self._engine.begin() as db:
            status = db.execute(
                _LEDGER_STATUS, {"object_id": processor_object_id}
            ).scalar_one_or_none()
        return status

    def ledger_holds(self, processor_object_id: str) -> bool:
        """Whether the ledger holds the refund or dispute already: it was reconciled."""
        return self.ledger_status(processor_object_id) is not None

    def sweep_mark(self, name: str) -> SweepMark | None:
        """The sweep's mark, or None before its first run."""
        with self._engine.begin() as db:
            row = db.execute(_MARK, {"name": name}).one_or_none()
        return None if row is None else SweepMark.model_validate(dict(row._mapping))

    def set_sweep_mark(self, name: str, *, created: int, last_object_id: str | None) -> None:
        """Move the sweep's mark (creating it on the first run)."""
        now = utcnow()
        statement = _upsert_into(self._engine, ProcessorSweepMark.__table__).values(
            name=name, created=created, last_object_id=last_object_id, updated_at=now
        )
        statement = statement.on_conflict_do_update(
            index_elements=["name"],
            set_={"created": created, "last_object_id": last_object_id, "updated_at": now},
        )
        with self._engine.begin() as db:
            db.execute(statement)


def _upsert_into(engine: Engine, table: FromClause) -> postgresql.Insert | sqlite.Insert:
    # INSERT ... ON CONFLICT, one statement on both backends: two deliveries of one event racing
    # each other cannot both insert, and neither fails.
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(cast(Table, table))
