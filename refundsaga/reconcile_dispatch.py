"""Carry out what a processor event asks (`refundsaga.reconcile`), once per event.

Every action is safe to repeat: a signal only wakes a saga that then reads the processor, and
the workflows are started under ids that admit one per purchase or per refund. The inbox makes a
second delivery of an event do nothing at all.
"""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.service import RPCError, RPCStatusCode

from refundsaga import search_attributes as sa
from refundsaga.contracts import SagaState
from refundsaga.failed_refunds import FailedRefundState
from refundsaga.ids import failed_refund_id_for, reconcile_id_for
from refundsaga.processor_events import PROCESSOR_EVENT_SIGNAL, EventSource
from refundsaga.reconcile import (
    Action,
    LateFailure,
    ProcessorEventEnvelope,
    Reconcile,
    WakeSaga,
    classify,
    reconcile_request,
)
from refundsaga.settings import Settings
from refundsaga.store.inbox import ProcessorInbox

log = logging.getLogger(__name__)

# Workflow types started by name: the ground floor does not import the workflows.
SAGA_WORKFLOW = "RefundSaga"
FAILED_REFUND_WORKFLOW = "FailedRefundTask"

# Outcomes, as the inbox records and the log shows them.
DUPLICATE = "duplicate"
IGNORED = "ignored"
SIGNALLED = "signalled"
SAGA_ENDED = "saga_ended"
SAGA_NOT_COMPLETED = "saga_not_completed"
SAGA_NOT_FOUND = "saga_not_found"
# Started, or found open.
FAILED_TASK_STARTED = "failed_task_started"
FAILED_TASK_DECIDED = "failed_task_decided"
RECONCILE_STARTED = "reconcile_started"
UNKNOWN_CHARGE = "unknown_charge"
ALREADY_RECONCILED = "already_reconciled"


