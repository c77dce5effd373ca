"""Who may decide on a failed refund's ops task, and whether what they send fits it. Pure.

The task's update validator asks `decision_refusal`; a refused decision never reaches history.
"""

from __future__ import annotations

from refundsaga.approval import signing_on, start_refusal
from refundsaga.failed_refunds import FailedRefundCheck, FailedRefundDecision
from refundsaga.ids import restore_id_for, workflow_id_for
from refundsaga.signing import verify_failed_refund_decision


def decision_refusal(
    check: FailedRefundCheck,
    decision: FailedRefundDecision,
    *,
    workflow_id: str,
    run_id: str,
) -> str | None:
    """Why this operator's decision on the task must be refused, or None when it may count.

    An allowlisted operator other than the refund's original requester (when known), signed
    for this task run with signing on; a new refund only of the failed amount, leaving progress
    and entitlement alone, requested by the operator; a restore only of the saga that made the
    refund, asked by the operator. The request inside is checked as its workflow checks a start.
    """
    policy = check.policy
    operator = decision.operator
    if policy.operators is not None and operator not in policy.operators:
        return f"{operator} is not on the operator allowlist (REFUND_OPERATORS)"
    if operator == check.saga_requested_by:
        return f"{operator} requested the failed refund and cannot decide on it (four-eyes rule)"
    if signing_on(policy):
        key = policy.approver_public_keys.get(operator)
        if key is None:
            return f"{operator} has no public key configured (REFUND_APPROVER_PUBLIC_KEYS)"
        if not decision.signature:
            return f"{operator}'s decision is not signed (set REFUND_SIGNING_KEY_FILE for the CLI)"
        if not verify_failed_refund_decision(key, workflow_id, decision, run_id=run_id):
            return f"{operator}'s signature does not match this decision on this task"
    if decision.choice == "retry":
        return _retry_refusal(check, decision)
    if decision.choice == "restore_access":
        return _restore_refusal(check, decision)
    return None


def _retry_refusal(check: FailedRefundCheck, decision: FailedRefundDecision) -> str | None:
    request = decision.refund_request
    if request is None:
        return "retry needs the new refund's request"
    wanted = (check.purchase_id, check.amount_cents, check.currency, False, False)
    given = (
        request.purchase_id,
        request.amount_cents,
        request.currency,
        request.revoke_progress,
        request.remove_entitlement,
    )
    if given != wanted:
        return (
            f"the new refund must be of the failed {check.amount_cents} {check.currency} of "
            f"purchase {check.purchase_id}, keeping progress and entitlement as they are"
        )
    if request.requested_by != decision.operator:
        return "the new refund must be requested by the deciding operator"
    if request.batch_approval is not None or request.reconcile is not None:
        return "the new refund is a plain refund: no batch approval, no reconciliation"
    return start_refusal(
        check.policy, workflow_id=workflow_id_for(check.purchase_id), request=request
    )


def _restore_refusal(check: FailedRefundCheck, decision: FailedRefundDecision) -> str | None:
    request = decision.restore_request
    if request is None:
        return "restore_access needs the restore's request"
    if check.saga_workflow_id is None or request.saga_workflow_id != check.saga_workflow_id:
        return f"the restore must be of the saga that made the refund ({check.saga_workflow_id})"
    if request.operator != decision.operator:
        return "the restore must be asked for by the deciding operator"
    if check.archived_progress == 0:
        return f"{check.saga_workflow_id} archived no progress that is left to restore"
    return start_refusal(
        check.policy, workflow_id=restore_id_for(check.saga_workflow_id), request=request
    )
