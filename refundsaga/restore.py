"""Restore of a mistaken revoke: when a saga's archived progress may be put back. Pure."""

from __future__ import annotations

from datetime import datetime

from refundsaga.contracts import RestoreCheck

RESTORE_APPROVALS = 1
"""A restore moves no money: one approver, never the operator who asked (four-eyes)."""


def expires_at(check: RestoreCheck) -> datetime | None:
    """When the snapshot can no longer be restored, or None when there is none."""
    if check.archived_at is None:
        return None
    return check.archived_at + check.retention


def restore_refusal(check: RestoreCheck, *, now: datetime) -> str | None:
    """Why this snapshot must not be restored now, or None when it may be (with approval)."""
    saga = check.saga_workflow_id
    if check.saga_state is None:
        return f"{saga} has not ended: only the progress of a completed saga can be restored"
    if check.saga_state != "COMPLETED":
        return f"{saga} ended {check.saga_state}: only a completed saga's revoke can be undone"
    if check.archived_at is None:
        if check.revoked:
            return (
                f"the progress snapshot of {saga} has expired and was purged: it can no "
                "longer be restored"
            )
        return f"{saga} archived no progress (it did not revoke any): nothing to restore"
    ends = expires_at(check)
    assert ends is not None
    if now >= ends:
        return (
            f"the progress snapshot of {saga} expired at {ends:%Y-%m-%d %H:%M} UTC "
            f"(retention {check.retention.days} days): it can no longer be restored"
        )
    if check.rows == 0:
        by = f" by {check.restored_by}" if check.restored_by else ""
        when = f" at {check.restored_at:%Y-%m-%d %H:%M} UTC" if check.restored_at else ""
        return f"the progress of {saga} was restored already{by}{when}"
    if check.conflicts:
        return (
            f"user {check.user_id} has new progress in {check.conflicts} of the {check.rows} "
            f"archived item(s) of product {check.product_id}: a restore would overwrite it"
        )
    return None
