"""The saga's request, its plan and the inputs and results of its steps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from refundsaga.contracts.common import (
    ACTOR_PATTERN,
    SIGNATURE_PATTERN,
    ApprovalPolicy,
    BatchApproval,
    SagaState,
    clean_reason,
)
from refundsaga.message import CURRENCY_PATTERN, MAX_STORE_INT, Message
from refundsaga.models import EntitlementSource, LedgerEntry
from refundsaga.processor_events import Reconciliation, describe_reconciliation


class RefundRequest(Message):
    """What support asks for: refund a purchase, fully (amount omitted) or partially."""

    purchase_id: int = Field(gt=0, le=MAX_STORE_INT)
    amount_cents: int | None = Field(
        default=None, gt=0, le=MAX_STORE_INT, description="None: the unrefunded rest"
    )
    currency: str | None = Field(default=None, pattern=CURRENCY_PATTERN)
    reason: str = Field(min_length=1, max_length=500)
    requested_by: str = Field(pattern=ACTOR_PATTERN)
    revoke_progress: bool | None = Field(default=None, description="None: yes for a full refund")
    remove_entitlement: bool | None = Field(default=None, description="None: yes for a full refund")
    # Set only by a BatchRefund for its children: the saga accepts it only from that parent.
    batch_approval: BatchApproval | None = None
    # With signing on, the requester signs the request (refundsaga.signing.sign_request); the
    # nonce makes each signed request usable by one saga only.
    nonce: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    signature: str | None = Field(default=None, pattern=SIGNATURE_PATTERN)
    # Set for a reconciliation (refundsaga.processor_events.Reconciliation): money that went back
    # outside OASIS; the saga moves none and checks the claim at the processor.
    reconcile: Reconciliation | None = None

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        return clean_reason(value)


AmsAction = Literal["remove_via_api", "manual_task", "deactivate_purchase", "none"]


class ReconcileEvidence(Message):
    """A reconciliation as prepare confirmed it at the processor."""

    reconciliation: Reconciliation
    amount_cents: int = Field(description="What the refund or the lost dispute returned")
    returned_cents: int = Field(
        description="All the money back on the charge: succeeded refunds and lost disputes"
    )


class RefundPlan(Message):
    """Exactly what the saga will do, shown to approvers before anything changes."""

    purchase_id: int
    user_id: int
    product_id: int
    product_code: str
    entitlement_source: EntitlementSource
    ams_member_id: str | None
    charge_id: str
    currency: str
    purchase_amount_cents: int
    ledger_refunded_cents: int
    processor_refunded_cents: int
    amount_cents: int = Field(description="Money to move at the processor; 0 when already refunded")
    full_refund: bool
    already_refunded: bool = Field(description="The processor holds the refund already")
    revoke_progress: bool
    progress_records: int
    remove_entitlement: bool
    ams_action: AmsAction
    required_approvals: int
    policy: ApprovalPolicy
    # Set for a reconciliation: what the processor confirmed (no money moves).
    reconcile: ReconcileEvidence | None = None


def processor_task_queue(task_queue: str) -> str:
    """The task queue of the activities that call the processor, beside the saga's own.

    The worker serving it sets `max_task_queue_activities_per_second`, so the Temporal server
    paces the processor calls of every saga and batch together, across all workers.
    """
    return f"{task_queue}-processor"


def format_money(cents: int, currency: str | None) -> str:
    """Integer cents as a person reads them: 9995, usd -> 99.95 USD."""
    return f"{cents / 100:,.2f} {(currency or '').upper()}".strip()


def describe_plan(plan: RefundPlan) -> str:
    """The plan in one sentence, as approvers and the Temporal UI see it."""
    if plan.reconcile is not None:
        money = (
            f"no money moves: {describe_reconciliation(plan.reconcile.reconciliation)}; "
            f"{format_money(plan.reconcile.returned_cents, plan.currency)} of "
            f"{format_money(plan.purchase_amount_cents, plan.currency)} went back"
        )
    elif plan.already_refunded:
        money = "no money moves (the processor already refunded the charge)"
    else:
        money = (
            f"refund {format_money(plan.amount_cents, plan.currency)} of "
            f"{format_money(plan.purchase_amount_cents, plan.currency)}"
        )
    revoke = (
        f"delete {plan.progress_records} progress record(s)"
        if plan.revoke_progress
        else "keep progress"
    )
    ams = {
        "remove_via_api": f"remove AMS entitlement {plan.product_code} via the API",
        "manual_task": f"open a manual AMS task for {plan.product_code}",
        "deactivate_purchase": "end the OASIS purchase entitlement",
        "none": "keep the entitlement",
    }[plan.ams_action]
    approvals = (
        "auto-approved"
        if plan.required_approvals == 0
        else f"{plan.required_approvals} approval(s) needed"
    )
    return f"{money}; {revoke}; {ams}; {approvals}"


class PrepareInput(Message):
    request: RefundRequest
    workflow_id: str
    # The refund request's identity (see RefundSaga): prepare claims the purchase for it.
    request_id: str | None = None


REFUND_REQUEST_METADATA = "refund_request"
"""The refund's metadata key holding the request identity, so a refund can be found again."""


class ProcessorRefundInput(Message):
    workflow_id: str
    purchase_id: int
    charge_id: str
    amount_cents: int = Field(gt=0)
    currency: str
    idempotency_key: str
    request_id: str
    # Ask the processor for a refund of this request before sending one (any resend).
    look_first: bool = False


class ProcessorRefundResult(Message):
    refund_id: str
    status: str
    amount_cents: int
    currency: str
    failure_reason: str | None = None


class SettleInput(Message):
    """A pending refund the saga follows: read once at the processor."""

    refund_id: str


class RecordRefundsInput(Message):
    workflow_id: str
    purchase_id: int
    entries: list[LedgerEntry]


class ReconcileInput(Message):
    workflow_id: str
    purchase_id: int
    charge_id: str
    # Refunds carrying this request identity are the saga's own, not external.
    request_id: str | None = None
    # A reconciled lost dispute, recorded beside the charge's refunds.
    chargeback: LedgerEntry | None = None


class ReconcileResult(Message):
    entries: list[LedgerEntry]
    refunded_cents: int


class RevokeInput(Message):
    workflow_id: str
    purchase_id: int
    user_id: int
    product_id: int


class AmsRemovalInput(Message):
    workflow_id: str
    member_id: str
    product_code: str
    idempotency_key: str


class AmsRemovalResult(Message):
    removed: bool
    already_absent: bool


class DeactivateInput(Message):
    workflow_id: str
    purchase_id: int


class VerifyInput(Message):
    user_id: int
    product_id: int
    entitlement_source: EntitlementSource
    ams_member_id: str | None
    product_code: str
    ams_removal_confirmed: bool = False


NotificationKind = Literal[
    "approval_requested",
    "approval_reminder",
    "ams_task_opened",
    "ams_task_reminder",
    "ams_task_escalated",
    "needs_attention",
    "saga_ended",
    # A refund failed at the processor after its saga completed (FailedRefundTask).
    "refund_failed",
]


class Notification(Message):
    """A note for people: identifiers and a short text, no personal data."""

    kind: NotificationKind
    workflow_id: str
    purchase_id: int
    text: str
    state: SagaState | None = None
