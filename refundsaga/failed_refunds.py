"""The ops task for a refund the processor failed after its saga completed: its messages.

The customer has lost access and has not got the money. `FailedRefundTask` (workflows/) checks
the report at the processor, puts the ledger right, tells ops, and waits for one decision: a
new refund attempt, restoring the progress, or closing the task with a note.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator, model_validator

from refundsaga.contracts import (
    ACTOR_PATTERN,
    SIGNATURE_PATTERN,
    ApprovalPolicy,
    IgnoredMessage,
    RefundRequest,
    RestoreRequest,
    TimelineEntry,
    WaitingFor,
    clean_free_text,
    format_money,
)
from refundsaga.message import Message
from refundsaga.processor_events import EventSource, FailedRefund

WORKFLOW_NAME = "FailedRefundTask"
DECIDE_UPDATE = "decide_failed_refund"
STATUS_QUERY = "status"

# Restore puts back the progress the saga archived, nothing else.
RESTORE_LEAVES_ENTITLEMENT = (
    "restoring access puts back the progress the saga archived; it does not grant the AMS "
    "entitlement (or the OASIS purchase's) again: do that by hand where it is needed"
)


class FailedRefundState(StrEnum):
    """Where the task is; the value is what lists show as `RefundState`."""

    CHECKING = "OPS_TASK_CHECKING"
    OPEN = "OPS_TASK_OPEN"
    CLOSED = "OPS_TASK_CLOSED"
    # The report did not hold at the processor or in the ledger: nothing was changed.
    REFUSED = "OPS_TASK_REFUSED"

    @property
    def is_end(self) -> bool:
        return self in (FailedRefundState.CLOSED, FailedRefundState.REFUSED)


FailedRefundChoice = Literal["retry", "restore_access", "close"]


class FailedRefundDecision(Message):
    """An operator's one decision on the task (the `decide_failed_refund` update).

    `retry` carries the new saga's request and `restore_access` the restore's request, each
    built (and with signing on, signed) by the operator as for any start; the workflow starts
    them as they are, and the started workflow checks them as it checks any start.
    """

    choice: FailedRefundChoice
    operator: str = Field(pattern=ACTOR_PATTERN)
    note: str = Field(default="", max_length=500)
    refund_request: RefundRequest | None = None
    restore_request: RestoreRequest | None = None
    # Required with signing on: the operator's signature over this task run and the whole
    # decision, the request inside included (refundsaga.signing.sign_failed_refund_decision).
    signature: str | None = Field(default=None, pattern=SIGNATURE_PATTERN)

    @field_validator("note")
    @classmethod
    def _note(cls, value: str) -> str:
        return clean_free_text(value, field="note")

    @model_validator(mode="after")
    def _fits_choice(self) -> FailedRefundDecision:
        if self.choice == "close" and not self.note:
            raise ValueError("closing a failed refund's task needs a note saying why")
        if (self.choice == "retry") != (self.refund_request is not None):
            raise ValueError("a refund request goes with `retry`, and only with it")
        if (self.choice == "restore_access") != (self.restore_request is not None):
            raise ValueError("a restore request goes with `restore_access`, and only with it")
        return self


class FailedRefundCheckInput(Message):
    task_workflow_id: str
    failed: FailedRefund


class FailedRefundCheck(Message):
    """The report as the processor and the store confirmed it, and the ledger put right."""

    refund_id: str
    charge_id: str
    purchase_id: int
    user_id: int
    product_id: int
    amount_cents: int
    currency: str
    failure_reason: str | None = Field(default=None, description="The processor's")
    saga_workflow_id: str | None = Field(description="The saga the ledger says made the refund")
    saga_state: str | None = Field(description="How that saga ended; None: no end recorded")
    saga_requested_by: str | None = Field(description="Its requester, when Temporal knows")
    archived_progress: int = Field(description="Progress rows the saga archived, not restored")
    refunded_cents: int = Field(description="The purchase's refunded amount after the failure")
    purchase_status: str
    newly_recorded: bool = Field(description="False: an earlier attempt recorded the failure")
    policy: ApprovalPolicy


class FailedRefundDecisionRecord(Message):
    choice: FailedRefundChoice
    operator: str
    at: datetime
    note: str = ""
    signed: bool = False
    signature: str | None = None
    started_workflow_id: str | None = None
    started_run_id: str | None = None


class FailedRefundStatus(Message):
    """The answer of the task's `status` query, and its result."""

    workflow_id: str
    state: FailedRefundState
    refund_id: str
    # As reported until the check confirms them (`check`).
    purchase_id: int
    amount_cents: int
    currency: str
    source: EventSource
    check: FailedRefundCheck | None = None
    waiting_for: WaitingFor | None = None
    waiting_since: datetime | None = None
    decision: FailedRefundDecisionRecord | None = None
    error: str | None = None
    ignored: list[IgnoredMessage] = Field(default_factory=list)
    timeline: list[TimelineEntry] = Field(default_factory=list)


class FailedRefundReceipt(Message):
    """What the deciding operator learns at once."""

    state: FailedRefundState
    choice: FailedRefundChoice
    started_workflow_id: str | None = None
    message: str


class FailedRefundCloseInput(Message):
    """The task's end into the audit trail, once per run."""

    task_workflow_id: str
    run_id: str
    state: FailedRefundState
    refund_id: str
    purchase_id: int | None
    decision: FailedRefundDecisionRecord | None = None
    detail: dict[str, str | int | bool | None] = Field(default_factory=dict)


def task_summary(failed: FailedRefund) -> str:
    """The task's static summary (set by whoever starts it): what was reported."""
    return (
        f"Failed refund {failed.refund_id}: "
        f"{format_money(failed.amount_cents, failed.currency)} of purchase {failed.purchase_id}"
    )
