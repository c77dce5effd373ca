"""The messages of the RefundSaga: workflow input, activity inputs and results, signals,
updates and the status query. Identifiers and money only, never names or emails."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from refundsaga.models import AccessDecision, EntitlementSource, LedgerEntry

# User names of support staff, approvers and operators: short identifiers, not personal names.
ACTOR_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_EMAIL = re.compile(r"[^\s@]+@[^\s@]+\.[^\s@]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
CURRENCY_PATTERN = r"^[a-z]{3}$"


def clean_free_text(value: str, *, field: str) -> str:
    """Refuse free text that would carry control characters or an email into history."""
    value = value.strip()
    if _CONTROL.search(value):
        raise ValueError(f"{field} must not contain control characters")
    if _EMAIL.search(value):
        raise ValueError(
            f"{field} must not contain an email address: personal data stays out of the saga"
        )
    return value


class Message(BaseModel):
    """Base of every saga message: strict about unknown fields."""

    model_config = ConfigDict(extra="forbid")


class SagaState(StrEnum):
    """Where a saga is. The last five are ends; NEEDS_ATTENTION waits for ops."""

    PREPARING = "PREPARING"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    REFUNDING = "REFUNDING"
    REVOKING = "REVOKING"
    DEENTITLING = "DEENTITLING"
    AWAITING_AMS_CONFIRMATION = "AWAITING_AMS_CONFIRMATION"
    VERIFYING = "VERIFYING"
    NEEDS_ATTENTION = "NEEDS_ATTENTION"
    COMPLETED = "COMPLETED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"

    @property
    def is_end(self) -> bool:
        return self in END_STATES


END_STATES = frozenset(
    {
        SagaState.COMPLETED,
        SagaState.REJECTED,
        SagaState.EXPIRED,
        SagaState.CANCELLED,
        SagaState.FAILED,
    }
)


class WaitingFor(StrEnum):
    """Whom a saga waits for, if anyone."""

    APPROVAL = "approval"
    AMS_CONFIRMATION = "ams_confirmation"
    OPS = "ops"


class RefundRequest(Message):
    """What support asks for: refund a purchase, fully (amount omitted) or partially."""

    purchase_id: int = Field(gt=0)
    amount_cents: int | None = Field(default=None, gt=0, description="None: the unrefunded rest")
    currency: str | None = Field(default=None, pattern=CURRENCY_PATTERN)
    reason: str = Field(min_length=1, max_length=500)
    requested_by: str = Field(pattern=ACTOR_PATTERN)
    revoke_progress: bool | None = Field(default=None, description="None: yes for a full refund")
    remove_entitlement: bool | None = Field(default=None, description="None: yes for a full refund")

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        value = clean_free_text(value, field="reason")
        if not value:
            raise ValueError("reason must not be blank")
        return value


class ApprovalPolicy(Message):
    """The approval rules in force when the saga was prepared (recorded in history)."""

    approvers: list[str]
    dual_approval_cents: int = Field(ge=0)
    auto_approve_below_cents: int = Field(ge=0)
    approval_timeout: timedelta
    reminder_every: timedelta
    ams_reminder_every: timedelta
    ams_escalate_after: timedelta


AmsAction = Literal["remove_via_api", "manual_task", "deactivate_purchase", "none"]


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


def format_money(cents: int, currency: str | None) -> str:
    """Integer cents as a person reads them: 9995, usd -> 99.95 USD."""
    return f"{cents / 100:,.2f} {(currency or '').upper()}".strip()


def describe_plan(plan: RefundPlan) -> str:
    """The plan in one sentence, as approvers and the Temporal UI see it."""
    money = (
        "no money moves (the processor already refunded the charge)"
        if plan.already_refunded
        else (
            f"refund {format_money(plan.amount_cents, plan.currency)} of "
            f"{format_money(plan.purchase_amount_cents, plan.currency)}"
        )
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


class ProcessorRefundInput(Message):
    workflow_id: str
    purchase_id: int
    charge_id: str
    amount_cents: int = Field(gt=0)
    currency: str
    idempotency_key: str


class ProcessorRefundResult(Message):
    refund_id: str
    status: str
    amount_cents: int
    currency: str
    failure_reason: str | None = None


class SettleInput(Message):
    refund_id: str


class RecordRefundsInput(Message):
    workflow_id: str
    purchase_id: int
    entries: list[LedgerEntry]


class ReconcileInput(Message):
    workflow_id: str
    purchase_id: int
    charge_id: str


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
]


class Notification(Message):
    """A note for people: identifiers and a short text, no personal data."""

    kind: NotificationKind
    workflow_id: str
    purchase_id: int
    text: str
    state: SagaState | None = None


# --- approvals, confirmations and ops decisions ---------------------------------------------


class ApprovalDecision(Message):
    """An approver's decision, sent as the `approve` or `reject` signal or the `decide` update."""

    approver: str = Field(pattern=ACTOR_PATTERN)
    approve: bool = True
    comment: str = Field(default="", max_length=500)

    @field_validator("comment")
    @classmethod
    def _comment(cls, value: str) -> str:
        return clean_free_text(value, field="comment")


