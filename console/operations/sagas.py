"""Refund sagas from a client: start one, read and wait for its status, decide, confirm and
resolve through its validating updates, and list sagas by their search attributes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowHandle,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from console.operations.errors import OperationError, Refused
from console.operations.executions import (
    StatusSource,
    describe_execution,
    read_status,
    send_update,
    wait_status,
)
from console.operations.signatures import signed as _signed
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
from refundsaga.ids import workflow_id_for
from refundsaga.settings import Settings
from workflows.refund_saga import RefundSaga

# The saga's update that answers once its plan is made (or refused): `refund start` sends it
# with the start, so the plan comes back in one call.
PLANNED_UPDATE = "planned"

SAGA = StatusSource(
    "refund saga",
    SagaStatus,
    RefundSaga.status,
    not_found_hint="; `refund list` shows the sagas there are",
    worker_hint="is a worker running? `refund stack status`",
)


def resolve_workflow_id(ref: str) -> str:
    """Accept a workflow id (`refund-42`) or a bare purchase id (`42`)."""
    ref = ref.strip()
    if ref.isdigit():
        return workflow_id_for(int(ref))
    if not ref:
        raise Refused("give a workflow id (refund-42) or a purchase id (42)")
    return ref


def _start_options(
    settings: Settings, request: RefundRequest
) -> tuple[RefundRequest, dict[str, Any]]:
    """The signed request and how `refund start` starts its saga: one saga per purchase."""
    if request.batch_approval is not None:
        raise Refused("a batch approval is given by `refund batch`, not by a single start")
    workflow_id = workflow_id_for(request.purchase_id)
    request = _signed(settings, workflow_id, request)
    amount = (
        "the unrefunded rest" if request.amount_cents is None else f"{request.amount_cents} cents"
    )
    return request, {
        "id": workflow_id,
        "task_queue": settings.task_queue,
        "id_reuse_policy": WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        "id_conflict_policy": WorkflowIDConflictPolicy.FAIL,
        "search_attributes": sa.at_start(request),
        "static_summary": f"Refund purchase {request.purchase_id}: {amount}",
        "static_details": (
            f"Requested by **{request.requested_by}** for purchase "
            f"**{request.purchase_id}**, amount: {amount}."
        ),
    }


def _already_running(request: RefundRequest, workflow_id: str) -> Refused:
    return Refused(
        f"a refund saga for purchase {request.purchase_id} is already running: "
        f"{workflow_id}; see `refund status {workflow_id}`"
    )


async def start_refund(
    client: Client, settings: Settings, request: RefundRequest
) -> WorkflowHandle[RefundSaga, SagaStatus]:
    """Start a saga for the purchase, refused when one is already running for it."""
    request, options = _start_options(settings, request)
    try:
        return await client.start_workflow(RefundSaga.run, request, **options)
    except WorkflowAlreadyStartedError as err:
        raise _already_running(request, options["id"]) from err
    except RPCError as err:
        raise OperationError(f"Temporal refused to start {options['id']}: {err.message}") from err


async def start_refund_planned(
    client: Client, settings: Settings, request: RefundRequest, *, timeout_s: float = 60
) -> SagaStatus | None:
    """Start a saga and get its plan back in the same call (update-with-start of `planned`).

    Returns:
        The saga's status once it has left its prepare step, or None when that took longer
        than `timeout_s` (the saga is started and keeps preparing).
    """
    request, options = _start_options(settings, request)
    start = WithStartWorkflowOperation(RefundSaga.run, request, **options)
    try:
        return await client.execute_update_with_start_workflow(
            PLANNED_UPDATE,
            start_workflow_operation=start,
            result_type=SagaStatus,
            rpc_timeout=timedelta(seconds=timeout_s),
        )
    except WorkflowAlreadyStartedError as err:
        raise _already_running(request, options["id"]) from err
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        return None
    except RPCError as err:
        if err.status == RPCStatusCode.ALREADY_EXISTS:
            raise _already_running(request, options["id"]) from err
        raise OperationError(f"Temporal refused to start {options['id']}: {err.message}") from err


async def describe(client: Client, workflow_id: str) -> WorkflowExecutionDescription:
    """The saga's execution, refused when there is none with that id."""
    return await describe_execution(client, workflow_id, SAGA)


async def get_status(client: Client, workflow_id: str) -> SagaStatus:
    """The saga's status: from its result when it has completed, else from the query."""
    return await read_status(client, workflow_id, SAGA)


async def wait_for_state(
    client: Client,
    workflow_id: str,
    states: set[SagaState],
    *,
    timeout_s: float,
    on_poll: Callable[[SagaStatus], None] = lambda _: None,
) -> SagaStatus:
    """Poll the status until the saga is in one of `states` (or ended), or time runs out."""

    def arrived(status: SagaStatus) -> bool:
        if status.state in states:
            return True
        if status.state.is_end:
            raise Refused(
                f"{workflow_id} ended {status.state.value}"
                + (f": {status.error}" if status.error else "")
                + f"; it will never be {'/'.join(sorted(s.value for s in states))}"
            )
        return False

    return await wait_status(
        client, workflow_id, SAGA, arrived, timeout_s=timeout_s, on_poll=on_poll
    )


async def _update(
    client: Client, workflow_id: str, update: object, message: object
) -> DecisionReceipt:
    await describe(client, workflow_id)
    return await send_update(client, workflow_id, update, message)


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
    source: str | None = None,
    with_tasks: bool = False,
) -> str:
    """A Temporal list filter over the saga's search attributes.

    `source`: `support` (started by a person: no `RefundSource`), `webhook` or `sweep` (a
    reconciliation started by a processor event or by the reconciliation sweep).
    `with_tasks`: the ops tasks of refunds failed after completion too (FailedRefundTask).
    """
    clauses = [
        'WorkflowType IN ("RefundSaga", "FailedRefundTask")'
        if with_tasks
        else 'WorkflowType="RefundSaga"'
    ]
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
    if source == sa.SOURCE_SUPPORT:
        clauses.append(f"{sa.REFUND_SOURCE.name} IS NULL")
    elif source:
        clauses.append(f"{sa.REFUND_SOURCE.name}={_quote(source)}")
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
