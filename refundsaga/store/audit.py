"""The audit trail: who did what to which purchase, written in the transaction that did it."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, insert, or_, select

from refundsaga.models import Record
from refundsaga.store.engine import Db, Transactions
from refundsaga.store.runs import current_run
from refundsaga.store.schema import AuditEventRow, RefundBatchItem, utcnow

SYSTEM_ACTOR = "refund-saga"
"""The actor of the audit events the store writes on the saga's behalf."""

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
_INSERT_AUDIT = insert(AuditEventRow)


class AuditEvent(Record):
    """One entry of the audit trail, as the store returns it."""

    at: datetime
    event: str
    actor: str
    workflow_id: str | None
    purchase_id: int | None
    detail: dict[str, Any]
    run_id: str | None = None


def write_event(
    db: Db,
    *,
    event: str,
    workflow_id: str | None,
    purchase_id: int | None,
    detail: dict[str, Any],
    actor: str = SYSTEM_ACTOR,
) -> None:
    """Append an event, attributed to the current workflow run, in `db`'s transaction."""
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


def write_end(
    db: Db,
    *,
    workflow_id: str,
    purchase_id: int | None,
    decisions: list[tuple[str, str, dict[str, Any]]],
    event: str,
    detail: dict[str, Any],
) -> None:
    """Write a workflow's ``(event, actor, detail)`` decisions, in order, then its end."""
    for decision, actor, decision_detail in decisions:
        write_event(
            db,
            event=decision,
            actor=actor,
            workflow_id=workflow_id,
            purchase_id=purchase_id,
            detail=decision_detail,
        )
    write_event(db, event=event, workflow_id=workflow_id, purchase_id=purchase_id, detail=detail)


def events_held(
    db: Db, *, workflow_id: str, events: Collection[str], run_id: str | None = None
) -> set[str]:
    """Which of `events` the workflow (only `run_id`'s, when given) has in the trail."""
    params = {"workflow_id": workflow_id, "events": list(events), "run_id": run_id}
    return set(db.scalars(_EVENTS_HELD if run_id is None else _RUN_EVENTS_HELD, params))


def has_event(db: Db, *, workflow_id: str, event: str, run_id: str | None = None) -> bool:
    """Whether the workflow (only `run_id`'s, when given) has `event` in the trail."""
    return event in events_held(db, workflow_id=workflow_id, events=(event,), run_id=run_id)


class AuditTrail:
    """Reading the trail, and the entries written outside a saga step's own transaction."""

    def __init__(self, transactions: Transactions) -> None:
        self._transactions = transactions

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
        with self._transactions.write() as session:
            write_event(
                session,
                event=event,
                actor=actor,
                workflow_id=workflow_id,
                purchase_id=purchase_id,
                detail=detail or {},
            )

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
        with self._transactions.write() as session:
            ended = session.scalars(
                select(AuditEventRow.detail).where(
                    AuditEventRow.workflow_id == workflow_id, AuditEventRow.event == event
                )
            )
            if any(held.get("run") == run_key for held in ended):
                return False
            write_end(
                session,
                workflow_id=workflow_id,
                purchase_id=purchase_id,
                decisions=decisions,
                event=event,
                detail={**detail, "run": run_key},
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
        with self._transactions.read() as session:
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
