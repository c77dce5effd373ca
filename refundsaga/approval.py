"""The approval policy: who may approve a refund and how many approvals it needs. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from refundsaga.contracts import ApprovalPolicy, ApprovalRecord
from refundsaga.settings import Settings


def policy_from_settings(settings: Settings) -> ApprovalPolicy:
    """The policy as configured for this worker."""
    return ApprovalPolicy(
        approvers=list(settings.approvers),
        dual_approval_cents=settings.dual_approval_cents,
        auto_approve_below_cents=settings.auto_approve_below_cents,
        approval_timeout=settings.approval_timeout,
        reminder_every=settings.approval_reminder_every,
        ams_reminder_every=settings.ams_reminder_every,
        ams_escalate_after=settings.ams_escalate_after,
    )


def required_approvals(policy: ApprovalPolicy, amount_cents: int) -> int:
    """0 when auto-approved, 2 at or above the dual-approval threshold, otherwise 1."""
    if amount_cents < policy.auto_approve_below_cents:
        return 0
    if amount_cents >= policy.dual_approval_cents:
        return 2
    return 1


def refusal_reason(
    policy: ApprovalPolicy,
    *,
    approver: str,
    requested_by: str,
    decisions: Sequence[ApprovalRecord],
) -> str | None:
    """Why this approver's decision must be refused, or None when it may count."""
    if approver not in policy.approvers:
        return f"{approver} is not on the approver allowlist"
    if approver == requested_by:
        return f"{approver} requested this refund and cannot decide on it (four-eyes rule)"
    if any(d.approver == approver for d in decisions):
        return f"{approver} has already decided on this refund"
    return None