class AmsConfirmation(Message):
    """Someone removed the entitlement in an AMS without integration, by hand."""

    operator: str = Field(pattern=ACTOR_PATTERN)
    ams_reference: str = Field(min_length=1, max_length=200)
    note: str = Field(default="", max_length=500)

    @field_validator("ams_reference", "note")
    @classmethod
    def _text(cls, value: str) -> str:
        return clean_free_text(value, field="ams_reference/note")


ResolveAction = Literal["retry", "skip", "abort"]


class Resolution(Message):
    """What ops decide for a saga in NEEDS_ATTENTION."""

    action: ResolveAction
    operator: str = Field(pattern=ACTOR_PATTERN)
    note: str = Field(default="", max_length=500)

    @field_validator("note")
    @classmethod
    def _note(cls, value: str) -> str:
        return clean_free_text(value, field="note")


class ApprovalRecord(Message):
    approver: str
    approve: bool
    at: datetime
    comment: str = ""


class ResolutionRecord(Message):
    step: str
    action: ResolveAction
    operator: str
    at: datetime
    note: str = ""


class IgnoredMessage(Message):
    """A signal the saga refused; recorded so a person can see why nothing happened."""

    kind: str
    by: str
    at: datetime
    reason: str


class TimelineEntry(Message):
    at: datetime
    step: str
    actor: str
    outcome: str


class RefundSummary(Message):
    source: Literal["processor", "external"] | None = None
    amount_cents: int = 0
    processor_refund_ids: list[str] = Field(default_factory=list)


class AmsSummary(Message):
    mode: Literal["api", "manual", "oasis", "none"] = "none"
    state: Literal[
        "not_needed",
        "pending",
        "removed",
        "already_absent",
        "awaiting_confirmation",
        "confirmed",
        "skipped",
    ] = "pending"
    reference: str | None = None


class SagaStatus(Message):
    """The answer of the `status` query, and the saga's result."""

    workflow_id: str
    state: SagaState
    purchase_id: int
    amount_cents: int | None
    currency: str | None = None
    requested_by: str
    branch: Literal["refund", "already_refunded"] | None = None
    refund: RefundSummary = Field(default_factory=RefundSummary)
    progress_deleted: int | None = None
    ams: AmsSummary = Field(default_factory=AmsSummary)
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    required_approvals: int | None = None
    waiting_for: WaitingFor | None = None
    waiting_since: datetime | None = None
    error: str | None = None
    access: AccessDecision | None = None
    plan: RefundPlan | None = None
    resolutions: list[ResolutionRecord] = Field(default_factory=list)
    ignored: list[IgnoredMessage] = Field(default_factory=list)
    timeline: list[TimelineEntry] = Field(default_factory=list)


class DecisionReceipt(Message):
    """What an update caller learns at once: the state after their message was applied."""

    state: SagaState
    approvals: int
    required_approvals: int | None
    message: str


class CloseInput(Message):
    """Final bookkeeping of a saga at any end: audit, purchase status, notification."""

    workflow_id: str
    purchase_id: int
    state: SagaState
    revoked: bool = False
    detail: dict[str, str | int | bool | None] = Field(default_factory=dict)
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    resolutions: list[ResolutionRecord] = Field(default_factory=list)
