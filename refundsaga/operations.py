"""What support, approvers and ops do to sagas, as functions: the CLI, `starter.py` and the
demo all go through here. Each failure is a `Refused` (exit 2: the caller's input or the saga's
state) or an `OperationError` (exit 1: something else), with a one-line message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from refundsaga import search_attributes as sa
from refundsaga.contracts import (
    AmsConfirmation,
    ApprovalDecision,
    DecisionReceipt,
    RefundRequest,
    Resolution,
    SagaState,
    SagaStatus,
)
from refundsaga.settings import Settings
from workflows.refund_saga import RefundSaga


class Refused(Exception):
    """The request was refused: bad input, or the saga is not in a state to take it (exit 2)."""


class OperationError(Exception):
    """Anything else that went wrong (exit 1)."""


def workflow_id_for(purchase_id: int) -> str:
    """One saga per purchase at a time: the workflow id is derived from the purchase."""
    return f"refund-{purchase_id}"


def resolve_workflow_id(ref: str) -> str:
    """Accept a workflow id (`refund-42`) or a bare purchase id (`42`)."""
    ref = ref.strip()
    if ref.isdigit():
        return workflow_id_for(int(ref))
    if not ref:
        raise Refused("give a workflow id (refund-42) or a purchase id (42)")
    return ref


async def start_refund(
    client: Client, settings: Settings, request: RefundRequest
) -> WorkflowHandle[RefundSaga, SagaStatus]:
    """Start a saga for the purchase, refused when one is already running for it."""
    workflow_id = workflow_id_for(request.purchase_id)
    pairs: list[SearchAttributePair[Any]] = [
        SearchAttributePair(sa.REFUND_STATE, SagaState.PREPARING.value),
        SearchAttributePair(sa.WAITING_FOR, "none"),
        SearchAttributePair(sa.PURCHASE_ID, str(request.purchase_id)),
        SearchAttributePair(sa.REQUESTED_BY, request.requested_by),
    ]
    if request.amount_cents is not None:
        pairs.append(SearchAttributePair(sa.REFUND_AMOUNT_CENTS, request.amount_cents))
    attributes = TypedSearchAttributes(pairs)
    amount = "the unrefunded rest" if request.amount_cents is None else f"{request.amount_cents}"
    try:
        return await client.start_workflow(
            RefundSaga.run,
            request,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=attributes,
            static_summary=f"Refund purchase {request.purchase_id}: {amount} cents",
            static_details=(
                f"Requested by **{request.requested_by}** for purchase "
                f"**{request.purchase_id}**, amount: {amount}."
            ),
        )
    except WorkflowAlreadyStartedError as err:
        raise Refused(
            f"a refund saga for purchase {request.purchase_id} is already running: "
            f"{workflow_id}; see `refund status {workflow_id}`"
        ) from err
    except RPCError as err:
        raise OperationError(f"Temporal refused to start {workflow_id}: {err.message}") from err


async def describe(client: Client, workflow_id: str) -> WorkflowExecutionDescription:
    """The saga's execution, refused when there is none with that id."""
    try:
        return await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise Refused(
                f"no refund saga {workflow_id}; `refund list` shows the sagas there are"
            ) from err
        raise OperationError(f"cannot describe {workflow_id}: {err.message}") from err


async def get_status(client: Client, workflow_id: str) -> SagaStatus:
    """The saga's status: from its result when it has completed, else from the query."""
    description = await describe(client, workflow_id)
    handle = client.get_workflow_handle_for(RefundSaga.run, workflow_id)
    if description.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED:
        return await handle.result()
    try:
        return await handle.query(RefundSaga.status)
    except RPCError as err:
        raise OperationError(
            f"{workflow_id} did not answer its status query ({err.message}); "
            "is a worker running? `refund stack status`"
        ) from err


async def wait_for_state(
    client: Client,
    workflow_id: str,
    states: set[SagaState],
    *,
    timeout_s: float,
    on_poll: Callable[[SagaStatus], None] = lambda _: None,
) -> SagaStatus:
    """Poll the status until the saga is in one of `states` (or ended), or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await get_status(client, workflow_id)
        on_poll(status)
        if status.state in states:
            return status
        if status.state.is_end:
            raise Refused(
                f"{workflow_id} ended {status.state.value}"
                + (f": {status.error}" if status.error else "")
                + f"; it will never be {'/'.join(sorted(s.value for s in states))}"
            )
        if time.monotonic() >= deadline:
            raise OperationError(
                f"{workflow_id} is still {status.state.value} after {timeout_s:g} s"
            )
        await asyncio.sleep(0.5)


async def _update(client: Client, workflow_id: str, update: Any, message: Any) -> DecisionReceipt:
    await describe(client, workflow_id)
    handle = client.get_workflow_handle_for(RefundSaga.run, workflow_id)
    try:
        receipt: DecisionReceipt = await handle.execute_update(update, message)
        return receipt
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        text = getattr(cause, "message", None) or str(cause or err)
        raise Refused(f"{workflow_id} refused: {text}") from err
    except RPCError as err:
        if "workflow execution already completed" in err.message.lower() or (
            err.status == RPCStatusCode.NOT_FOUND
        ):
            raise Refused(f"{workflow_id} has already ended; nothing to decide") from err
        raise OperationError(f"{workflow_id}: {err.message}") from err


async def decide(client: Client, workflow_id: str, decision: ApprovalDecision) -> DecisionReceipt:
    """Approve or reject through the saga's validating update."""
    return await _update(client, workflow_id, RefundSaga.decide, decision)


async def confirm_ams(
    client: Client, workflow_id: str, confirmation: AmsConfirmation
) -> DecisionReceipt:
    """Confirm a manual AMS removal."""
    return await _update(client, workflow_id, RefundSaga.confirm_ams, confirmation)


async def resolve(client: Client, workflow_id: str, resolution: Resolution) -> DecisionReceipt:
    """Retry, skip or abort the step a saga in NEEDS_ATTENTION is stuck on."""
    return await _update(client, workflow_id, RefundSaga.resolve_attention, resolution)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def list_query(
    *,
    state: SagaState | None = None,
    waiting_for: str | None = None,
    requested_by: str | None = None,
    purchase_id: int | None = None,
    since: datetime | None = None,
) -> str:
    """A Temporal list filter over the saga's search attributes."""
    clauses = ['WorkflowType="RefundSaga"']
    if state:
        clauses.append(f"{sa.REFUND_STATE.name}={_quote(state.value)}")
    if waiting_for:
        clauses.append(f"{sa.WAITING_FOR.name}={_quote(waiting_for)}")
    if requested_by:
        clauses.append(f"{sa.REQUESTED_BY.name}={_quote(requested_by)}")
    if purchase_id is not None:
        clauses.append(f"{sa.PURCHASE_ID.name}={_quote(str(purchase_id))}")
    if since:
        clauses.append(f"StartTime>={_quote(since.isoformat())}")
    return " AND ".join(clauses)


async def list_sagas(client: Client, query: str, *, limit: int) -> list[WorkflowExecution]:
    """Sagas matching the filter, newest first."""
    found: list[WorkflowExecution] = []
    try:
        async for execution in client.list_workflows(query, limit=limit):
            found.append(execution)
    except RPCError as err:
        raise Refused(f"the list filter was refused: {err.message}") from err
    found.sort(key=lambda e: e.start_time, reverse=True)
    return found
