"""Refund planning: what refunding one purchase does, or why it may not happen. Pure rules.

The saga's prepare step and the batch planner both plan with `plan_refund`: the caller reads
the purchase from the store and the charge from the processor, and gets a plan or a refusal.
No I/O, no clock, nothing of Temporal.
"""

from __future__ import annotations

from typing import Literal

from refundsaga.contracts import AmsAction
from refundsaga.models import EntitlementSource, PurchaseSnapshot, Record
from refundsaga.processor import ProcessorCharge

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
    ams_action: AmsAction = "none"
    if remove:
        ams_action = entitlement_action(purchase.entitlement_source)
        if ams_action == "remove_via_api" and not purchase.ams_member_id:
            return PlanRefusal(
                kind="no_ams_member",
                message=(
                    f"user {purchase.user_id} has no AMS member id; the AMS entitlement "
                    "cannot be removed"
                ),
            )
    return PlannedRefund(
        amount_cents=0 if already else amount,
        full_refund=full,
        already_refunded=already,
        revoke_progress=revoke,
        progress_records=purchase.progress_count if revoke else 0,
        remove_entitlement=remove,
        ams_action=ams_action,
    )
