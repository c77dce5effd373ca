"""A RefundSaga started by a BatchRefund: it counts the batch's approval, checked as if given
to this saga, and tells the batch whenever it moves between the batch's buckets.

Workflow code.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow

from workflows.saga_base import SagaBase

with workflow.unsafe.imports_passed_through():
    from refundsaga.approval import refusal_reason, required_approvals
    from refundsaga.contracts import (
        BATCH_REPORT_SIGNAL,
        ApprovalDecision,
        ApprovalRecord,
        BatchChildReport,
        RefundPlan,
        batch_bucket,
    )


class BatchChild(SagaBase):
    """The batch's approval and the reports to the batch."""

    def _from_batch(self) -> bool:
        """Started as a child of the batch whose approval the request carries."""
        batch = self._request.batch_approval
        parent = workflow.info().parent
        return (
            batch is not None
            and parent is not None
            and parent.workflow_id == batch.batch_workflow_id
        )

    def _accept_batch_approval(self, plan: RefundPlan) -> bool:
        """Count the batch's approvals, unless the plan moves more than the batch approved
        (the purchase changed since): then this saga waits for its own approval."""
        batch = self._request.batch_approval
        assert batch is not None
        refusal = self._batch_approval_refusal(plan)
        if refusal:
            self._mark("approve", f"{refusal}: this refund needs its own approval", "policy")
            return False
        if plan.amount_cents > batch.max_amount_cents:
            self._mark(
                "approve",
                f"the plan moves {plan.amount_cents}, the batch approved "
                f"{batch.max_amount_cents}: this refund needs its own approval",
                "policy",
            )
            return False
        for record in batch.approvals:
            comment = f"batch {batch.batch_workflow_id}" + (
                f": {record.comment}" if record.comment else ""
            )
            self._status.approvals.append(record.model_copy(update={"comment": comment}))
        approvers = ", ".join(a.approver for a in batch.approvals if a.approve)
        self._mark(
            "approve",
            f"approved with batch {batch.batch_workflow_id}"
            + (f" by {approvers}" if approvers else " (auto-approved)"),
            "policy",
        )
        return True

    def _batch_approval_refusal(self, plan: RefundPlan) -> str | None:
        """Check the batch's approvals as if they were given to this saga: allowlisted, not
        the requester, one each, signed for the batch with signing on, enough for this refund.
        The parent is the batch (checked at the start), but the approvals are still data."""
        batch = self._request.batch_approval
        assert batch is not None
        counted: list[ApprovalRecord] = []
        for record in batch.approvals:
            if not record.approve:
                return f"the batch approval holds a rejection by {record.approver}"
            decision = ApprovalDecision(
                approver=record.approver, comment=record.comment, signature=record.signature
            )
            reason = refusal_reason(
                plan.policy,
                approver=record.approver,
                requested_by=self._request.requested_by,
                decisions=counted,
                decision=decision,
                workflow_id=batch.batch_workflow_id,
                run_id=batch.approval_run_id or "",
            )
            if reason:
                return f"the batch's approval does not hold ({reason})"
            counted.append(record)
        needed = required_approvals(
            plan.policy, plan.amount_cents, refunded_before_cents=plan.ledger_refunded_cents
        )
        if len(counted) < needed:
            return f"the batch holds {len(counted)} approval(s), this refund needs {needed}"
        return None

    def _report_to_batch(self, *, final: bool = False) -> None:
        """Tell the batch this saga moved between buckets; reports go out in order."""
        if not self._from_batch():
            return
        state = self._status.state
        if state.is_end and not final:
            return  # the end is reported once the saga has closed its books (_end)
        bucket = batch_bucket(state)
        if bucket == self._batch_bucket:
            return
        refund = self._status.refund
        report = BatchChildReport(
            purchase_id=self._request.purchase_id,
            workflow_id=workflow.info().workflow_id,
            previous=self._batch_bucket,
            current=bucket,
            state=state,
            refunded_cents=refund.amount_cents if refund.source == "processor" else 0,
            error=self._status.error,
        )
        self._batch_bucket = bucket
        self._batch_reports = asyncio.create_task(self._send_report(self._batch_reports, report))

    async def _send_report(
        self, after: asyncio.Task[None] | None, report: BatchChildReport
    ) -> None:
        if after is not None:
            await after
        parent = workflow.info().parent
        assert parent is not None
        try:
            # By workflow id only: the batch may have continued as new since it started us.
            await workflow.get_external_workflow_handle(parent.workflow_id).signal(
                BATCH_REPORT_SIGNAL, report
            )
        except Exception as err:
            # The batch may have ended (cancelled); the refund goes on regardless.
            workflow.logger.warning("batch %s not told: %s", parent.workflow_id, err)
