"""The naive saga: the RefundSaga's standard refund as the Temporal samples would write it.

The bench's peer for the saga (issue 22). It does the same real work: the product's own
activities (`RefundActivities`), so the same store calls and the same HTTP calls to the
processor and the AMS, with the processor calls on a rate-limited queue of their own. What
differs is only how it is orchestrated, as a team following the samples would:

- every step is a regular activity (no local activities);
- the worker runs it in the SDK's default sandboxed runner;
- it upserts its state as a search attribute at every step;
- callers learn the outcome by polling the `status` query (`poll_until_ended`), not by
  waiting on the result.

It covers the auto-approved happy path only: a refund that needs an approval fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.client import WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.refund_activities import RefundActivities
    from refundsaga.contracts import (
        AmsRemovalInput,
        CloseInput,
        DeactivateInput,
        PrepareInput,
        ProcessorRefundInput,
        RecordRefundsInput,
        RefundRequest,
        RevokeInput,
        SagaState,
        VerifyInput,
        processor_task_queue,
    )
    from refundsaga.models import LedgerEntry
    from refundsaga.search_attributes import REFUND_STATE

NAIVE_WORKFLOW = "BenchNaiveSaga"
STATUS_QUERY = "status"
ENDED = frozenset({SagaState.COMPLETED.value, SagaState.FAILED.value})
# How often a polling caller asks.
POLL_S = 0.5
STEP_TIMEOUT = timedelta(seconds=30)
# As many attempts as the saga's steps get before a person looks.
RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=8)


def naive_queue(baseline_queue: str) -> str:
    """Where the bench worker runs the naive saga (its processor calls go on this queue's
    `processor_task_queue`)."""
    return f"{baseline_queue}-naive"


@workflow.defn(name=NAIVE_WORKFLOW)
class NaiveSaga:
    """Prepare, refund, record, revoke, de-entitle, verify, close: seven activities."""

    def __init__(self) -> None:
        self._state = SagaState.PREPARING.value

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> str:
        """The step the saga is at, or how it ended."""
        return self._state

    def _step(self, state: str) -> None:
        self._state = state
        workflow.upsert_search_attributes([REFUND_STATE.value_set(state)])

    async def _run_step(self, activity: Callable[..., Any], arg: Any, **options: Any) -> Any:
        return await workflow.execute_activity_method(
            activity, arg, start_to_close_timeout=STEP_TIMEOUT, retry_policy=RETRY, **options
        )

    @workflow.run
    async def run(self, request: RefundRequest) -> str:
        try:
            await self._refund(request)
        except Exception:
            # The pollers see the end.
            self._state = SagaState.FAILED.value
            raise
        self._state = SagaState.COMPLETED.value
        return self._state

    async def _refund(self, request: RefundRequest) -> None:
        info = workflow.info()
        workflow_id = info.workflow_id
        request_id = f"{workflow_id}/{info.first_execution_run_id}"
        processor = processor_task_queue(info.task_queue)

        self._step("PREPARING")
        plan = await self._run_step(
            RefundActivities.prepare_refund,
            PrepareInput(request=request, workflow_id=workflow_id, request_id=request_id),
            task_queue=processor,
        )
        if plan.required_approvals or plan.already_refunded:
            raise ApplicationError("the naive saga runs auto-approved refunds only")

        self._step("REFUNDING")
        refund = await self._run_step(
            RefundActivities.refund_at_processor,
            ProcessorRefundInput(
                workflow_id=workflow_id,
                purchase_id=plan.purchase_id,
                charge_id=plan.charge_id,
                amount_cents=plan.amount_cents,
                currency=plan.currency,
                idempotency_key=f"{request_id}/refund",
                request_id=request_id,
            ),
            task_queue=processor,
        )

        self._step("RECORDING")
        entry = LedgerEntry(
            processor_refund_id=refund.refund_id,
            amount_cents=refund.amount_cents,
            currency=refund.currency,
            source="processor",
            status="succeeded",
        )
        await self._run_step(
            RefundActivities.record_refunds,
            RecordRefundsInput(
                workflow_id=workflow_id, purchase_id=plan.purchase_id, entries=[entry]
            ),
        )

        self._step("REVOKING")
        deleted = 0
        if plan.revoke_progress:
            revoked = await self._run_step(
                RefundActivities.revoke_progress,
                RevokeInput(
                    workflow_id=workflow_id,
                    purchase_id=plan.purchase_id,
                    user_id=plan.user_id,
                    product_id=plan.product_id,
                ),
            )
            deleted = revoked.deleted

        self._step("DEENTITLING")
        ams = "not_needed"
        if plan.remove_entitlement and plan.ams_action == "remove_via_api" and plan.ams_member_id:
            removal = await self._run_step(
                RefundActivities.remove_ams_entitlement,
                AmsRemovalInput(
                    workflow_id=workflow_id,
                    member_id=plan.ams_member_id,
                    product_code=plan.product_code,
                    idempotency_key=f"{workflow_id}/{info.run_id}/deentitle",
                ),
            )
            ams = "removed" if removal.removed else "already_absent"
        elif plan.remove_entitlement and plan.ams_action == "deactivate_purchase":
            await self._run_step(
                RefundActivities.deactivate_purchase,
                DeactivateInput(workflow_id=workflow_id, purchase_id=plan.purchase_id),
            )
            ams = "removed"

        self._step("VERIFYING")
        decision = await self._run_step(
            RefundActivities.verify_access,
            VerifyInput(
                user_id=plan.user_id,
                product_id=plan.product_id,
                entitlement_source=plan.entitlement_source,
                ams_member_id=plan.ams_member_id,
                product_code=plan.product_code,
            ),
        )
        if plan.revoke_progress and plan.remove_entitlement and decision.has_access:
            raise ApplicationError("user still has access via: " + ", ".join(decision.reasons))

        self._step("CLOSING")
        await self._run_step(
            RefundActivities.close_saga,
            CloseInput(
                workflow_id=workflow_id,
                purchase_id=request.purchase_id,
                state=SagaState.COMPLETED,
                request_id=request_id,
                revoked=plan.revoke_progress,
                detail={
                    "branch": "refund",
                    "error": None,
                    "refund_cents": refund.amount_cents,
                    "progress_deleted": deleted,
                    "ams": ams,
                    "cancel_requested": False,
                },
            ),
        )


async def poll_until_ended(handle: WorkflowHandle[Any, Any], polls: list[int]) -> str:
    """Ask the naive saga's state every `POLL_S` until it has ended; count the queries."""
    while True:
        await asyncio.sleep(POLL_S)
        state: str = await handle.query(STATUS_QUERY, result_type=str)
        polls[0] += 1
        if state in ENDED:
            return state
