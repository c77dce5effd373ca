"""The messages of the RefundSaga: workflow input, activity inputs and results, signals,
updates and the status query. Identifiers and money only, never names or emails."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator, model_validator

from refundsaga.message import CURRENCY_PATTERN, MAX_STORE_INT, Message
from refundsaga.models import AccessDecision, EntitlementSource, LedgerEntry
from refundsaga.processor_events import Reconciliation, describe_reconciliation

# User names of support staff, approvers and operators: short identifiers, not personal names.
ACTOR_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_EMAIL = re.compile(r"[^\s@]+@[^\s@]+\.[^\s@]+")
# C0 and C1 controls (ESC and CSI start terminal escapes, NUL truncates) and the Unicode
# bidirectional overrides that make text read differently from what it is.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# Free text is copied into history, the Temporal UI, notifications and the audit trail, where
# other tools render or paste it. The store binds parameters; this is defense in depth against
# markup and SQL statements that no refund reason needs. Narrow on purpose: statement shapes,
# not words, so "refunded; update the notes" still passes.
_MARKUP = re.compile(r"<(?:/?[a-z]|[!?])", re.IGNORECASE)
_SQL = re.compile(
    r";\s*(?:drop|truncate|alter|create)\s+(?:table|database|schema|index|view|user)\b"
    r"|;\s*(?:delete\s+from|insert\s+into|update\s+\w+\s+set|grant|exec(?:ute)?)\b"
    r"|\bunion\s+(?:all\s+)?select\b"
    r"|'\s*or\s+'?\d+'?\s*=\s*'?\d+",
    re.IGNORECASE,
)
# Base64 of a 64-byte Ed25519 signature is 88 characters; the bound keeps junk out of history.
SIGNATURE_PATTERN = r"^[A-Za-z0-9+/]{1,200}={0,2}$"


def clean_free_text(value: str, *, field: str) -> str:
    """Refuse free text carrying control characters, markup, SQL or an email into history."""
    value = value.strip()
    if _CONTROL.search(value):
        raise ValueError(f"{field} must not contain control characters")
    if _MARKUP.search(value):
        raise ValueError(f"{field} must not contain markup (<...>)")
    if _SQL.search(value):
        raise ValueError(f"{field} must not contain SQL statements")
    if _EMAIL.search(value):
        raise ValueError(
            f"{field} must not contain an email address: personal data stays out of the saga"
        )
    return value


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
    # Person -> base64 Ed25519 public key (requesters, approvers, operators); empty: signing is
    # off. The default keeps plans recorded before signed approvals decodable.
    approver_public_keys: dict[str, str] = Field(default_factory=dict)
    # Who may resolve NEEDS_ATTENTION and confirm a manual AMS removal; None in plans recorded
    # before there was an operator allowlist.
    operators: list[str] | None = None


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


# --- approvals, confirmations and ops decisions ---------------------------------------------


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


class ApprovalRecord(Message):
    approver: str
    approve: bool
    at: datetime
    comment: str = ""
    signature: str | None = None


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


# --- batch refunds: a cancelled event or course, every buyer refunded -----------------------

MAX_BATCH_PURCHASES = 50_000
"""At most this many purchase ids in one batch given as a list (a CSV file)."""

WORKFLOW_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$"


class BatchApproval(Message):
    """The approvals of a whole batch, carried by each child saga the batch starts.

    RefundSaga accepts it only when the saga was started as a child of the workflow it names,
    so it cannot be forged by starting a saga from outside with this field set.
    """

    batch_workflow_id: str = Field(pattern=WORKFLOW_ID_PATTERN)
    approvals: list[ApprovalRecord]
    max_amount_cents: int = Field(ge=0, description="What the batch approved for this purchase")
    # The batch run the approvals were signed for, so each child can check the signatures.
    approval_run_id: str | None = None


# A saga reports itself to an approved batch in one of these buckets, by this signal.
BatchBucket = Literal["running", "waiting", "needs_attention", "done", "failed"]
BATCH_REPORT_SIGNAL = "child_report"


def batch_bucket(state: SagaState) -> BatchBucket:
    """Where a child saga in `state` counts in its batch's progress."""
    if state == SagaState.COMPLETED:
        return "done"
    if state.is_end:
        return "failed"
    if state == SagaState.NEEDS_ATTENTION:
        return "needs_attention"
    if state in (SagaState.AWAITING_APPROVAL, SagaState.AWAITING_AMS_CONFIRMATION):
        return "waiting"
    return "running"


class BatchChildReport(Message):
    """A child saga tells its batch that it moved from one bucket to another (a signal)."""

    purchase_id: int
    workflow_id: str
    previous: BatchBucket
    current: BatchBucket
    state: SagaState
    refunded_cents: int = 0
    error: str | None = None


