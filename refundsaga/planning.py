"""Refund planning: what refunding one purchase does, or why it may not happen. Pure rules.

The saga's prepare step and the batch planner both plan with `plan_refund`: the caller reads
the purchase from the store and the charge from the processor, and gets a plan or a refusal.
A reconciliation (money that went back outside OASIS) is planned with `plan_reconciliation`,
once `evidence_refusal` found the processor's answer confirms it.
No I/O, no clock, nothing of Temporal.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Literal

from refundsaga.contracts import (
    REFUND_REQUEST_METADATA,
    AmsAction,
    ApprovalPolicy,
    ReconcileEvidence,
    RefundPlan,
)
from refundsaga.models import EntitlementSource, LedgerEntry, PurchaseSnapshot, Record
from refundsaga.processor import ProcessorCharge, ProcessorDispute, ProcessorRefund
from refundsaga.processor_events import Reconciliation

RefusalKind = Literal[
    "amount_not_positive",
    "purchase_not_found",
    "currency_mismatch",
    "charge_unknown",
    "refunded_in_oasis",
    "exceeds_rest",
    "processor_short",
    "no_ams_member",
]

RefundedEverywhere = Literal["plan", "refuse"]
"""What to do with a purchase OASIS and the processor both hold as fully refunded.

`plan`: plan the steps after the money (no money moves; progress and entitlement go by the
request), as the saga does: a saga that ended after the refund but before the revoke is
finished by a new one. `refuse`: refuse it as refunded in OASIS, as the batch does: its saga
has run already.
"""


class PlanRefusal(Record):
    """Why a refund may not be planned: a kind to branch or count on, and a sentence with the
    figures for the person who asked."""

    kind: RefusalKind
    message: str


class PlannedRefund(Record):
    """What a refund of the purchase will do."""

    amount_cents: int
    """Money to move at the processor; 0 when the processor already refunded the charge."""
    full_refund: bool
    already_refunded: bool
    """The processor has nothing left to refund: it holds the refund already."""
    revoke_progress: bool
    progress_records: int
    """The progress records the revoke deletes (0 when progress is kept)."""
    remove_entitlement: bool
    ams_action: AmsAction


def entitlement_action(source: EntitlementSource) -> AmsAction:
    """How the entitlement of a product with this source is removed."""
    if source == "ams":
        return "remove_via_api"
    if source == "ams_manual":
        return "manual_task"
    return "deactivate_purchase"


def check_request(
    purchase_id: int,
    purchase: PurchaseSnapshot | None,
    *,
    amount_cents: int | None = None,
    currency: str | None = None,
) -> PurchaseSnapshot | PlanRefusal:
    """The purchase, when the store's facts alone do not refuse the request; else why not.

    `plan_refund` applies these checks first; a caller may apply them before it reads the
    charge, so that a request the store refuses costs no processor read.
    """
    if amount_cents is not None and amount_cents <= 0:
        return PlanRefusal(
            kind="amount_not_positive", message=f"amount {amount_cents} must be positive"
        )
    if purchase is None:
        return PlanRefusal(
            kind="purchase_not_found", message=f"purchase {purchase_id} does not exist"
        )
    if currency and currency != purchase.currency:
        return PlanRefusal(
            kind="currency_mismatch",
            message=f"currency {currency} does not match the purchase's {purchase.currency}",
        )
    return purchase


def plan_refund(
    purchase_id: int,
    purchase: PurchaseSnapshot | None,
    charge: ProcessorCharge | None,
    *,
    amount_cents: int | None = None,
    currency: str | None = None,
    revoke_progress: bool | None = None,
    remove_entitlement: bool | None = None,
    refunded_everywhere: RefundedEverywhere,
) -> PlannedRefund | PlanRefusal:
    """Plan a refund of `amount_cents` (None: the unrefunded rest) of a purchase.

    A charge the processor has fully refunded outside OASIS is planned with no money to move
    (whatever amount was asked), and counts as a full refund. Otherwise the amount must fit in
    both what OASIS has not refunded yet and what the processor would still refund.

    Args:
        purchase_id: The purchase asked for.
        purchase: The purchase as the store holds it, or None when there is none.
        charge: The processor's charge, or None when the processor does not know it.
        amount_cents: The amount asked for, or None for the unrefunded rest.
        currency: The currency the request names, if any; it must be the purchase's.
        revoke_progress: Whether to delete the progress; None: yes for a full refund.
        remove_entitlement: Whether to remove the entitlement; None: yes for a full refund.
        refunded_everywhere: What a purchase refunded in full in OASIS and at the processor
            gets (see `RefundedEverywhere`): the saga plans it, the batch refuses it.
    """
    checked = check_request(purchase_id, purchase, amount_cents=amount_cents, currency=currency)
    if isinstance(checked, PlanRefusal):
        return checked
    purchase = checked
    if charge is None:
        return PlanRefusal(
            kind="charge_unknown",
            message=f"the processor does not know charge {purchase.processor_charge_id}",
        )
    rest = purchase.refundable_cents
    processor_rest = charge.refundable_cents
    already = processor_rest == 0
    if rest == 0 and (not already or refunded_everywhere == "refuse"):
        return PlanRefusal(
            kind="refunded_in_oasis",
            message=f"purchase {purchase.purchase_id} is already fully refunded in OASIS",
        )
    amount = rest if amount_cents is None else amount_cents
    if not already and amount > rest:
        return PlanRefusal(
            kind="exceeds_rest",
            message=f"amount {amount} exceeds the unrefunded rest of {rest} {purchase.currency}",
        )
    if not already and amount > processor_rest:
        return PlanRefusal(
            kind="processor_short",
            message=(
                f"the processor can refund only {processor_rest} {purchase.currency} more "
                f"({charge.amount_refunded_cents} already refunded there); ask for at most that"
            ),
        )
    full = already or amount == rest
    revoke = full if revoke_progress is None else revoke_progress
    remove = full if remove_entitlement is None else remove_entitlement
    ams_action = _removal(purchase, remove)
    if isinstance(ams_action, PlanRefusal):
        return ams_action
    return PlannedRefund(
        amount_cents=0 if already else amount,
        full_refund=full,
        already_refunded=already,
        revoke_progress=revoke,
        progress_records=purchase.progress_count if revoke else 0,
        remove_entitlement=remove,
        ams_action=ams_action,
    )


def refund_plan(
    purchase: PurchaseSnapshot,
    charge: ProcessorCharge,
    planned: PlannedRefund,
    *,
    required: int,
    policy: ApprovalPolicy,
    reconcile: ReconcileEvidence | None = None,
) -> RefundPlan:
    """The plan the saga carries and approvers see: the planned refund with the purchase's
    and the charge's facts, and the approvals it needs under `policy`."""
    return RefundPlan(
        purchase_id=purchase.purchase_id,
        user_id=purchase.user_id,
        product_id=purchase.product_id,
        product_code=purchase.product_code,
        entitlement_source=purchase.entitlement_source,
        ams_member_id=purchase.ams_member_id,
        charge_id=purchase.processor_charge_id,
        currency=purchase.currency,
        purchase_amount_cents=purchase.amount_cents,
        ledger_refunded_cents=purchase.refunded_cents,
        processor_refunded_cents=charge.amount_refunded_cents,
        amount_cents=planned.amount_cents,
        full_refund=planned.full_refund,
        already_refunded=planned.already_refunded,
        revoke_progress=planned.revoke_progress,
        progress_records=planned.progress_records,
        remove_entitlement=planned.remove_entitlement,
        ams_action=planned.ams_action,
        required_approvals=required,
        policy=policy,
        reconcile=reconcile,
    )


