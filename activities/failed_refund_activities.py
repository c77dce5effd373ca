"""Activities of the FailedRefundTask: check a reported failure and put the ledger right, and
write the task's end into the audit trail.

The report carries no authority (anyone with Temporal access can start a task): the check
reads the refund at the processor and the ledger in the store, and refuses what they do not
confirm before anything changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.refund_activities import RefundActivities
from refundsaga.contracts import REFUND_REQUEST_METADATA, ApprovalPolicy, SagaStatus
from refundsaga.failed_refunds import (
    FailedRefundCheck,
    FailedRefundCheckInput,
    FailedRefundCloseInput,
)
from refundsaga.processor import ProcessorClient, ProcessorRejected
from refundsaga.search_attributes import REQUESTED_BY
from refundsaga.store import OasisStore
from refundsaga.store.late_failures import (
    TASK_ENDED_EVENT,
    LateFailureRefused,
    record_late_failure,
)

# The report does not hold: nothing was changed, no retry will change that.
REPORT_REFUSED = "FailedRefundReportRefused"


def _refused(message: str) -> ApplicationError:
    return ApplicationError(message, type=REPORT_REFUSED, non_retryable=True)


class FailedRefundActivities:
    """The task's activities, bound to the worker's store, processor, policy and Temporal."""

    def __init__(
        self,
        *,
        store: OasisStore,
        processor: ProcessorClient,
        policy: ApprovalPolicy,
        temporal: Client,
    ) -> None:
        self._store = store
        self._processor = processor
        self._policy = policy
        self._temporal = temporal

    @classmethod
    def alongside(cls, saga: RefundActivities, temporal: Client) -> FailedRefundActivities:
        """Share the saga activities' clients and policy (one pool, one policy per worker)."""
        return cls(
            store=saga._store, processor=saga._processor, policy=saga._policy, temporal=temporal
        )

    @activity.defn
    async def check_failed_refund(self, inp: FailedRefundCheckInput) -> FailedRefundCheck:
        """Confirm the failure at the processor, then record it in the ledger (once).

        Raises:
            ApplicationError: `FailedRefundReportRefused` when the processor or the store does
                not confirm the report. Anything else (an outage, a wrong API key) is retried:
                the report is not lost to it.
        """
        claim = inp.failed
        try:
            refund = await self._processor.get_refund(claim.refund_id)
        except ProcessorRejected as err:
            raise _refused(f"the processor does not confirm refund {claim.refund_id}") from err
        if refund.status != "failed":
            raise _refused(f"the processor reports refund {refund.id} {refund.status}, not failed")
        if refund.charge_id != claim.charge_id:
            raise _refused(f"refund {refund.id} is not of charge {claim.charge_id}")
        if (refund.amount_cents, refund.currency) != (claim.amount_cents, claim.currency):
            raise _refused(
                f"refund {refund.id} is {refund.amount_cents} {refund.currency} at the processor, "
                f"not {claim.amount_cents} {claim.currency}"
            )
        try:
            late = await asyncio.to_thread(
                lambda: record_late_failure(
                    self._store,
                    purchase_id=claim.purchase_id,
                    charge_id=refund.charge_id,
                    refund_id=refund.id,
                    amount_cents=refund.amount_cents,
                    currency=refund.currency,
                    recorded_by=inp.task_workflow_id,
                    detail={
                        "source": claim.source,
                        "event_id": claim.event_id,
                        "failure_reason": refund.failure_reason,
                    },
                )
            )
        except LateFailureRefused as err:
            raise _refused(str(err)) from err
        requester = await self._requester(refund.metadata.get(REFUND_REQUEST_METADATA))
        return FailedRefundCheck(
            refund_id=refund.id,
            charge_id=refund.charge_id,
            purchase_id=late.purchase_id,
            user_id=late.user_id,
            product_id=late.product_id,
            amount_cents=late.amount_cents,
            currency=late.currency,
            failure_reason=refund.failure_reason,
            saga_workflow_id=late.saga_workflow_id,
            saga_state=late.saga_state,
            saga_requested_by=requester,
            archived_progress=late.archived_progress,
            refunded_cents=late.refunded_cents,
            purchase_status=late.purchase_status,
            newly_recorded=late.newly_recorded,
            policy=self._policy,
        )

    async def _requester(self, request_id: str | None) -> str | None:
        """Who asked for the saga that made the refund, as Temporal recorded it, or None.

        The refund's metadata names the saga's request (`<workflow id>/<first run id>`, written
        by the saga itself); Temporal's record of that run, not the report, says who asked.
        """
        if not request_id or "/" not in request_id:
            return None
        workflow_id, run_id = request_id.rsplit("/", 1)
        handle = self._temporal.get_workflow_handle(
            workflow_id, run_id=run_id, result_type=SagaStatus
        )
        try:
            description = await handle.describe()
            listed = description.typed_search_attributes.get(REQUESTED_BY)
            if listed:
                return listed
            if description.status == WorkflowExecutionStatus.COMPLETED:
                return (await handle.result()).requested_by
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None  # past the namespace's retention: not known
            raise
        return None

    @activity.defn
    async def close_failed_refund_task(self, inp: FailedRefundCloseInput) -> bool:
        """The task's decision and end into the audit trail, once per run."""
        decisions: list[tuple[str, str, dict[str, Any]]] = []
        if inp.decision is not None:
            d = inp.decision
            decisions.append(
                (
                    f"failed_refund_{d.choice}",
                    d.operator,
                    {
                        "at": d.at.isoformat(),
                        "choice": d.choice,
                        "note": d.note,
                        "signed": d.signed,
                        "refund_id": inp.refund_id,
                        "started_workflow_id": d.started_workflow_id,
                        "started_run_id": d.started_run_id,
                    }
                    | ({"signature": d.signature} if d.signature else {}),
                )
            )
        return await asyncio.to_thread(
            lambda: self._store.record_workflow_end(
                workflow_id=inp.task_workflow_id,
                run_key=inp.run_id,
                event=TASK_ENDED_EVENT,
                purchase_id=inp.purchase_id,
                decisions=decisions,
                detail={
                    "state": inp.state.value,
                    "refund_id": inp.refund_id,
                    **inp.detail,
                },
            )
        )

    def processor_calls(self) -> list[Callable[..., Any]]:
        """The activities that call the processor (the rate-limited queue)."""
        return [self.check_failed_refund]

    def others(self) -> list[Callable[..., Any]]:
        """The activities on the task's own task queue."""
        return [self.close_failed_refund_task]
