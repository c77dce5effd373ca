"""The processor sandbox's charges and refunds: records, Stripe views, and the events each
change emits.

Every change here happens under the sandbox lock; the caller saves the state afterwards.
"""

from __future__ import annotations

from sandboxes.common import Sandbox
from sandboxes.disputes import Disputes
from sandboxes.events import EventLog, changed_attributes
from sandboxes.wire import ApiError, JsonDict, new_id

# How a charge's refunds turn out: the status they are created with, and for the pending
# ones, how reading them settles them.
REFUND_BEHAVIORS = ("succeed", "pending", "pending_fail", "fail", "requires_action", "canceled")
SETTLED_STATUSES = ("succeeded", "failed", "canceled")
# Only these can still change; the others are final, as at Stripe.
SETTLEABLE_STATUSES = ("pending", "requires_action")
REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")
# Statuses that hold money back from the charge; failed and canceled refunds give it back.
COUNTED_STATUSES = ("succeeded", "pending", "requires_action")
PENDING_FAILURE_REASON = "lost_or_stolen_card"
IMMEDIATE_FAILURE_REASON = "declined"
# Stripe's `failure_reason` values.
FAILURE_REASONS = (
    "charge_for_pending_refund_disputed",
    "declined",
    "expired_or_canceled_card",
    "insufficient_funds",
    "lost_or_stolen_card",
    "merchant_request",
    "unknown",
)
_CREATED_STATUS = {
    "succeed": ("succeeded", None),
    "pending": ("pending", None),
    "pending_fail": ("pending", None),
    "fail": ("failed", IMMEDIATE_FAILURE_REASON),
    "requires_action": ("requires_action", None),
    "canceled": ("canceled", None),
}


