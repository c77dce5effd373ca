"""The approval policy: who may approve a refund and how many approvals it needs. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from refundsaga.contracts import ApprovalDecision, ApprovalPolicy, ApprovalRecord
from refundsaga.settings import Settings
from refundsaga.signing import SigningError, load_public_key, verify_decision


def policy_from_settings(settings: Settings) -> ApprovalPolicy:
    """The policy as configured for this worker.

    Raises:
        ValueError: An approver public key is not a base64 Ed25519 key (fail at start, not at
            the first approval).
    """
    for name, key in settings.approver_public_keys.items():
        try:
            load_public_key(key)
        except SigningError as err:
            raise ValueError(f"REFUND_APPROVER_PUBLIC_KEYS: {name}: {err}") from err
    return ApprovalPolicy(
        approvers=list(settings.approvers),
        dual_approval_cents=settings.dual_approval_cents,
        auto_approve_below_cents=settings.auto_approve_below_cents,
        approval_timeout=settings.approval_timeout,
        reminder_every=settings.approval_reminder_every,
        ams_reminder_every=settings.ams_reminder_every,
        ams_escalate_after=settings.ams_escalate_after,
        approver_public_keys=dict(settings.approver_public_keys),
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
    decision: ApprovalDecision | None = None,
    workflow_id: str = "",
    run_id: str = "",
) -> str | None:
    """Why this approver's decision must be refused, or None when it may count.

    With approver public keys in the policy, the decision must be signed by the approver's key
    for this saga run (`refundsaga.signing`); without them the allowlist, the four-eyes rule
    and one decision per approver still hold.
    """
    if approver not in policy.approvers:
        return f"{approver} is not on the approver allowlist"
    if approver == requested_by:
        return f"{approver} requested this refund and cannot decide on it (four-eyes rule)"
    if any(d.approver == approver for d in decisions):
        return f"{approver} has already decided on this refund"
    if policy.approver_public_keys:
        key = policy.approver_public_keys.get(approver)
        if key is None:
            return f"{approver} has no public key configured (REFUND_APPROVER_PUBLIC_KEYS)"
        if decision is None or not decision.signature:
            return (
                f"{approver}'s decision is not signed: approvals must be signed "
                "(set REFUND_SIGNING_KEY_FILE for the CLI)"
            )
        if not verify_decision(key, workflow_id, decision, run_id=run_id):
            return f"{approver}'s signature does not match this decision on this saga"
    return None
