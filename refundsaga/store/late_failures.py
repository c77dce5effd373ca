"""A refund the processor failed after the ledger counted it: put the ledger right, once.

The failed refund no longer counts as refunded, so the purchase's refunded amount drops back
to what the processor holds. Access is not given back here: a purchase that no longer entitled
its buyer stays that way until ops decide (`FailedRefundTask`).
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Connection, bindparam, func, insert, select, update

from refundsaga.models import PurchaseStatus, Record
from refundsaga.store.errors import StoreError
from refundsaga.store.runs import current_run
from refundsaga.store.schema import AuditEventRow, ProgressArchive, Purchase, Refund, utcnow
from refundsaga.store.store import SYSTEM_ACTOR, OasisStore

LATE_FAILURE_EVENT = "refund_failed_late"
# The end of the task that handles a failure (FailedRefundTask), with its state.
TASK_ENDED_EVENT = "failed_refund_task_ended"

# A write first, so the transaction holds the write lock (SQLite) or the row lock (PostgreSQL)
# before it reads: a deferred SQLite transaction that reads, then writes, fails at once if
# another writer got in between instead of waiting.
_LOCK_PURCHASE = (
    update(Purchase)
    .where(Purchase.id == bindparam("purchase_id"))
    .values(refunded_cents=Purchase.refunded_cents)
)
_PURCHASE = select(
    Purchase.user_id,
    Purchase.product_id,
    Purchase.amount_cents,
    Purchase.currency,
    Purchase.refunded_cents,
    Purchase.status,
    Purchase.processor_charge_id,
).where(Purchase.id == bindparam("purchase_id"))
_LEDGER_ROW = select(
    Refund.purchase_id, Refund.amount_cents, Refund.currency, Refund.status, Refund.workflow_id
).where(Refund.processor_refund_id == bindparam("refund_id"))
_COUNTED = select(func.coalesce(func.sum(Refund.amount_cents), 0)).where(
    Refund.purchase_id == bindparam("purchase_id"), Refund.status != "failed"
)
_SET_FAILED = (
    update(Refund)
    .where(Refund.processor_refund_id == bindparam("refund_id"))
    .values(status="failed")
)
_SET_PURCHASE = (
    update(Purchase)
    .where(Purchase.id == bindparam("purchase_id"))
    .values(refunded_cents=bindparam("new_refunded_cents"), status=bindparam("new_status"))
)
_ARCHIVED = (
    select(func.count())
    .select_from(ProgressArchive)
    .where(
        ProgressArchive.workflow_id == bindparam("workflow_id"),
        ProgressArchive.restored_at.is_(None),
    )
)
_FAILURES_RECORDED = (
    select(AuditEventRow.workflow_id, AuditEventRow.detail)
    .where(
        AuditEventRow.purchase_id == bindparam("purchase_id"),
        AuditEventRow.event == LATE_FAILURE_EVENT,
    )
    .order_by(AuditEventRow.id)
)
_TASK_ENDS = select(AuditEventRow.detail).where(
    AuditEventRow.workflow_id == bindparam("workflow_id"),
    AuditEventRow.event == TASK_ENDED_EVENT,
)
_SAGA_END = (
    select(AuditEventRow.detail)
    .where(
        AuditEventRow.workflow_id == bindparam("workflow_id"),
        AuditEventRow.event == "saga_ended",
    )
    .order_by(AuditEventRow.id.desc())
    .limit(1)
)


class LateFailureRefused(StoreError):
    """The store does not hold what the report says: no such purchase, another charge, or a
    refund the ledger never counted for it."""


class LateFailure(Record):
    """The failed refund as the ledger holds it now (identifiers and money only)."""

    purchase_id: int
    user_id: int
    product_id: int
    refund_id: str
    amount_cents: int
    currency: str
    saga_workflow_id: str | None
    saga_state: str | None
    archived_progress: int
    refunded_cents: int
    purchase_status: PurchaseStatus
    newly_recorded: bool


def status_after_failure(
    status: PurchaseStatus, *, refunded_cents: int, amount_cents: int
) -> PurchaseStatus:
    """The purchase's status once a refund no longer counts.

    Derived from the refunded amount as the ledger derives it, except that a purchase that
    entitled nobody (refunded or revoked) becomes, or stays, revoked: access comes back only by
    a decision, never as a side effect of the money not going back.
    """
    if refunded_cents >= amount_cents:
        derived: PurchaseStatus = "refunded"
    elif refunded_cents > 0:
        derived = "partially_refunded"
    else:
        derived = "active"
    if status == "revoked" or (status == "refunded" and derived != "refunded"):
        return "revoked"
    return derived


def record_late_failure(
    store: OasisStore,
    *,
    purchase_id: int,
    charge_id: str,
    refund_id: str,
    amount_cents: int,
    currency: str,
    recorded_by: str,
    detail: dict[str, Any],
) -> LateFailure:
    """Mark a counted refund failed, bring the purchase's refunded amount and status down, and
    write `refund_failed_late` into the trail; all in one transaction, once however often.

    The failure is handled by the task that recorded it: another one is refused, and so is the
    same task once it has closed (a report delivered again after the decision).

    Args:
        purchase_id: The purchase the report names; it must be paid with `charge_id`.
        charge_id: The processor's charge the refund was of.
        refund_id: The processor's refund, which the ledger must hold for this purchase with
            this amount and currency.
        amount_cents: The refund's amount, as the processor reports it.
        currency: Its currency.
        recorded_by: The workflow recording it (the task): the event's workflow.
        detail: More facts for the event (where the report came from); identifiers only.

    Raises:
        LateFailureRefused: The store does not hold the refund for this purchase and charge,
            or another task, or this one before, has handled its failure already.
    """
    with store.engine.begin() as db:
        if db.execute(_LOCK_PURCHASE, {"purchase_id": purchase_id}).rowcount == 0:
            raise LateFailureRefused(f"purchase {purchase_id} does not exist")
        purchase = db.execute(_PURCHASE, {"purchase_id": purchase_id}).one()
        if purchase.processor_charge_id != charge_id:
            raise LateFailureRefused(f"purchase {purchase_id} was not paid with charge {charge_id}")
        row = db.execute(_LEDGER_ROW, {"refund_id": refund_id}).one_or_none()
        if row is None or row.purchase_id != purchase_id:
            raise LateFailureRefused(
                f"the ledger never counted refund {refund_id} for purchase {purchase_id}: "
                "there is nothing to put right"
            )
        if (row.amount_cents, row.currency) != (amount_cents, currency):
            raise LateFailureRefused(
                f"the ledger holds refund {refund_id} as {row.amount_cents} {row.currency}, "
                f"not {amount_cents} {currency}"
            )
        refunded_cents = purchase.refunded_cents
        status = cast(PurchaseStatus, purchase.status)
        newly = row.status != "failed"
        if not newly:
            _refuse_handled(db, purchase_id=purchase_id, refund_id=refund_id, task=recorded_by)
        else:
            db.execute(_SET_FAILED, {"refund_id": refund_id})
            counted = int(db.execute(_COUNTED, {"purchase_id": purchase_id}).scalar_one())
            refunded_cents = min(counted, purchase.amount_cents)
            status = status_after_failure(
                status, refunded_cents=refunded_cents, amount_cents=purchase.amount_cents
            )
            db.execute(
                _SET_PURCHASE,
                {
                    "purchase_id": purchase_id,
                    "new_refunded_cents": refunded_cents,
                    "new_status": status,
                },
            )
            _audit(
                db,
                workflow_id=recorded_by,
                purchase_id=purchase_id,
                detail={
                    **detail,
                    "saga_workflow_id": row.workflow_id,
                    "processor_refund_id": refund_id,
                    "amount_cents": amount_cents,
                    "currency": currency,
                    "from": row.status,
                    "refunded_cents_before": purchase.refunded_cents,
                    "refunded_cents": refunded_cents,
                    "status_before": purchase.status,
                    "status": status,
                },
            )
        saga_state = None
        archived = 0
        if row.workflow_id is not None:
            ended = db.execute(_SAGA_END, {"workflow_id": row.workflow_id}).scalar()
            saga_state = (ended or {}).get("state")
            archived = int(db.execute(_ARCHIVED, {"workflow_id": row.workflow_id}).scalar_one())
        return LateFailure(
            purchase_id=purchase_id,
            user_id=purchase.user_id,
            product_id=purchase.product_id,
            refund_id=refund_id,
            amount_cents=amount_cents,
            currency=currency,
            saga_workflow_id=row.workflow_id,
            saga_state=saga_state,
            archived_progress=archived,
            refunded_cents=refunded_cents,
            purchase_status=status,
            newly_recorded=newly,
        )


def _refuse_handled(db: Connection, *, purchase_id: int, refund_id: str, task: str) -> None:
    """Refuse a failure another task recorded, or this task recorded and closed."""
    recorders = {
        workflow_id
        for workflow_id, detail in db.execute(_FAILURES_RECORDED, {"purchase_id": purchase_id})
        if detail.get("processor_refund_id") == refund_id
    }
    others = sorted(str(w) for w in recorders - {task})
    if others:
        raise LateFailureRefused(
            f"the failure of refund {refund_id} is handled by {others[0]}, not {task}"
        )
    ends = db.execute(_TASK_ENDS, {"workflow_id": task}).scalars()
    # FailedRefundState.CLOSED: ops decided (a refused run of the task changed nothing).
    if any(detail.get("state") == "OPS_TASK_CLOSED" for detail in ends):
        raise LateFailureRefused(f"{task} has dealt with the failure of refund {refund_id}")


def _audit(
    db: Connection, *, workflow_id: str | None, purchase_id: int, detail: dict[str, Any]
) -> None:
    db.execute(
        insert(AuditEventRow),
        {
            "at": utcnow(),
            "event": LATE_FAILURE_EVENT,
            "actor": SYSTEM_ACTOR,
            "workflow_id": workflow_id,
            "run_id": current_run(),
            "purchase_id": purchase_id,
            "detail": detail,
        },
    )