def _removal(purchase: PurchaseSnapshot, remove: bool) -> AmsAction | PlanRefusal:
    """How the entitlement goes (if `remove`), or why it cannot."""
    if not remove:
        return "none"
    ams_action = entitlement_action(purchase.entitlement_source)
    if ams_action == "remove_via_api" and not purchase.ams_member_id:
        return PlanRefusal(
            kind="no_ams_member",
            message=(
                f"user {purchase.user_id} has no AMS member id; the AMS entitlement "
                "cannot be removed"
            ),
        )
    return ams_action


# --- reconciliations: money that went back outside OASIS -----------------------------------


def evidence_refusal(
    reconciliation: Reconciliation,
    *,
    charge_ids: Collection[str],
    refund: ProcessorRefund | None = None,
    dispute: ProcessorDispute | None = None,
) -> str | None:
    """Why the processor's answer does not confirm a reconciliation, or None when it does.

    Args:
        reconciliation: What an event (or the sweep) reported.
        charge_ids: The purchase's charge as the processor names it (`ch_`, and `pi_` when
            the purchase holds a PaymentIntent).
        refund: The processor's refund of that id (external_refund), None when it has none.
        dispute: The processor's dispute of that id (chargeback), None when it has none.
    """
    named = reconciliation.processor_object_id
    charge = "/".join(sorted(charge_ids))
    why: str | None
    if reconciliation.kind == "external_refund":
        if refund is None or refund.id != named:
            why = "it has no such refund"
        elif refund.charge_id not in charge_ids:
            why = f"the refund is of charge {refund.charge_id}, not the purchase's {charge}"
        elif refund.status != "succeeded":
            why = f"the refund is {refund.status}, not succeeded"
        elif REFUND_REQUEST_METADATA in refund.metadata:
            why = "the refund is OASIS's own (a refund saga made it)"
        else:
            why = None
    else:
        if dispute is None or dispute.id != named:
            why = "it has no such dispute"
        elif dispute.charge_id not in charge_ids:
            why = f"the dispute is of charge {dispute.charge_id}, not the purchase's {charge}"
        elif dispute.status != "lost":
            why = f"the dispute is {dispute.status}, not lost"
        else:
            why = None
    if why is None:
        return None
    return f"the processor does not confirm {named} ({why}); nothing changed"