class BatchState(StrEnum):
    """Where a batch is. The last five are ends."""

    PLANNING = "PLANNING"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"

    @property
    def is_end(self) -> bool:
        return self in (
            BatchState.COMPLETED,
            BatchState.REJECTED,
            BatchState.EXPIRED,
            BatchState.CANCELLED,
            BatchState.FAILED,
        )


class BatchItem(Message):
    """What a batch will do for one purchase, or why it skips it."""

    purchase_id: int
    user_id: int | None = None
    product_id: int | None = None
    currency: str | None = None
    purchase_amount_cents: int = 0
    amount_cents: int = Field(default=0, description="Money to move; 0 when already refunded")
    already_refunded: bool = Field(default=False, description="At the processor, outside OASIS")
    progress_records: int = 0
    ams_action: AmsAction = "none"
    skip_reason: str | None = None
    audit_mark: int = Field(
        default=0, description="The audit trail's last event id before the saga could start"
    )

    @property
    def included(self) -> bool:
        return self.skip_reason is None


class BatchSummary(Message):
    """A batch in totals: what approvers decide on."""

    purchases: int
    included: int
    skipped: int
    already_refunded: int
    total_cents: int = Field(description="Money to move, all currencies added up")
    totals_by_currency: dict[str, int] = Field(default_factory=dict)
    progress_records: int
    ams_actions: dict[str, int] = Field(default_factory=dict)
    skip_reasons: dict[str, int] = Field(default_factory=dict)
    required_approvals: int
    policy: ApprovalPolicy
    window: int = Field(ge=1)
    rate_per_s: float = Field(gt=0)


class BatchPlan(Message):
    """The whole plan, per purchase: what `refund batch --dry-run` shows."""

    summary: BatchSummary
    items: list[BatchItem]


class BatchCounts(Message):
    """How far a batch is; every included purchase is in exactly one of the first seven."""

    pending: int = 0
    running: int = 0
    waiting: int = 0
    needs_attention: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = Field(default=0, description="Not started: a saga was already running")
    refunded_cents: int = 0

    @property
    def open(self) -> int:
        """Children started and not ended."""
        return self.running + self.waiting + self.needs_attention


class BatchIssue(Message):
    """A purchase of the batch that did not simply complete."""

    purchase_id: int
    outcome: str
    reason: str | None = None


class BatchStatus(Message):
    """The answer of the batch's `progress` query, and its result."""

    workflow_id: str
    plan_id: str = Field(description="Its plan's key in the store: workflow id / first run id")
    state: BatchState
    product_id: int | None = None
    requested_by: str
    reason: str
    summary: BatchSummary | None = None
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    required_approvals: int | None = None
    waiting_for: WaitingFor | None = None
    waiting_since: datetime | None = None
    counts: BatchCounts = Field(default_factory=BatchCounts)
    cursor: int = Field(default=0, description="The last purchase id started")
    runs: int = 1
    started_at: datetime
    running_since: datetime | None = None
    finished_at: datetime | None = None
    attention: list[int] = Field(default_factory=list, description="Purchases needing ops")
    issues: list[BatchIssue] = Field(default_factory=list, description="The latest, capped")
    error: str | None = None
    ignored: list[IgnoredMessage] = Field(default_factory=list)
    timeline: list[TimelineEntry] = Field(default_factory=list)


class BatchChild(Message):
    """A saga the batch started and has not seen end: where it counts, and from which audit
    event on its end belongs to it (an earlier saga for the purchase had the same id)."""

    bucket: BatchBucket
    audit_mark: int = 0


class BatchChildEndInput(Message):
    workflow_id: str
    after_event_id: int


class BatchChildEnd(Message):
    """A child saga's end as the store recorded it (the saga closes its books, then reports)."""

    ended: bool
    state: SagaState | None = None
    refunded_cents: int = 0
    error: str | None = None


class BatchCarry(Message):
    """What a batch hands to its next run when it continues as new."""

    batch_workflow_id: str = Field(
        default="", description="The batch that wrote it: a carry is taken only by its next run"
    )
    written_by_run_id: str = Field(default="", description="The run that continued as new")
    children: dict[int, BatchChild] = Field(
        default_factory=dict, description="Sagas started and not ended, by purchase id"
    )
    status: BatchStatus
    recent_starts: list[datetime] = Field(
        default_factory=list, description="The rate limit's window: the latest start times"
    )


