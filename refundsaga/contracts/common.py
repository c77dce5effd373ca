"""What every message of RefundSaga shares: the patterns and free-text rule its fields are
checked by, where a saga is and whom it waits for, the approval policy and the approvals a batch
hands its children."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import Field

from refundsaga.message import Message

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


def clean_reason(value: str) -> str:
    """`clean_free_text` for a request's reason, which must not be blank either."""
    value = clean_free_text(value, field="reason")
    if not value:
        raise ValueError("reason must not be blank")
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


class ApprovalRecord(Message):
    approver: str
    approve: bool
    at: datetime
    comment: str = ""
    signature: str | None = None


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