class Ledger:
    """Charges and refunds in the sandbox state, with the events their changes emit."""

    def __init__(self, core: Sandbox, events: EventLog, disputes: Disputes) -> None:
        self.core = core
        self.events = events
        self.disputes = disputes

    @property
    def charges(self) -> dict[str, JsonDict]:
        """Charges by id (internal records)."""
        charges: dict[str, JsonDict] = self.core.state["charges"]
        return charges

    @property
    def refunds(self) -> dict[str, JsonDict]:
        """Refunds by id, in creation order (internal records)."""
        refunds: dict[str, JsonDict] = self.core.state["refunds"]
        return refunds

    # -- views ---------------------------------------------------------------------------

    def refund_view(self, refund: JsonDict, *, expand_charge: bool = False) -> JsonDict:
        """A refund as Stripe shows it; `expand_charge` puts the charge object in `charge`."""
        charge = refund["charge"]
        return {
            "id": refund["id"],
            "object": "refund",
            "amount": refund["amount"],
            "currency": refund["currency"],
            "charge": self.charge_view(self.charges[charge]) if expand_charge else charge,
            "payment_intent": refund["payment_intent"],
            "status": refund["status"],
            "failure_reason": refund["failure_reason"],
            "reason": refund["reason"],
            "metadata": dict(refund["metadata"]),
            "created": refund["created"],
        }

    def amount_refunded(self, charge: JsonDict) -> int:
        """What refunds still holding money (`COUNTED_STATUSES`) have taken from a charge."""
        return sum(
            self.refunds[rid]["amount"]
            for rid in charge["refund_ids"]
            if self.refunds[rid]["status"] in COUNTED_STATUSES
        )

    def charge_view(self, charge: JsonDict) -> JsonDict:
        """A charge as Stripe shows it, with its refunds expanded."""
        refunded = self.amount_refunded(charge)
        refunds = [self.refund_view(self.refunds[rid]) for rid in reversed(charge["refund_ids"])]
        return {
            "id": charge["id"],
            "object": "charge",
            "amount": charge["amount"],
            "amount_captured": charge["amount"],
            "amount_refunded": refunded,
            "captured": True,
            "paid": True,
            "status": "succeeded",
            "currency": charge["currency"],
            "refunded": refunded >= charge["amount"],
            "disputed": bool(charge.get("dispute_id")),
            "payment_intent": charge["payment_intent"],
            "created": charge["created"],
            "refunds": {
                "object": "list",
                "data": refunds,
                "has_more": False,
                "url": f"/v1/charges/{charge['id']}/refunds",
            },
        }

    # -- lookups -------------------------------------------------------------------------

    def charge(self, charge_id: str, *, param: str = "id") -> JsonDict:
        """A charge's record, or a 404."""
        charge = self.charges.get(charge_id)
        if charge is None:
            raise ApiError(
                404, f"No such charge: '{charge_id}'", code="resource_missing", param=param
            )
        return charge

    def refund(self, refund_id: str) -> JsonDict:
        """A refund's record, or a 404."""
        refund = self.refunds.get(refund_id)
        if refund is None:
            raise ApiError(
                404, f"No such refund: '{refund_id}'", code="resource_missing", param="id"
            )
        return refund

    def charge_for(self, charge_id: str | None, payment_intent: str | None) -> JsonDict:
        """The charge a refund request names, by charge id or PaymentIntent."""
        if charge_id is not None:
            charge = self.charge(charge_id, param="charge")
            if payment_intent is not None and charge["payment_intent"] != payment_intent:
                raise ApiError(
                    400,
                    f"Charge {charge_id} does not belong to PaymentIntent {payment_intent}.",
                    code="parameter_invalid",
                    param="payment_intent",
                )
            return charge
        matches = [c for c in self.charges.values() if c["payment_intent"] == payment_intent]
        if not matches:
            raise ApiError(
                404,
                f"No such payment_intent: '{payment_intent}'",
                code="resource_missing",
                param="payment_intent",
            )
        return matches[-1]

    # -- changes -------------------------------------------------------------------------

    def add_refund(
        self,
        charge: JsonDict,
        amount: int | None,
        *,
        metadata: dict[str, str],
        reason: str | None,
        behavior: str,
        cause: JsonDict | None,
        ago_s: int = 0,
    ) -> JsonDict:
        """Refund (part of) a charge, turning out as `behavior` says; emits
        `refund.created`, then `charge.refunded` or `refund.failed` as the status says.

        `ago_s` > 0 records a refund made that long ago, before any webhook endpoint listened:
        it emits no events (Stripe keeps events 30 days; a listener added later hears nothing).
        """
        if self.disputes.blocks_refunds(charge):
            raise ApiError(
                400,
                f"Charge {charge['id']} has been charged back; cannot issue a refund.",
                code="charge_disputed",
                param="charge",
            )
        rest = charge["amount"] - self.amount_refunded(charge)
        if rest <= 0:
            raise ApiError(
                400,
                f"Charge {charge['id']} has already been refunded.",
                code="charge_already_refunded",
                param="charge",
            )
        amount = rest if amount is None else amount
        if amount > rest:
            raise ApiError(
                400,
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({rest}).",
                code="amount_too_large",
                param="amount",
            )
        status, failure_reason = _CREATED_STATUS[behavior]
        refund: JsonDict = {
            "id": new_id("re_"),
            "amount": amount,
            "currency": charge["currency"],
            "charge": charge["id"],
            "payment_intent": charge["payment_intent"],
            "status": status,
            "failure_reason": failure_reason,
            "reason": reason,
            "metadata": metadata,
            "created": self.core.now_int() - ago_s,
            "behavior": behavior,
            "settle_after_polls": charge["settle_after_polls"],
            "settle_after_s": charge.get("settle_after_s"),
            "polls": 0,
        }
        self.refunds[refund["id"]] = refund
        charge["refund_ids"].append(refund["id"])
        view = self.refund_view(refund)
        if ago_s > 0:
            return refund
        self.events.emit("refund.created", view, cause=cause)
        if status == "succeeded":
            self.events.emit("charge.refunded", self.charge_view(charge), cause=cause)
        elif status == "failed":
            self.events.emit("refund.failed", view, cause=cause)
        return refund

    def set_status(self, refund: JsonDict, status: str, failure_reason: str | None) -> None:
        """Move a refund to `status`; emits `refund.updated`, then `charge.refunded` when it
        succeeded or `refund.failed` when it failed. Failed and canceled refunds give their
        amount back to the charge."""
        before = self.refund_view(refund)
        refund["status"] = status
        refund["failure_reason"] = failure_reason if status == "failed" else None
        after = self.refund_view(refund)
        self.events.emit("refund.updated", after, previous=changed_attributes(before, after))
        if status == "succeeded":
            charge = self.charges[refund["charge"]]
            self.events.emit("charge.refunded", self.charge_view(charge))
        elif status == "failed":
            self.events.emit("refund.failed", after)

    def settle(self, refund: JsonDict, status: str) -> None:
        """Settle a pending (or requires_action) refund."""
        self.set_status(refund, status, PENDING_FAILURE_REASON)
