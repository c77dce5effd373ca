"""FailedRefundTask: the ops task for a refund the processor failed after its saga completed.

Orchestration only. The task checks the report at the processor and puts the ledger right
(the failed refund no longer counts), tells ops, and waits for one decision by an operator:
a new refund attempt (a RefundSaga for the failed amount), restoring the progress the saga
revoked (a RestoreProgress), or closing with a note. Either workflow is started as an
abandoned child and goes its own way, with its own approval; the task ends with the decision.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import (
    RetryPolicy,
    SearchAttributePair,
    SearchAttributeUpdate,
    TypedSearchAttributes,
)
from temporalio.exceptions import ActivityError, ApplicationError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

from workflows.refund_saga import RefundSaga
from workflows.restore_progress import RestoreProgress
from workflows.waiting import malformed

with workflow.unsafe.imports_passed_through():
    from activities.failed_refund_activities import REPORT_REFUSED, FailedRefundActivities
    from activities.refund_activities import RefundActivities
    from refundsaga import search_attributes as sa
    from refundsaga.contracts import (
        IgnoredMessage,
        Notification,
        TimelineEntry,
        WaitingFor,
        format_money,
        processor_task_queue,
    )
    from refundsaga.failed_refund_policy import decision_refusal
    from refundsaga.failed_refunds import (
        DECIDE_UPDATE,
        RESTORE_LEAVES_ENTITLEMENT,
        STATUS_QUERY,
        WORKFLOW_NAME,
        FailedRefundCheck,
        FailedRefundCheckInput,
        FailedRefundCloseInput,
        FailedRefundDecision,
        FailedRefundDecisionRecord,
        FailedRefundReceipt,
        FailedRefundState,
        FailedRefundStatus,
    )
    from refundsaga.ids import failed_refund_id_for, restore_id_for, workflow_id_for
    from refundsaga.processor_events import FailedRefund

HTTP_TIMEOUT = timedelta(seconds=20)
STORE_TIMEOUT = timedelta(seconds=30)
# The check is retried through any outage: the task's id is taken for good once it ends, so a
# report must not be lost to a processor or database that is away for a while.
CHECK_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(minutes=10),
    non_retryable_error_types=[REPORT_REFUSED],
)
CLOSE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1)
)
NOTIFY_RETRY = RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=30))
# An update that lost the race to another decision, or whose workflow cannot start.
DECISION_REFUSED = "FailedRefundDecisionRefused"


def _error(err: BaseException) -> tuple[str | None, str]:
    """The type and the innermost message of an activity failure."""
    cause: BaseException | None = err
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return cause.type, cause.message
    return None, str(cause)


@workflow.defn(name=WORKFLOW_NAME)
class FailedRefundTask:
    """One failed refund: checked, recorded, and one decision by ops."""

    @workflow.init
    def __init__(self, failed: FailedRefund) -> None:
        self._failed = failed
        self._status = FailedRefundStatus(
            workflow_id=workflow.info().workflow_id,
            state=FailedRefundState.CHECKING,
            refund_id=failed.refund_id,
            purchase_id=failed.purchase_id,
            amount_cents=failed.amount_cents,
            currency=failed.currency,
            source=failed.source,
        )
        self._check: FailedRefundCheck | None = None
        # Set while an accepted decision starts its workflow: a second one is refused.
        self._deciding = False

    @workflow.run
    async def run(self, failed: FailedRefund) -> FailedRefundStatus:
        expected_id = failed_refund_id_for(failed.refund_id)
        if workflow.info().workflow_id != expected_id:
            # One task per failed refund: the id says which, so no second task can open.
            self._status.error = f"a failed refund's task runs as {expected_id}; nothing changed"
            return await self._end(FailedRefundState.REFUSED)
        try:
            check = await workflow.execute_activity_method(
                FailedRefundActivities.check_failed_refund,
                FailedRefundCheckInput(task_workflow_id=workflow.info().workflow_id, failed=failed),
                task_queue=processor_task_queue(workflow.info().task_queue),
                start_to_close_timeout=HTTP_TIMEOUT,
                retry_policy=CHECK_RETRY,
                summary=f"check refund {failed.refund_id} at the processor and the ledger",
            )
        except ActivityError as err:
            kind, message = _error(err)
            if kind != REPORT_REFUSED:
                raise
            self._status.error = f"{message}; nothing was changed"
            self._mark("check", f"refused: {message}")
            return await self._end(FailedRefundState.REFUSED)
        self._check = check
        self._status.check = check
        self._mark(
            "check",
            f"refund {check.refund_id} failed at the processor; the ledger counts "
            f"{format_money(check.refunded_cents, check.currency)} refunded, purchase "
            f"{check.purchase_status}",
        )
        self._set_state(FailedRefundState.OPEN, WaitingFor.OPS)
        await self._notify(check)
        try:
            await workflow.wait_condition(lambda: self._status.decision is not None)
        except asyncio.CancelledError:
            self._status.error = "cancelled in Temporal before ops decided"
            await self._end(FailedRefundState.CLOSED)
            raise
        return await self._end(FailedRefundState.CLOSED)

    # --- the decision ---------------------------------------------------------------------

    @workflow.update(name=DECIDE_UPDATE)
    async def decide_failed_refund(self, decision: FailedRefundDecision) -> FailedRefundReceipt:
        """Retry the refund, restore the progress, or close with a note; ends the task."""
        if self._deciding or self._status.decision is not None:
            # Two decisions validated in one workflow task: the first one counts.
            raise ApplicationError("another decision was taken first", type=DECISION_REFUSED)
        self._deciding = True
        try:
            started = await self._carry_out(decision)
        except ApplicationError as err:
            self._ignore(decision.operator, err.message)
            raise
        finally:
            self._deciding = False
        workflow_id, run_id = started or (None, None)
        self._status.decision = FailedRefundDecisionRecord(
            choice=decision.choice,
            operator=decision.operator,
            at=workflow.now(),
            note=decision.note,
            signed=decision.signature is not None,
            signature=decision.signature,
            started_workflow_id=workflow_id,
            started_run_id=run_id,
        )
        self._mark(
            "decide",
            f"chose {decision.choice}"
            + (f", started {workflow_id}" if workflow_id else "")
            + (f": {decision.note}" if decision.note else ""),
            decision.operator,
        )
        return FailedRefundReceipt(
            state=FailedRefundState.CLOSED,
            choice=decision.choice,
            started_workflow_id=workflow_id,
            message=f"{decision.choice} accepted"
            + (f": {workflow_id} started" if workflow_id else ""),
        )

    @decide_failed_refund.validator
    def _validate_decide(self, decision: FailedRefundDecision) -> None:
        reason = malformed(decision, FailedRefundDecision) or self._decision_refusal(decision)
        if reason:
            raise ValueError(reason)

    def _decision_refusal(self, decision: FailedRefundDecision) -> str | None:
        check = self._check
        if self._status.state != FailedRefundState.OPEN or check is None:
            return f"the task is {self._status.state.value}, not waiting for a decision"
        if self._deciding or self._status.decision is not None:
            return "another decision is being carried out"
        info = workflow.info()
        return decision_refusal(check, decision, workflow_id=info.workflow_id, run_id=info.run_id)

    async def _carry_out(self, decision: FailedRefundDecision) -> tuple[str, str | None] | None:
        """Start what the choice starts; the workflow id and first run, or None for close."""
        check = self._check
        assert check is not None
        if decision.choice == "retry":
            request = decision.refund_request
            assert request is not None
            saga_id = workflow_id_for(check.purchase_id)
            amount = format_money(check.amount_cents, check.currency)
            try:
                saga = await workflow.start_child_workflow(
                    RefundSaga.run,
                    request,
                    id=saga_id,
                    parent_close_policy=ParentClosePolicy.ABANDON,
                    search_attributes=sa.at_start(request),
                    static_summary=f"Refund purchase {check.purchase_id} again: {amount}",
                    static_details=(
                        f"Asked by **{request.requested_by}** after refund {check.refund_id} "
                        f"failed at the processor ({self._status.workflow_id})."
                    ),
                )
            except WorkflowAlreadyStartedError as err:
                raise ApplicationError(
                    f"a refund saga for purchase {check.purchase_id} is already running "
                    f"({saga_id}): decide again once it has ended",
                    type=DECISION_REFUSED,
                ) from err
            return saga.id, saga.first_execution_run_id
        if decision.choice == "restore_access":
            restore_request = decision.restore_request
            assert restore_request is not None and check.saga_workflow_id is not None
            restore_id = restore_id_for(check.saga_workflow_id)
            try:
                restore = await workflow.start_child_workflow(
                    RestoreProgress.run,
                    restore_request,
                    id=restore_id,
                    parent_close_policy=ParentClosePolicy.ABANDON,
                    search_attributes=TypedSearchAttributes(
                        [SearchAttributePair(sa.REQUESTED_BY, restore_request.operator)]
                    ),
                    static_summary=f"Restore the progress revoked by {check.saga_workflow_id}",
                )
            except WorkflowAlreadyStartedError as err:
                raise ApplicationError(
                    f"a restore of {check.saga_workflow_id} is already running ({restore_id})",
                    type=DECISION_REFUSED,
                ) from err
            return restore.id, restore.first_execution_run_id
        return None

    # --- the end, status, lists ---------------------------------------------------------------

    async def _end(self, state: FailedRefundState) -> FailedRefundStatus:
        self._set_state(state)
        check = self._check
        decision = self._status.decision
        await workflow.execute_activity_method(
            FailedRefundActivities.close_failed_refund_task,
            FailedRefundCloseInput(
                task_workflow_id=workflow.info().workflow_id,
                run_id=workflow.info().run_id,
                state=state,
                refund_id=self._failed.refund_id,
                # A refused report names nobody's purchase in the trail: it was not confirmed.
                purchase_id=check.purchase_id if check else None,
                decision=decision,
                detail={
                    "source": self._failed.source,
                    "event_id": self._failed.event_id,
                    "saga_workflow_id": check.saga_workflow_id if check else None,
                    "error": self._status.error,
                },
            ),
            start_to_close_timeout=STORE_TIMEOUT,
            retry_policy=CLOSE_RETRY,
            summary=f"close the task as {state.value}",
        )
        self._mark("end", state.value + (f": {self._status.error}" if self._status.error else ""))
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._status

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> FailedRefundStatus:
        """Where the task is, what the check found, and what ops decided."""
        return self._status

    def _set_state(self, state: FailedRefundState, waiting_for: WaitingFor | None = None) -> None:
        if waiting_for != self._status.waiting_for:
            self._status.waiting_since = workflow.now() if waiting_for else None
        self._status.state = state
        self._status.waiting_for = waiting_for
        updates: list[SearchAttributeUpdate[Any]] = [
            sa.REFUND_STATE.value_set(state.value),
            sa.WAITING_FOR.value_set(waiting_for.value if waiting_for else "none"),
        ]
        check = self._check
        if check is not None:
            # Only a confirmed report names a purchase in lists.
            updates += [
                sa.PURCHASE_ID.value_set(str(check.purchase_id)),
                sa.REFUND_AMOUNT_CENTS.value_set(check.amount_cents),
            ]
        workflow.upsert_search_attributes(updates)
        workflow.set_current_details(self._details_markdown())

    def _details_markdown(self) -> str:
        s = self._status
        lines = [f"**State:** {s.state.value}"]
        check = s.check
        if check is not None:
            amount = format_money(check.amount_cents, check.currency)
            lines.append(
                f"**Refund:** {check.refund_id} of {amount} on purchase {check.purchase_id} "
                f"failed at the processor"
                + (f" ({check.failure_reason})" if check.failure_reason else "")
                + f" after {check.saga_workflow_id or 'its saga'} "
                + (f"ended {check.saga_state}" if check.saga_state else "ran")
                + ": the money did not go back."
            )
            lines.append(
                f"**Ledger:** {format_money(check.refunded_cents, check.currency)} refunded; "
                f"purchase {check.purchase_status}"
            )
        if s.state == FailedRefundState.OPEN and check is not None:
            lines.append(
                "**Choices:** `retry`: a new refund of the failed amount, progress and "
                "entitlement left as they are; `restore_access`: "
                f"{RESTORE_LEAVES_ENTITLEMENT}; `close`: with a note"
            )
        if s.decision is not None:
            d = s.decision
            lines.append(
                f"**Decision:** {d.operator} chose {d.choice}"
                + (" (signed)" if d.signed else "")
                + (f", started {d.started_workflow_id}" if d.started_workflow_id else "")
            )
        if s.error:
            lines.append(f"**Error:** {s.error}")
        return "\n\n".join(lines)

    def _mark(self, step: str, outcome: str, actor: str = "task") -> None:
        self._status.timeline.append(
            TimelineEntry(at=workflow.now(), step=step, actor=actor, outcome=outcome)
        )

    def _ignore(self, by: str, reason: str) -> None:
        self._status.ignored.append(
            IgnoredMessage(kind=DECIDE_UPDATE, by=by, at=workflow.now(), reason=reason)
        )
        workflow.logger.info("refused %s: %s", DECIDE_UPDATE, reason)

    async def _notify(self, check: FailedRefundCheck) -> None:
        amount = format_money(check.amount_cents, check.currency)
        try:
            await workflow.execute_activity_method(
                RefundActivities.notify,
                Notification(
                    kind="refund_failed",
                    workflow_id=workflow.info().workflow_id,
                    purchase_id=check.purchase_id,
                    text=(
                        f"refund {check.refund_id} of {amount} failed at the processor after "
                        f"{check.saga_workflow_id or 'its saga'} ended: the customer has "
                        "neither the money nor access; decide with `refund failed`"
                    ),
                ),
                start_to_close_timeout=HTTP_TIMEOUT,
                retry_policy=NOTIFY_RETRY,
                summary="notify: refund_failed",
            )
        except ActivityError as err:
            # The task stays open and listed: a lost notification does not lose the task.
            self._mark("notify", f"refund_failed not delivered: {_error(err)[1]}")
