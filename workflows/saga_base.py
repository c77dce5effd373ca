"""What every part of the RefundSaga shares: its retry policies, how it ends early, its fields,
and how it shows where it is (status, search attributes, current details, timeline, notes).

Workflow code. The saga's steps are in workflows/refund_saga.py; this module and the other
saga_* modules hold what the steps lean on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate

from workflows.approvals import ApprovalHandlers
from workflows.failures import error_text
from workflows.notify import send_notification
from workflows.waiting import ignored_malformed

with workflow.unsafe.imports_passed_through():
    from activities.refund_activities import (
        INVALID_REQUEST,
        PURCHASE_CLAIMED,
        REFUND_FAILED,
        REFUND_REFUSED,
        REFUND_REQUIRES_ACTION,
        REQUEST_REPLAYED,
        # The processor replays a final answer under the refund's key: send under a new one.
        REQUEST_SPENT,
    )
    from refundsaga.contracts import (
        END_STATES,
        AmsConfirmation,
        BatchBucket,
        DecisionReceipt,
        Notification,
        NotificationKind,
        RefundPlan,
        RefundRequest,
        Resolution,
        SagaState,
        SagaStatus,
        TimelineEntry,
        WaitingFor,
        describe_plan,
        processor_task_queue,
    )
    from refundsaga.processor_events import describe_reconciliation
    from refundsaga.search_attributes import (
        PURCHASE_ID,
        REFUND_AMOUNT_CENTS,
        REFUND_STATE,
        REQUESTED_BY,
        WAITING_FOR,
    )

# Errors the activities raise that no retry can fix (ApplicationError types).
ALREADY_REFUNDED = "ChargeAlreadyRefunded"
BUSINESS_ERRORS = [
    INVALID_REQUEST,
    ALREADY_REFUNDED,
    REFUND_REQUIRES_ACTION,
    REQUEST_SPENT,
    PURCHASE_CLAIMED,
    REQUEST_REPLAYED,
    REFUND_REFUSED,
    "AmountTooLarge",
    "ChargeNotFound",
    "ProcessorRejected",
    "ProcessorAuthError",
    "IdempotencyConflict",
    "AmsMemberNotFound",
    "AmsRejected",
    "AmsAuthError",
    "PurchaseNotFound",
    REFUND_FAILED,
]

STORE_TIMEOUT = timedelta(seconds=30)
# An external call the worker died in is retried after this; the clients time out sooner.
HTTP_TIMEOUT = timedelta(seconds=20)
# Transient faults are retried with backoff; after this many attempts a person looks (ops can
# retry from NEEDS_ATTENTION as often as they like).
STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=8,
    non_retryable_error_types=BUSINESS_ERRORS,
)

# Search attributes are upserted where ops filter: on entering or leaving these, at the pivot,
# and at the end. Each upsert is a history event and a visibility write, so the steps after the
# pivot (revoke, de-entitle, verify) show as REFUNDING in lists until the end, and exactly in
# `refund status`, the status query and the current details.
AT_REST = frozenset(
    {SagaState.AWAITING_APPROVAL, SagaState.AWAITING_AMS_CONFIRMATION, SagaState.NEEDS_ATTENTION}
)
LISTED = AT_REST | END_STATES | {SagaState.PREPARING, SagaState.REFUNDING}


class SagaAborted(Exception):
    """Ops chose `abort` for a saga in NEEDS_ATTENTION."""


class CannotContinue(Exception):
    """A step failed in a way no retry fixes and the saga must end FAILED, nothing changed."""


class SagaBase(ApprovalHandlers):
    """The saga's fields (set in RefundSaga.__init__) and how it shows where it is."""

    APPROVAL_SUBJECT = "saga"

    _request: RefundRequest
    # The refund request's identity for its whole life (RefundSaga.__init__).
    _request_id: str
    _status: SagaStatus
    _plan: RefundPlan | None
    _rejected_by: str | None
    # Set once the pivot has sent (or may have sent) the refund: any later call looks first.
    _refund_sent: bool
    # The refund call is running; processor events meanwhile wait in _early_events.
    _refund_in_flight: bool
    _early_events: list[str]
    # A processor event for the pending refund the saga follows came and is not read yet.
    _refund_event: bool
    _attention_step: str | None
    _ams_confirmation: AmsConfirmation | None
    _resolution: Resolution | None
    _cancel_requested: bool
    # Where the parent batch counts this saga (saga_batch.BatchChild).
    _batch_bucket: BatchBucket
    _batch_reports: asyncio.Task[None] | None
    # What list filters see: the RefundState last upserted, or set at the start.
    _listed_state: SagaState | None

    def _report_to_batch(self, *, final: bool = False) -> None:
        """Tell the parent batch where this saga is (saga_batch.BatchChild)."""
        raise NotImplementedError

    def _processor_queue(self) -> str:
        """Where the processor calls run: the rate-limited queue beside the saga's own."""
        return processor_task_queue(workflow.info().task_queue)

    def _store_step(self, activity: Callable[..., Any], arg: Any, *, summary: str) -> Any:
        """A store-only step: short, idempotent, no external call, so a local activity.

        It runs in the worker that holds the workflow, saving the three activity events and a
        workflow task round trip of a regular activity.
        """
        return workflow.execute_local_activity_method(
            activity,
            arg,
            start_to_close_timeout=STORE_TIMEOUT,
            retry_policy=STEP_RETRY,
            summary=summary,
        )

    # --- status, search attributes, notes -------------------------------------------------------

    def _receipt(self, message: str) -> DecisionReceipt:
        return DecisionReceipt(
            state=self._status.state,
            approvals=sum(1 for a in self._status.approvals if a.approve),
            required_approvals=self._status.required_approvals,
            message=message,
        )

    def _set_state(self, state: SagaState, waiting_for: WaitingFor | None = None) -> None:
        self._status.state = state
        if waiting_for != self._status.waiting_for:
            self._status.waiting_since = workflow.now() if waiting_for else None
        self._status.waiting_for = waiting_for
        if self._lists_must_learn(state):
            self._upsert_search_attributes()
        workflow.set_current_details(self._details_markdown())
        self._report_to_batch()

    def _lists_must_learn(self, state: SagaState) -> bool:
        """Whether this transition goes to the search attributes.

        Lists learn the states ops filter on (start, rest, pivot, end) and the step a saga
        resumes after a rest; the steps after the pivot keep the listed state until the end.
        """
        listed = self._listed_state
        if state in LISTED or listed is None or listed in AT_REST:
            return state != listed
        return False

    def _upsert_search_attributes(self) -> None:
        updates: list[SearchAttributeUpdate[Any]] = [
            REFUND_STATE.value_set(self._status.state.value),
            WAITING_FOR.value_set(
                self._status.waiting_for.value if self._status.waiting_for else "none"
            ),
            PURCHASE_ID.value_set(str(self._request.purchase_id)),
            REQUESTED_BY.value_set(self._request.requested_by),
        ]
        if self._status.amount_cents is not None:
            updates.append(REFUND_AMOUNT_CENTS.value_set(self._status.amount_cents))
        workflow.upsert_search_attributes(updates)
        self._listed_state = self._status.state

    def _details_markdown(self) -> str:
        s = self._status
        lines = [f"**State:** {s.state.value}"]
        if s.reconcile:
            lines.append(f"**Reconciliation:** {describe_reconciliation(s.reconcile)}")
        if s.waiting_for:
            lines.append(
                f"**Waiting for:** {s.waiting_for.value} since {s.waiting_since:%Y-%m-%d %H:%M} UTC"
            )
        if s.plan:
            lines.append(f"**Plan:** {describe_plan(s.plan)}")
        if s.refund.pending_refund_id:
            lines.append(
                f"**Pending refund:** {s.refund.pending_refund_id}, read {s.refund.reads} "
                "time(s); read again on a processor event"
                + (
                    f" or at {s.refund.next_read_at:%Y-%m-%d %H:%M} UTC"
                    if s.refund.next_read_at
                    else ""
                )
            )
        if s.approvals:
            lines.append(
                "**Decisions:** "
                + ", ".join(
                    f"{a.approver} ({'approve' if a.approve else 'reject'})" for a in s.approvals
                )
            )
        if s.error:
            lines.append(f"**Error:** {s.error}")
        return "\n\n".join(lines)

    def _mark(self, step: str, outcome: str, actor: str = "saga") -> None:
        self._status.timeline.append(
            TimelineEntry(at=workflow.now(), step=step, actor=actor, outcome=outcome)
        )

    def _ignored_malformed(self, kind: str, message: object, model: type) -> bool:
        return ignored_malformed(kind, message, model, self._ignore)

    async def _notify(self, kind: NotificationKind, text: str) -> None:
        err = await send_notification(
            Notification(
                kind=kind,
                workflow_id=workflow.info().workflow_id,
                purchase_id=self._request.purchase_id,
                text=text,
                state=self._status.state,
            )
        )
        if err is not None:
            self._mark("notify", f"{kind} not delivered: {error_text(err)}")
            workflow.logger.warning("notification %s not delivered: %s", kind, error_text(err))
