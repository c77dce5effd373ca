"""The approval policy: who may approve a refund and how many approvals it needs. Pure."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from refundsaga.contracts import (
    AmsConfirmation,
    ApprovalDecision,
    ApprovalPolicy,
    ApprovalRecord,
    BatchRefundInput,
    RefundRequest,
    Resolution,
    RestoreRequest,
)
from refundsaga.processor_events import PROCESSOR_REQUESTER
from refundsaga.settings import Settings
from refundsaga.signing import (
    SigningError,
    load_public_key,
    verify_decision,
    verify_ops_decision,
    verify_request,
)


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
        operators=list(settings.operators),
        dual_approval_cents=settings.dual_approval_cents,
        auto_approve_below_cents=settings.auto_approve_below_cents,
        approval_timeout=settings.approval_timeout,
        reminder_every=settings.approval_reminder_every,
        ams_reminder_every=settings.ams_reminder_every,
        ams_escalate_after=settings.ams_escalate_after,
        approver_public_keys=dict(settings.approver_public_keys),
    )


def required_approvals(
    policy: ApprovalPolicy, amount_cents: int, *, refunded_before_cents: int = 0
) -> int:
    """0 when auto-approved, 2 at or above the dual-approval threshold, otherwise 1.

    The thresholds apply to what the purchase will have had refunded in all, so splitting a
    refund into parts does not dodge the second approver.
    """
    total = amount_cents + refunded_before_cents
    if total < policy.auto_approve_below_cents:
        return 0
    if total >= policy.dual_approval_cents:
        return 2
    return 1


def signing_on(policy: ApprovalPolicy) -> bool:
    """Whether starts and human decisions must be signed (any public key configured)."""
    return bool(policy.approver_public_keys)


def start_refusal(
    policy: ApprovalPolicy,
    *,
    workflow_id: str,
    request: RefundRequest | BatchRefundInput | RestoreRequest,
) -> str | None:
    """Why a request may not start, or None. With signing on, the person it names (its
    requester, or a restore's operator) counts only when the request is signed by that
    person's key for this workflow id.

    A reconciliation is the processor's: its authority is the evidence the saga checks at the
    processor before it plans, so it needs no signature; nobody else may name the processor.
    """
    if isinstance(request, RefundRequest) and request.reconcile is not None:
        return _reconciliation_refusal(request)
    if isinstance(request, RestoreRequest):
        if policy.operators is not None and request.operator not in policy.operators:
            return f"{request.operator} is not on the operator allowlist (REFUND_OPERATORS)"
        who = request.operator
    else:
        who = request.requested_by
    if who == PROCESSOR_REQUESTER:
        return f"{who} is reserved for the reconciliations processor events start"
    if not signing_on(policy):
        return None
    return _signature_refusal(
        policy,
        who,
        request.signature,
        lambda key: verify_request(key, workflow_id, request),
        unsigned=f"the request is not signed: {who} signs with REFUND_SIGNING_KEY_FILE set",
        mismatch=f"the request's signature is not {who}'s for {workflow_id}",
    )


def _reconciliation_refusal(request: RefundRequest) -> str | None:
    reconciliation = request.reconcile
    assert reconciliation is not None
    if request.requested_by != PROCESSOR_REQUESTER:
        return f"a reconciliation is requested by {PROCESSOR_REQUESTER}, not {request.requested_by}"
    if request.batch_approval is not None:
        return "a reconciliation carries no batch approval"
    chosen = (request.amount_cents, request.revoke_progress, request.remove_entitlement)
    if any(value is not None for value in chosen):
        return (
            "a reconciliation moves no money and revokes as the money returned says: "
            "leave the amount, revoke and entitlement unset"
        )
    prefix = {"external_refund": "re_", "chargeback": "dp_"}[reconciliation.kind]
    if not reconciliation.processor_object_id.startswith(prefix):
        return f"a {reconciliation.kind} reconciliation names a {prefix} object"
    return None


def ops_refusal(
    policy: ApprovalPolicy,
    decision: Resolution | AmsConfirmation,
    *,
    requested_by: str,
    workflow_id: str,
    run_id: str,
) -> str | None:
    """Why an operator's resolution or AMS confirmation must be refused, or None."""
    operator = decision.operator
    if policy.operators is not None and operator not in policy.operators:
        return f"{operator} is not on the operator allowlist (REFUND_OPERATORS)"
    if operator == requested_by:
        return f"{operator} requested this refund and cannot decide on it (four-eyes rule)"
    if not signing_on(policy):
        return None
    return _signature_refusal(
        policy,
        operator,
        decision.signature,
        lambda key: verify_ops_decision(key, workflow_id, decision, run_id=run_id),
        unsigned=f"{operator}'s decision is not signed (set REFUND_SIGNING_KEY_FILE for the CLI)",
    )


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
    if not signing_on(policy):
        return None
    return _signature_refusal(
        policy,
        approver,
        decision.signature if decision is not None else None,
        lambda key: (
            decision is not None and verify_decision(key, workflow_id, decision, run_id=run_id)
        ),
        unsigned=(
            f"{approver}'s decision is not signed: approvals must be signed "
            "(set REFUND_SIGNING_KEY_FILE for the CLI)"
        ),
    )


def _signature_refusal(
    policy: ApprovalPolicy,
    who: str,
    signature: str | None,
    verify: Callable[[str], bool],
    *,
    unsigned: str,
    mismatch: str | None = None,
) -> str | None:
    """With signing on: `who` needs a configured key and a signature `verify` accepts with it."""
    key = policy.approver_public_keys.get(who)
    if key is None:
        return f"{who} has no public key configured (REFUND_APPROVER_PUBLIC_KEYS)"
    if not signature:
        return unsigned
    if not verify(key):
        return mismatch or f"{who}'s signature does not match this decision on this saga"
    return None
