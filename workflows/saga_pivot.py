"""The RefundSaga's pivot in detail: one refund at the processor for the saga's request,
whatever is retried, reset or resent, followed until it settles.

A pending refund is read again when the processor reports a change (the `processor_event`
signal, from the webhook receiver) or, should that event be lost, on a slow fallback timer.

Workflow code.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

from workflows.failures import error_text, error_type
from workflows.saga_attention import NeedsAttention
from workflows.saga_base import (
    ALREADY_REFUNDED,
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
    from refundsaga.processor_events import PROCESSOR_EVENT_SIGNAL, ProcessorEvent

# How many new keys the pivot takes by itself, each after looking for the refund, before a
# person decides.
MAX_NEW_KEYS = 3
# A pending refund settles on the processor's schedule, and the processor says when. Without
# its event the saga reads the refund on a fallback timer that backs off to a few reads a day;
# still pending after 7 days, ops decide.
SETTLE_FIRST_READ = timedelta(minutes=10)
SETTLE_MAX_INTERVAL = timedelta(hours=6)
SETTLE_TIMEOUT = timedelta(days=7)
# Events kept while the refund's own answer is on the way (its id still unknown): any more are
# ignored, so that a flood of signals cannot grow the saga's state.
MAX_EARLY_EVENTS = 20


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
            try:
                result = await self._send(plan, request)
                if result.status == "pending":
                    step = "settle"
                    self._mark("refund", f"refund {result.refund_id} pending at the processor")
                    settled = await self._await_settled(result.refund_id)
                    if settled is None:
                        resolution = await self._needs_attention(
                            step,
                            f"refund {result.refund_id} still pending after "
                            f"{SETTLE_TIMEOUT.days} days",
                        )
                        if resolution.action == "abort":
                            raise SagaAborted
                        look_first = True
                        new_keys = 0
                        continue
                    result = settled
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

    async def _send(self, plan: RefundPlan, request: ProcessorRefundInput) -> ProcessorRefundResult:
        """The refund call; processor events arriving meanwhile are kept for its answer."""
        self._refund_sent = True
        self._refund_in_flight = True
        pending = False
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
            pending = result.status == "pending"
            return result
        finally:
            self._refund_in_flight = False
            if not pending:
                self._take_early_events(None)

    async def _await_settled(self, refund_id: str) -> ProcessorRefundResult | None:
        """Follow a pending refund: read it once whenever the processor reports a change or the
        fallback timer fires, until it is no longer pending.

        Returns:
            The settled refund (a failed one raises, as the refund call does), or None when it
            is still pending after SETTLE_TIMEOUT.
        """
        summary = self._status.refund
        summary.pending_refund_id = refund_id
        self._refund_event = self._take_early_events(refund_id)
        deadline = workflow.now() + SETTLE_TIMEOUT
        interval = SETTLE_FIRST_READ
        try:
            while workflow.now() < deadline:
                wait = min(interval, deadline - workflow.now())
                summary.next_read_at = workflow.now() + wait
                workflow.set_current_details(self._details_markdown())
                try:
                    await workflow.wait_condition(
                        lambda: self._refund_event,
                        timeout=wait,
                        timeout_summary=f"fallback read of refund {refund_id}",
                    )
                    why = "the processor reported a change"
                except TimeoutError:
                    interval = min(interval * 2, SETTLE_MAX_INTERVAL)
                    why = "fallback timer"
                # Cleared before the read: an event arriving during it brings another read.
                self._refund_event = False
                summary.next_read_at = None
                result: ProcessorRefundResult = await workflow.execute_activity_method(
                    RefundActivities.read_refund,
                    SettleInput(refund_id=refund_id),
                    task_queue=self._processor_queue(),
                    start_to_close_timeout=HTTP_TIMEOUT,
                    retry_policy=STEP_RETRY,
                    summary=f"read refund {refund_id} ({why})",
                )
                summary.reads += 1
                if result.status != "pending":
                    self._mark("settle", f"refund {refund_id} {result.status} ({why})")
                    return result
            return None
        finally:
            summary.pending_refund_id = None
            summary.next_read_at = None
            self._refund_event = False

    def _take_early_events(self, refund_id: str | None) -> bool:
        """Whether an event kept during the refund call was for `refund_id`; the others are
        recorded as ignored."""
        matched = False
        for early in self._early_events:
            if early == refund_id:
                matched = True
            else:
                self._ignore(
                    "processor_event",
                    "processor",
                    f"refund {early} is not the refund this saga follows",
                )
        self._early_events = []
        return matched

    @workflow.signal(name=PROCESSOR_EVENT_SIGNAL)
    def processor_event(self, event: ProcessorEvent) -> None:
        """The processor reported a change of a refund (webhook receiver or sweep). It carries
        no authority: the saga only reads the refund it follows at the processor again."""
        if self._ignored_malformed("processor_event", event, ProcessorEvent):
            return
        following = self._status.refund.pending_refund_id
        if following is not None:
            if event.refund_id == following:
                self._refund_event = True
            else:
                self._ignore(
                    "processor_event",
                    "processor",
                    f"refund {event.refund_id} is not the refund this saga follows ({following})",
                )
        elif self._refund_in_flight and len(self._early_events) < MAX_EARLY_EVENTS:
            # The refund call's answer, with the refund's id, may come after its event.
            self._early_events.append(event.refund_id)
        else:
            self._ignore(
                "processor_event",
                "processor",
                f"the saga follows no pending refund (it is {self._status.state.value})",
            )
