"""Batch refunds: a cancelled event or course, every buyer refunded with one approval."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator, model_validator

from refundsaga.contracts.common import (
    ACTOR_PATTERN,
    SIGNATURE_PATTERN,
    ApprovalPolicy,
    ApprovalRecord,
    SagaState,
    WaitingFor,
    clean_reason,
)
from refundsaga.contracts.decisions import IgnoredMessage, TimelineEntry
from refundsaga.contracts.saga import AmsAction
from refundsaga.message import Message

MAX_BATCH_PURCHASES = 50_000
"""At most this many purchase ids in one batch given as a list (a CSV file)."""

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
        return clean_reason(value)

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
