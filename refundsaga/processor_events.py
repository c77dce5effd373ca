"""What the processor reports outside a saga's own calls (webhooks, the reconciliation sweep),
as messages between the receiver or the sweep and the workflows.

None of these carries authority: a saga woken by an event reads the processor itself, and a
reconciliation checks at the processor that the money really went back before it plans anything.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from refundsaga.message import CURRENCY_PATTERN, MAX_STORE_INT, Message

# Signal sent to a saga waiting on a pending refund when the processor reports it changed.
PROCESSOR_EVENT_SIGNAL = "processor_event"

REFUND_ID_PATTERN = r"^re_[A-Za-z0-9_]{1,200}$"
DISPUTE_ID_PATTERN = r"^dp_[A-Za-z0-9_]{1,200}$"
EVENT_ID_PATTERN = r"^evt_[A-Za-z0-9_]{1,200}$"
CHARGE_ID_PATTERN = r"^(ch|py)_[A-Za-z0-9_]{1,200}$"

# The requester of every reconciliation, and of nothing else: a person's start may not use it.
PROCESSOR_REQUESTER = "processor"

EventSource = Literal["webhook", "sweep"]
ReconcileKind = Literal["external_refund", "chargeback"]


class ProcessorEvent(Message):
    """Wakes a saga waiting on a refund; the saga then reads the refund at the processor."""

    refund_id: str = Field(pattern=REFUND_ID_PATTERN)
    event_id: str | None = Field(default=None, pattern=EVENT_ID_PATTERN)


class Reconciliation(Message):
    """Why a saga reconciles money that went back outside OASIS (no money moves)."""

    kind: ReconcileKind
    # The outside refund (re_...) or the lost dispute (dp_...) that returned the money.
    processor_object_id: str = Field(pattern=r"^(re|dp)_[A-Za-z0-9_]{1,200}$")
    source: EventSource
    event_id: str | None = Field(default=None, pattern=EVENT_ID_PATTERN)


def describe_reconciliation(reconciliation: Reconciliation) -> str:
    """The reconciliation in a few words, as approvers, ops and the Temporal UI see it."""
    what = {"external_refund": "refund made outside OASIS", "chargeback": "lost chargeback"}
    return (
        f"reconciliation of a {what[reconciliation.kind]} ({reconciliation.processor_object_id}, "
        f"reported by {reconciliation.source})"
    )


class FailedRefund(Message):
    """A refund the processor failed after its saga had completed: the customer lost access and
    did not get the money. Opens one ops task."""

    refund_id: str = Field(pattern=REFUND_ID_PATTERN)
    charge_id: str = Field(pattern=CHARGE_ID_PATTERN)
    purchase_id: int = Field(gt=0, le=MAX_STORE_INT)
    amount_cents: int = Field(gt=0, le=MAX_STORE_INT)
    currency: str = Field(pattern=CURRENCY_PATTERN)
    # The saga that made the refund (from the refund's metadata), when it was ours.
    saga_workflow_id: str | None = None
    failure_reason: str | None = Field(default=None, max_length=100)
    source: EventSource
    event_id: str | None = Field(default=None, pattern=EVENT_ID_PATTERN)
