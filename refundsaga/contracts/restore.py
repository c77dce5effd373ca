"""The restore of a mistaken revoke, and the purge of progress snapshots past retention."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import Field, field_validator

from refundsaga.contracts.common import (
    ACTOR_PATTERN,
    SIGNATURE_PATTERN,
    WORKFLOW_ID_PATTERN,
    ApprovalPolicy,
    ApprovalRecord,
    WaitingFor,
    clean_reason,
)
from refundsaga.contracts.decisions import IgnoredMessage, TimelineEntry
from refundsaga.message import Message


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
        return clean_reason(value)


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
