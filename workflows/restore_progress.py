"""Undo a mistaken revoke: RestoreProgress puts a completed saga's archived progress back.

Orchestration only. The restore checks the snapshot (it must exist, belong to a completed
saga, be within the retention window and not collide with progress the user made since),
waits for one approver other than the operator, then restores in one store transaction that
checks all of it again. PurgeExpiredSnapshots, run daily by a Temporal schedule, deletes the
snapshots whose retention has run out.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

from workflows.approvals import ApprovalHandlers
from workflows.failures import innermost
from workflows.notify import send_notification
from workflows.waiting import wait_for_decision

with workflow.unsafe.imports_passed_through():
    from activities.batch_activities import RESTORE_REFUSED, BatchActivities
    from refundsaga.approval import start_refusal
    from refundsaga.contracts import (
        ApprovalDecision,
        ApprovalPolicy,
        Notification,
        NotificationKind,
        PurgeCutoff,
        PurgeInput,
        PurgeResult,
        RestoreCheck,
        RestoreCloseInput,
        RestoreInput,
        RestoreRequest,
        RestoreResult,
        RestoreState,
        RestoreStatus,
        TimelineEntry,
        WaitingFor,
    )
    from refundsaga.restore import RESTORE_APPROVALS, expires_at, restore_refusal

STORE_TIMEOUT = timedelta(seconds=30)
# Store outages are retried; a refusal (expired, conflicting, done) is not.
STORE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=10,
    non_retryable_error_types=[RESTORE_REFUSED],
)
# Bookkeeping at the end is retried until it succeeds.
CLOSE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1)
)
# A purge deletes in one statement; a long-unused archive may take a while.
PURGE_TIMEOUT = timedelta(minutes=10)


def _error(err: BaseException) -> tuple[str | None, str]:
    """The type and the innermost message of an activity failure."""
    cause = innermost(err)
    if isinstance(cause, ApplicationError):
        return cause.type, cause.message
    return None, str(cause)


@workflow.defn
class RestoreProgress(ApprovalHandlers):
    """Restore the progress snapshot of one completed saga, with approval, within retention."""

    APPROVAL_SUBJECT = "restore"
    APPROVAL_OBJECT = "the restore"
    _status: RestoreStatus

    @workflow.init
    def __init__(self, request: RestoreRequest) -> None:
        self._request = request
        self._status = RestoreStatus(
            workflow_id=workflow.info().workflow_id,
            state=RestoreState.CHECKING,
            saga_workflow_id=request.saga_workflow_id,
            operator=request.operator,
            reason=request.reason,
            required_approvals=RESTORE_APPROVALS,
        )
        self._rejected_by: str | None = None

    @workflow.run
    async def run(self, request: RestoreRequest) -> RestoreStatus:
        try:
            check: RestoreCheck = await workflow.execute_activity_method(
                BatchActivities.check_restore,
                request,
                start_to_close_timeout=STORE_TIMEOUT,
                retry_policy=STORE_RETRY,
                summary=f"check the progress snapshot of {request.saga_workflow_id}",
            )
            self._status.check = check
            self._status.expires_at = expires_at(check)
            # The operator the request names counts only from the allowlist (and, with signing
            # on, with their signature for this restore).
            refusal = restore_refusal(check, now=workflow.now()) or start_refusal(
                check.policy, workflow_id=workflow.info().workflow_id, request=request
            )
            if refusal:
                self._status.error = refusal
                return await self._end(RestoreState.REFUSED)
            self._mark(
                "check",
                f"{check.rows} progress record(s) of user {check.user_id} in product "
                f"{check.product_id} archived {check.archived_at:%Y-%m-%d %H:%M} UTC; "
                f"restorable until {self._status.expires_at:%Y-%m-%d %H:%M} UTC",
            )
            if not await self._approve(check):
                return await self._end(self._status.state)
        except asyncio.CancelledError:
            self._status.error = "cancelled before anything was restored; nothing changed"
            await self._end(RestoreState.CANCELLED)
            raise
        except ActivityError as err:
            self._status.error = f"the check failed: {_error(err)[1]}"
            return await self._end(RestoreState.FAILED)
        return await self._restore(check)

    async def _restore(self, check: RestoreCheck) -> RestoreStatus:
        assert check.archived_at is not None
        self._set_state(RestoreState.RESTORING)
        try:
            result: RestoreResult = await workflow.execute_activity_method(
                BatchActivities.restore_progress,
                RestoreInput(
                    restore_workflow_id=workflow.info().workflow_id,
                    saga_workflow_id=check.saga_workflow_id,
                    operator=self._request.operator,
                    archived_at=check.archived_at,
                    # The store checks the window again, in the restoring transaction.
                    not_before=workflow.now() - check.retention,
                    approvals=self._status.approvals,
                    reason=self._request.reason,
                ),
                start_to_close_timeout=STORE_TIMEOUT,
                retry_policy=STORE_RETRY,
                summary=f"restore {check.rows} progress record(s)",
            )
        except ActivityError as err:
            kind, message = _error(err)
            self._status.error = message
            state = RestoreState.REFUSED if kind == RESTORE_REFUSED else RestoreState.FAILED
            return await self._end(state)
        self._status.restored = result.restored
        self._mark("restore", f"{result.restored} progress record(s) restored")
        return await self._end(RestoreState.COMPLETED)

    # --- approval: one approver, not the operator ---------------------------------------------

    async def _approve(self, check: RestoreCheck) -> bool:
        policy = check.policy
        self._set_state(RestoreState.AWAITING_APPROVAL, WaitingFor.APPROVAL)
        await self._notify(
            "approval_requested",
            f"restore {check.rows} progress record(s) revoked by {check.saga_workflow_id}",
            check.purchase_id,
        )
        expiry = self._status.expires_at
        assert expiry is not None
        outcome = await wait_for_decision(
            self._decided,
            deadline=workflow.now() + policy.approval_timeout,
            reminder_every=policy.reminder_every,
            remind=lambda: self._notify(
                "approval_reminder", "the restore still waits for approval", check.purchase_id
            ),
            ends_at=expiry,
        )
        if outcome == "ended":
            self._status.error = (
                "the snapshot expired while waiting for approval: it can no longer be restored"
            )
            self._set_state(RestoreState.EXPIRED)
            return False
        if outcome == "deadline":
            self._status.error = f"no decision within {policy.approval_timeout}"
            self._set_state(RestoreState.EXPIRED)
            return False
        if self._rejected_by is not None:
            self._set_state(RestoreState.REJECTED)
            return False
        return True

    def _approval_policy(self) -> ApprovalPolicy | None:
        check = self._status.check
        waiting = self._status.state == RestoreState.AWAITING_APPROVAL
        return check.policy if waiting and check is not None else None

    def _requester(self) -> str:
        return self._request.operator

    def _decision_refusal(self, decision: ApprovalDecision) -> str | None:
        reason = super()._decision_refusal(decision)
        # The shared rules speak of a refund.
        return reason.replace("this refund", "this restore") if reason else None

    # --- the end, status ----------------------------------------------------------------------

    async def _end(self, state: RestoreState) -> RestoreStatus:
        self._set_state(state)
        check = self._status.check
        await workflow.execute_activity_method(
            BatchActivities.close_restore,
            RestoreCloseInput(
                restore_workflow_id=workflow.info().workflow_id,
                run_id=workflow.info().run_id,
                saga_workflow_id=self._request.saga_workflow_id,
                purchase_id=check.purchase_id if check else None,
                state=state,
                operator=self._request.operator,
                approvals=self._status.approvals,
                detail={
                    "reason": self._request.reason,
                    "restored": self._status.restored,
                    "error": self._status.error,
                },
            ),
            start_to_close_timeout=STORE_TIMEOUT,
            retry_policy=CLOSE_RETRY,
            summary=f"close the restore as {state.value}",
        )
        self._mark("end", state.value + (f": {self._status.error}" if self._status.error else ""))
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._status

    @workflow.query
    def restore_status(self) -> RestoreStatus:
        """Where the restore is, what it checked and who decided."""
        return self._status

    def _set_state(self, state: RestoreState, waiting_for: WaitingFor | None = None) -> None:
        if waiting_for != self._status.waiting_for:
            self._status.waiting_since = workflow.now() if waiting_for else None
        self._status.state = state
        self._status.waiting_for = waiting_for
        lines = [f"**State:** {state.value}", f"**Saga:** {self._request.saga_workflow_id}"]
        if self._status.error:
            lines.append(f"**Error:** {self._status.error}")
        workflow.set_current_details("\n\n".join(lines))

    def _mark(self, step: str, outcome: str, actor: str = "restore") -> None:
        self._status.timeline.append(
            TimelineEntry(at=workflow.now(), step=step, actor=actor, outcome=outcome)
        )

    async def _notify(self, kind: NotificationKind, text: str, purchase_id: int | None) -> None:
        err = await send_notification(
            Notification(
                kind=kind,
                workflow_id=workflow.info().workflow_id,
                purchase_id=purchase_id or 0,
                text=text,
            )
        )
        if err is not None:
            workflow.logger.warning("notification %s lost: %s", kind, _error(err)[1])


@workflow.defn
class PurgeExpiredSnapshots:
    """Delete archived progress whose restore window has passed (run by a schedule)."""

    @workflow.run
    async def run(self, inp: PurgeInput) -> PurgeResult:
        result: PurgeResult = await workflow.execute_activity_method(
            BatchActivities.purge_expired_snapshots,
            # The activity keeps the worker's retention as a floor: the input is not trusted.
            PurgeCutoff(cutoff=workflow.now() - inp.retention, as_of=workflow.now()),
            start_to_close_timeout=PURGE_TIMEOUT,
            retry_policy=CLOSE_RETRY,
            summary=f"purge progress snapshots older than {inp.retention}",
        )
        return result
