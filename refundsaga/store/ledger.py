"""The refund's books: the ledger of processor refunds, the purchase's refunded amount and
final status, and the saga's closing entry."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, cast

from sqlalchemy import bindparam, insert, or_, select, update

from refundsaga.models import LedgerEntry, PurchaseStatus, RecordRefundsResult
from refundsaga.store import claims
from refundsaga.store.audit import events_held, write_end, write_event
from refundsaga.store.engine import Db, Transactions
from refundsaga.store.errors import StoreError
from refundsaga.store.purchases import locked_purchase
from refundsaga.store.runs import current_run
from refundsaga.store.schema import Purchase, Refund

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
_PURCHASE_LEDGER = (
    select(
        Refund.processor_refund_id,
        Refund.amount_cents,
        Refund.currency,
        Refund.source,
        Refund.status,
    )
    .where(Refund.purchase_id == bindparam("purchase_id"))
    .order_by(Refund.id)
)
_INSERT_REFUND = insert(Refund)
# By the processor's refund id, unique in the ledger: also a row inserted in the same call.
_SET_REFUND_STATUS = (
    update(Refund)
    .where(Refund.processor_refund_id == bindparam("refund_id"))
    .values(status=bindparam("new_status"))
)


def _purchase_status(refunded_cents: int, amount_cents: int) -> PurchaseStatus:
    if refunded_cents >= amount_cents:
        return "refunded"
    if refunded_cents > 0:
        return "partially_refunded"
    return "active"


class Ledger:
    """Recording refunds and settling the purchase they refund."""

    def __init__(self, transactions: Transactions) -> None:
        self._transactions = transactions

    def ledger_entries(self, purchase_id: int) -> list[LedgerEntry]:
        """The purchase's ledger rows, oldest first (none for an unknown purchase)."""
        with self._transactions.engine.begin() as db:
            rows = db.execute(_PURCHASE_LEDGER, {"purchase_id": purchase_id}).all()
        return [LedgerEntry.model_validate(dict(row._mapping)) for row in rows]

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
        with self._transactions.write_rows() as db:
            purchase = locked_purchase(db, purchase_id)
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
                    write_event(
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
                    write_event(
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
        with self._transactions.write_rows() as db:
            status, _ = _complete_refund(
                db,
                purchase_id=purchase_id,
                workflow_id=workflow_id,
                outcome=outcome,
                revoked=revoked,
            )
            return status

    def end_entitlement(self, *, purchase_id: int, workflow_id: str) -> PurchaseStatus:
        """End the entitlement an OASIS purchase grants (products whose source is `oasis`).

        A fully refunded purchase grants nothing already; any other becomes ``revoked``. The
        ``entitlement_ended`` event is written once per workflow however often this runs.

        Raises:
            PurchaseNotFound: No such purchase.
        """
        with self._transactions.write_rows() as db:
            status, _ = _settle_purchase(
                db,
                purchase_id=purchase_id,
                workflow_id=workflow_id,
                revoke=True,
                event="entitlement_ended",
                detail={},
            )
            return status

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
        with self._transactions.write_rows() as db:
            if state == "COMPLETED":
                _, held = _complete_refund(
                    db,
                    purchase_id=purchase_id,
                    workflow_id=workflow_id,
                    outcome=state,
                    revoked=revoked,
                    also=("saga_ended",),
                )
            else:
                held = events_held(
                    db, workflow_id=workflow_id, events=("saga_ended",), run_id=current_run()
                )
            if request_id is not None:
                claims.release(db, purchase_id=purchase_id, request_id=request_id)
            if "saga_ended" in held:
                return False
            write_end(
                db,
                workflow_id=workflow_id,
                purchase_id=purchase_id,
                decisions=decisions,
                event="saga_ended",
                detail={"state": state, **detail},
            )
            return True


def _complete_refund(
    db: Db,
    *,
    purchase_id: int,
    workflow_id: str,
    outcome: str,
    revoked: bool,
    also: Collection[str] = (),
) -> tuple[PurchaseStatus, set[str]]:
    return _settle_purchase(
        db,
        purchase_id=purchase_id,
        workflow_id=workflow_id,
        revoke=revoked,
        event="refund_completed",
        detail={"outcome": outcome, "revoked": revoked},
        also=also,
    )


def _settle_purchase(
    db: Db,
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
    status = locked_purchase(db, purchase_id).status
    if revoke and status not in ("refunded", "revoked"):
        status = "revoked"
        db.execute(_SET_PURCHASE_STATUS, {"purchase_id": purchase_id, "new_status": status})
    held = events_held(db, workflow_id=workflow_id, events=(event, *also), run_id=current_run())
    if event not in held:
        write_event(
            db,
            event=event,
            workflow_id=workflow_id,
            purchase_id=purchase_id,
            detail={**detail, "status": status},
        )
    return cast(PurchaseStatus, status), held