class BatchRefundInput(Message):
    """Refund every buyer of a product, or a list of purchases, with one approval."""

    product_id: int | None = Field(default=None, gt=0)
    purchase_ids: list[int] | None = Field(default=None, max_length=MAX_BATCH_PURCHASES)
    reason: str = Field(min_length=1, max_length=500)
    requested_by: str = Field(pattern=ACTOR_PATTERN)
    window: int | None = Field(default=None, ge=1, le=1_000, description="None: the worker's")
    rate_per_s: float | None = Field(default=None, gt=0, le=1_000)
    starts_per_run: int = Field(default=250, ge=1, le=5_000)
    carry: BatchCarry | None = None
    # With signing on, the requester signs the batch (refundsaga.signing.sign_request).
    nonce: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    signature: str | None = Field(default=None, pattern=SIGNATURE_PATTERN)

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        value = clean_free_text(value, field="reason")
        if not value:
            raise ValueError("reason must not be blank")
        return value

    @field_validator("purchase_ids")
    @classmethod
    def _ids(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(i <= 0 for i in value):
            raise ValueError("purchase ids must be positive")
        if len(set(value)) != len(value):
            raise ValueError("a purchase appears twice")
        if not value:
            raise ValueError("no purchases given")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> BatchRefundInput:
        if self.carry is None and (self.product_id is None) == (self.purchase_ids is None):
            raise ValueError("give either a product or a list of purchases")
        return self


class BatchPlanInput(Message):
    batch_id: str
    product_id: int | None = None
    purchase_ids: list[int] | None = None
    window: int | None = None
    rate_per_s: float | None = None


class BatchPageInput(Message):
    batch_id: str
    after_purchase_id: int = 0
    limit: int = Field(ge=1)


class BatchCloseInput(Message):
    """Final bookkeeping of a batch: its decisions and end in the audit trail."""

    batch_id: str
    plan_id: str = Field(description="Tells this batch from an earlier one with the same id")
    state: BatchState
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    detail: dict[str, str | int | bool | None] = Field(default_factory=dict)


# --- restore of a mistaken revoke -------------------------------------------------------------


class RestoreState(StrEnum):
    """Where a restore is. The last six are ends."""

    CHECKING = "CHECKING"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    RESTORING = "RESTORING"
    COMPLETED = "COMPLETED"
    REFUSED = "REFUSED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


class RestoreRequest(Message):
    """Put back the progress a completed saga archived and deleted."""

    saga_workflow_id: str = Field(pattern=WORKFLOW_ID_PATTERN)
    operator: str = Field(pattern=ACTOR_PATTERN)
    reason: str = Field(min_length=1, max_length=500)
    # With signing on, the operator signs the request (refundsaga.signing.sign_request).
    nonce: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    signature: str | None = Field(default=None, pattern=SIGNATURE_PATTERN)

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        value = clean_free_text(value, field="reason")
        if not value:
            raise ValueError("reason must not be blank")
        return value


class RestoreCheck(Message):
    """What the store holds for a saga's progress snapshot, and the rules in force."""

    saga_workflow_id: str
    saga_state: str | None = Field(description="How the saga ended; None while it runs")
    revoked: bool = Field(description="The saga archived and deleted progress")
    purchase_id: int | None = None
    user_id: int | None = None
    product_id: int | None = None
    rows: int = Field(description="Rows of the latest snapshot not restored yet")
    archived_at: datetime | None = None
    restored_at: datetime | None = None
    restored_by: str | None = None
    conflicts: int = Field(description="Archived items the user has progress in again")
    retention: timedelta
    policy: ApprovalPolicy


class RestoreInput(Message):
    restore_workflow_id: str
    saga_workflow_id: str
    operator: str
    archived_at: datetime
    not_before: datetime = Field(description="Snapshots archived before this have expired")
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    reason: str


class RestoreResult(Message):
    restored: int
    purchase_id: int
    user_id: int
    product_id: int


class RestoreStatus(Message):
    """The answer of the restore's `status` query, and its result."""

    workflow_id: str
    state: RestoreState
    saga_workflow_id: str
    operator: str
    reason: str
    check: RestoreCheck | None = None
    expires_at: datetime | None = None
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    required_approvals: int = 1
    waiting_for: WaitingFor | None = None
    waiting_since: datetime | None = None
    restored: int | None = None
    error: str | None = None
    ignored: list[IgnoredMessage] = Field(default_factory=list)
    timeline: list[TimelineEntry] = Field(default_factory=list)


class RestoreCloseInput(Message):
    restore_workflow_id: str
    run_id: str = Field(description="Tells this restore from an earlier one with the same id")
    saga_workflow_id: str
    purchase_id: int | None
    state: RestoreState
    operator: str
    approvals: list[ApprovalRecord] = Field(default_factory=list)
    detail: dict[str, str | int | bool | None] = Field(default_factory=dict)


class PurgeInput(Message):
    """Delete progress snapshots older than the retention (the schedule's workflow input)."""

    retention: timedelta


class PurgeCutoff(Message):
    """The purge activity's input: snapshots archived before this go."""

    cutoff: datetime
    as_of: datetime | None = Field(
        default=None, description="The workflow's now: the worker's retention is kept from it"
    )


class PurgeResult(Message):
    cutoff: datetime
    deleted: int
    sagas: int


RefundRequest.model_rebuild()
