"""The RefundSaga's pivot in detail: one refund at the processor for the saga's request,
whatever is retried, reset or resent, followed until it settles.

Workflow code.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

from workflows.failures import error_text, error_type
from workflows.saga_attention import NeedsAttention
from workflows.saga_base import (
    ALREADY_REFUNDED,
    BUSINESS_ERRORS,
    HTTP_TIMEOUT,
    STEP_RETRY,
    CannotContinue,
    SagaAborted,
)

with workflow.unsafe.imports_passed_through():
    from activities.refund_activities import REFUND_REFUSED, REQUEST_SPENT, RefundActivities
    from refundsaga.contracts import (
        ProcessorRefundInput,
        ProcessorRefundResult,
        RefundPlan,
        SettleInput,
    )

# How many new keys the pivot takes by itself, each after looking for the refund, before a
# person decides.
MAX_NEW_KEYS = 3
# A pending refund settles on the processor's schedule: poll with a slow backoff, for days.
SETTLE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    non_retryable_error_types=BUSINESS_ERRORS,
)
SETTLE_TIMEOUT = timedelta(days=7)


def refund_key(request_id: str, generation: int) -> str:
    """The pivot's idempotency key: the request and the step, never the run or the attempt.

    A new generation is taken only once the processor has proved the previous key's request
    finished (it replays a saved final answer), and always after looking for the refund.
    """
    return f"{request_id}/refund" + (f"/{generation}" if generation else "")


class Pivot(NeedsAttention):
    """The refund at the processor."""

    async def _pay(self, plan: RefundPlan) -> ProcessorRefundResult | None:
        """The pivot: one refund for this request, whatever is retried, reset or resent.

        Returns:
            The settled refund, or None when the processor says the charge has nothing left.
        """
        info = workflow.info()
        # A run after the first (a reset, a retried workflow) may repeat a refund an earlier
        # run sent, and so may any call after the first: those look at the processor first.
        look_first = self._refund_sent or info.run_id != info.first_execution_run_id
        generation = 0
        new_keys = 0
        while True:
            step = "refund"
            request = ProcessorRefundInput(
                workflow_id=info.workflow_id,
                purchase_id=plan.purchase_id,
                charge_id=plan.charge_id,
                amount_cents=plan.amount_cents,
                currency=plan.currency,
                idempotency_key=refund_key(self._request_id, generation),
                request_id=self._request_id,
                look_first=look_first,
            )
            self._refund_sent = True
            try:
                result: ProcessorRefundResult = await workflow.execute_activity_method(
                    RefundActivities.refund_at_processor,
                    request,
                    task_queue=self._processor_queue(),
                    start_to_close_timeout=HTTP_TIMEOUT,
                    retry_policy=STEP_RETRY,
                    # Wait for the outcome even when cancelled: money may be moving.
                    cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    summary=f"refund {plan.amount_cents} {plan.currency} of {plan.charge_id}",
                )
                if result.status == "pending":
                    step = "settle"
                    self._mark("refund", f"refund {result.refund_id} pending at the processor")
                    result = await workflow.execute_activity_method(
                        RefundActivities.await_refund_settled,
                        SettleInput(refund_id=result.refund_id),
                        task_queue=self._processor_queue(),
                        start_to_close_timeout=HTTP_TIMEOUT,
                        schedule_to_close_timeout=SETTLE_TIMEOUT,
                        retry_policy=SETTLE_RETRY,
                        summary=f"wait for refund {result.refund_id} to settle",
                    )
                return result
            except ActivityError as err:
                kind = error_type(err)
                if kind == ALREADY_REFUNDED:
                    return None
                if kind == REFUND_REFUSED:
                    raise CannotContinue(error_text(err)) from err
                look_first = True
                if kind == REQUEST_SPENT:
                    generation += 1
                    if new_keys < MAX_NEW_KEYS:
                        new_keys += 1
                        self._mark("refund", f"{error_text(err)}; looking, then a new key")
                        continue
                resolution = await self._needs_attention(step, error_text(err))
                if resolution.action == "abort":
                    raise SagaAborted from err
                new_keys = 0
