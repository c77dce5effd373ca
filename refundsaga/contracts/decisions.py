"""What people send a saga (approvals, confirmations, ops decisions), what it records of
them, and what it answers: its status and receipts, and its closing input."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, field_validator

from refundsaga.contracts.common import (
    ACTOR_PATTERN,
    SIGNATURE_PATTERN,
    ApprovalRecord,
    SagaState,
    WaitingFor,
    clean_free_text,
)
from refundsaga.contracts.saga import RefundPlan
from refundsaga.message import Message
from refundsaga.models import AccessDecision
from refundsaga.processor_events import Reconciliation


class ApprovalDecision(Message):
    """An approver's decision, sent as the `approve` or `reject` signal or the `decide` update."""

    approver: str = Field(pattern=ACTOR_PATTERN)
    approve: bool = True
    comment: str = Field(default="", max_length=500)
    signature: str | None = Field(
        default=None,
        pattern=SIGNATURE_PATTERN,
        description="Base64 Ed25519 signature (refundsaga.signing); required when the policy "
        "has approver public keys",
    )

    @field_validator("comment")
    @classmethod
    def _comment(cls, value: str) -> str:
        return clean_free_text(value, field="comment")


class AmsConfirmation(Message):
    """Someone removed the entitlement in an AMS without integration, by hand."""

    operator: str = Field(pattern=ACTOR_PATTERN)
    ams_reference: str = Field(min_length=1, max_length=200)
    note: str = Field(default="", max_length=500)
    # Required with signing on: the operator's signature over this saga run and confirmation.
    signature: str | None = Field(default=None, pattern=SIGNATURE_PATTERN)

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
    # Required with signing on: the operator's signature over this saga run and decision.
    signature: str | None = Field(default=None, pattern=SIGNATURE_PATTERN)

    @field_validator("note")
    @classmethod
    def _note(cls, value: str) -> str:
        return clean_free_text(value, field="note")


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
    # While the refund is pending at the processor: which one, and when the fallback timer
    # reads it next unless a processor event comes first; how often the saga read it pending.
    pending_refund_id: str | None = None
    reads: int = 0
    next_read_at: datetime | None = None


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
    # The refund request's identity: fixed at the first start, kept across runs and resets.
    request_id: str | None = None
    currency: str | None = None
    requested_by: str
    # Set for a reconciliation: money that went back outside OASIS, and who reported it.
    reconcile: Reconciliation | None = None
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
    request_id: str | None = None
    detail: dict[str, str | int | bool | None] = Field(default_factory=dict)
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    resolutions: list[ResolutionRecord] = Field(default_factory=list)