class ReconcileDispatcher:
    """Acts on processor events through Temporal and the store's inbox.

    Errors from Temporal or the store propagate: the caller answers so that the processor
    delivers the event again (a webhook's 5xx), and nothing is recorded for it until it worked.
    """

    def __init__(
        self,
        client: Client,
        inbox: ProcessorInbox,
        settings: Settings,
    ) -> None:
        """
        Args:
            client: A client with the project's data converter (`refundsaga.temporal.connect`).
            inbox: The store's processor-event inbox.
            settings: The task queue the sagas run on.
        """
        self._client = client
        self._inbox = inbox
        self._task_queue = settings.task_queue

    async def handle(self, event: ProcessorEventEnvelope, *, source: EventSource) -> str:
        """Act on an event once: a duplicate does nothing; the outcome is recorded after the
        action succeeded.

        Returns:
            The outcome (one of this module's outcome names).
        """
        if await asyncio.to_thread(self._inbox.seen, event.id):
            return DUPLICATE
        outcome = await self.dispatch(classify(event, source=source))
        await asyncio.to_thread(
            self._inbox.record, event.id, event_type=event.type, source=source, outcome=outcome
        )
        return outcome

    async def dispatch(self, action: Action) -> str:
        """Carry out one action (the sweep calls this for objects it listed).

        Returns:
            The outcome.
        """
        if isinstance(action, WakeSaga):
            return await self._wake(action)
        if isinstance(action, Reconcile):
            return await self._reconcile(action)
        log.debug("processor event ignored: %s", action.reason)
        return IGNORED

    # -- waking a saga ---------------------------------------------------------------------

    async def _wake(self, action: WakeSaga) -> str:
        # Twice: a saga that ends between describe and signal is then judged as ended.
        for _ in range(2):
            run = await self._saga_run(action)
            if run is None or run.status != WorkflowExecutionStatus.RUNNING:
                return await self._after_end(action, run)
            handle = self._client.get_workflow_handle(action.workflow_id, run_id=run.run_id)
            try:
                await handle.signal(PROCESSOR_EVENT_SIGNAL, action.event)
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
                continue
            return SIGNALLED
        return await self._after_end(action, await self._saga_run(action))

    async def _saga_run(self, action: WakeSaga) -> WorkflowExecutionDescription | None:
        """The latest run of the saga that made the refund, or None if Temporal has no record
        of it (retention). A later saga under the same workflow id is not it."""
        latest = await self._describe(action.workflow_id, None)
        if latest is None or action.first_run_id is None:
            return latest
        chain = latest.raw_description.workflow_execution_info.first_run_id
        if chain in ("", action.first_run_id):
            return latest
        return await self._describe(action.workflow_id, action.first_run_id)

    async def _describe(
        self, workflow_id: str, run_id: str | None
    ) -> WorkflowExecutionDescription | None:
        try:
            return await self._client.get_workflow_handle(workflow_id, run_id=run_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise

    async def _after_end(self, action: WakeSaga, run: WorkflowExecutionDescription | None) -> str:
        """A saga no longer running: a late failure of its refund opens an ops task if the
        saga completed, since the customer then lost access without the money."""
        if action.failure is None:
            return SAGA_ENDED if run is not None else SAGA_NOT_FOUND
        if run is None:
            # Its history is gone; the ledger says whether it recorded the money as returned.
            status = await asyncio.to_thread(self._inbox.ledger_status, action.event.refund_id)
            if status != "succeeded":
                return SAGA_NOT_FOUND
        elif not (
            run.status == WorkflowExecutionStatus.COMPLETED
            and run.typed_search_attributes.get(sa.REFUND_STATE) == SagaState.COMPLETED.value
        ):
            return SAGA_NOT_COMPLETED
        return await self._open_failed_task(action.workflow_id, action.failure)

    async def _open_failed_task(self, saga_workflow_id: str, failure: LateFailure) -> str:
        purchase_id = failure.purchase_id or await asyncio.to_thread(
            self._inbox.purchase_for_charge, failure.charge_id
        )
        if purchase_id is None:
            return UNKNOWN_CHARGE
        task_id = failed_refund_id_for(failure.refund_id)
        latest = await self._describe(task_id, None)
        if (
            latest is not None
            and latest.status != WorkflowExecutionStatus.RUNNING
            and latest.typed_search_attributes.get(sa.REFUND_STATE) == FailedRefundState.CLOSED
        ):
            # Ops decided it: a later report (a retried webhook, the sweep) has nothing to add,
            # and a refused run after it would hide the decision from `refund failed show`.
            return FAILED_TASK_DECIDED
        task = failure.task(purchase_id, saga_workflow_id)
        await self._client.start_workflow(
            FAILED_REFUND_WORKFLOW,
            task,
            id=task_id,
            task_queue=self._task_queue,
            # USE_EXISTING: one task per failed refund while it is open, however often the
            # failure is reported. A run after an ended one is allowed: the task itself refuses
            # a failure the store says was decided, so a report refused earlier cannot block
            # the real one.
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(sa.PURCHASE_ID, str(purchase_id)),
                    SearchAttributePair(sa.REFUND_SOURCE, failure.source),
                ]
            ),
            static_summary=(
                f"Refund {failure.refund_id} of purchase {purchase_id} failed after "
                "its saga completed"
            ),
        )
        return FAILED_TASK_STARTED

    # -- reconciling a purchase ------------------------------------------------------------

    async def _reconcile(self, action: Reconcile) -> str:
        purchase_id = await asyncio.to_thread(
            self._inbox.purchase_for_charge, action.charge_id, action.payment_intent_id
        )
        if purchase_id is None:
            return UNKNOWN_CHARGE  # not an OASIS sale
        object_id = action.reconciliation.processor_object_id
        if await asyncio.to_thread(self._inbox.ledger_holds, object_id):
            return ALREADY_RECONCILED
        request = reconcile_request(purchase_id, action.reconciliation)
        # USE_EXISTING: however many events report the same money back, one reconciliation
        # runs per purchase; ALLOW_DUPLICATE: a later one may follow a finished one (the ledger
        # check above stops it for what was reconciled).
        await self._client.start_workflow(
            SAGA_WORKFLOW,
            request,
            id=reconcile_id_for(purchase_id),
            task_queue=self._task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=sa.at_start(request),
            static_summary=f"Reconcile purchase {purchase_id}: {object_id}",
        )
        return RECONCILE_STARTED