def money_returned(
    refunds: Iterable[ProcessorRefund],
    ledger: Iterable[LedgerEntry],
    dispute: ProcessorDispute | None = None,
) -> int:
    """All the money back on a charge: its succeeded refunds at the processor, the lost
    disputes the ledger holds, and `dispute` (a lost one being reconciled)."""
    back = sum(r.amount_cents for r in refunds if r.status == "succeeded")
    back += sum(e.amount_cents for e in ledger if e.source == "chargeback" and e.status != "failed")
    return back + (dispute.amount_cents if dispute is not None else 0)


def plan_reconciliation(
    purchase_id: int, purchase: PurchaseSnapshot | None, *, returned_cents: int
) -> PlannedRefund | PlanRefusal:
    """Plan a reconciliation: no money moves; progress and entitlement go once the money back
    covers what the purchase cost, and stay after a partial return.

    Args:
        purchase_id: The purchase the money went back for.
        purchase: The purchase as the store holds it, or None when there is none.
        returned_cents: All the money back on its charge (`money_returned`).
    """
    checked = check_request(purchase_id, purchase)
    if isinstance(checked, PlanRefusal):
        return checked
    purchase = checked
    full = returned_cents >= purchase.amount_cents
    ams_action = _removal(purchase, full)
    if isinstance(ams_action, PlanRefusal):
        return ams_action
    return PlannedRefund(
        amount_cents=0,
        full_refund=full,
        already_refunded=True,
        revoke_progress=full,
        progress_records=purchase.progress_count if full else 0,
        remove_entitlement=full,
        ams_action=ams_action,
    )
