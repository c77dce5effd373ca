"""What ops do with failed refunds' tasks, as functions for the CLI (`refund failed ...`): list
the open ones, show one, decide one. Failures are `Refused` (exit 2) or `OperationError` (1)."""

from __future__ import annotations

from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from console.operations import OperationError, Refused, signing_key
from refundsaga import search_attributes as sa
from refundsaga.contracts import RefundRequest, RestoreRequest
from refundsaga.failed_refunds import (
    DECIDE_UPDATE,
    WORKFLOW_NAME,
    FailedRefundCheck,
    FailedRefundChoice,
    FailedRefundDecision,
    FailedRefundReceipt,
    FailedRefundState,
    FailedRefundStatus,
    task_summary,
)
from refundsaga.ids import failed_refund_id_for, restore_id_for, workflow_id_for
from refundsaga.processor_events import FailedRefund
from refundsaga.settings import Settings
from refundsaga.signing import sign_failed_refund_decision, sign_request
from workflows.failed_refund import FailedRefundTask

OPEN_QUERY = (
    f'WorkflowType="{WORKFLOW_NAME}" AND {sa.REFUND_STATE.name}="{FailedRefundState.OPEN.value}"'
)


def task_id_for(ref: str) -> str:
    """Accept a task's workflow id (`refund-failed-re_...`) or the failed refund's id."""
    ref = ref.strip()
    if ref.startswith("re_"):
        return failed_refund_id_for(ref)
    if not ref:
        raise Refused("give a task id (refund-failed-re_...) or a refund id (re_...)")
    return ref


async def start(
    client: Client, settings: Settings, failed: FailedRefund
) -> WorkflowHandle[FailedRefundTask, FailedRefundStatus]:
    """Open the task for a reported failure, or find the one running: one task per failed
    refund, however many times it is reported (webhook retries, the sweep).

    A new run of an ended task's id is allowed: the store, not the id's history, keeps a
    failure to one task (a run after the decision is refused), so a forged report refused
    before the refund failed cannot block the real one.
    """
    workflow_id = failed_refund_id_for(failed.refund_id)
    try:
        return await client.start_workflow(
            FailedRefundTask.run,
            failed,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=task_summary(failed),
        )
    except RPCError as err:
        raise OperationError(f"Temporal refused to start {workflow_id}: {err.message}") from err


async def list_open(client: Client, *, limit: int = 100) -> list[WorkflowExecution]:
    """Tasks waiting for a decision, newest first."""
    found: list[WorkflowExecution] = []
    try:
        async for execution in client.list_workflows(OPEN_QUERY, limit=limit):
            found.append(execution)
    except RPCError as err:
        raise OperationError(f"cannot list the failed refunds' tasks: {err.message}") from err
    found.sort(key=lambda e: e.start_time, reverse=True)
    return found


async def status(client: Client, task_id: str) -> FailedRefundStatus:
    """The task's status: from its result once it has ended, else from its query."""
    task_id = task_id_for(task_id)
    handle = client.get_workflow_handle(task_id, result_type=FailedRefundStatus)
    try:
        description = await handle.describe()
        if description.status == WorkflowExecutionStatus.COMPLETED:
            return await handle.result()
        return await handle.query(FailedRefundTask.status)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise Refused(f"no failed refund's task {task_id}") from err
        raise OperationError(
            f"{task_id} did not answer its status query ({err.message}); is a worker running?"
        ) from err


async def decide(
    client: Client,
    settings: Settings,
    task_id: str,
    choice: FailedRefundChoice,
    by: str,
    note: str = "",
) -> FailedRefundReceipt:
    """Send `by`'s decision to the task's current run, signed with REFUND_SIGNING_KEY_FILE
    when it is set, with the request the choice starts built (and signed) here.

    Raises:
        Refused: The task is not open, the decision does not hold (the task says why), or a
            saga is running for the purchase already (`retry`).
    """
    task_id = task_id_for(task_id)
    handle = client.get_workflow_handle(task_id)
    try:
        run_id = (await handle.describe()).run_id
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise Refused(f"no failed refund's task {task_id}") from err
        raise OperationError(f"cannot describe {task_id}: {err.message}") from err
    current = await status(client, task_id)
    check = current.check
    if current.state != FailedRefundState.OPEN or check is None:
        raise Refused(f"{task_id} is {current.state.value}, not waiting for a decision")
    key = signing_key(settings)
    try:
        decision = FailedRefundDecision(
            choice=choice,
            operator=by,
            note=note,
            refund_request=await _retry_request(client, check, by, note, settings)
            if choice == "retry"
            else None,
            restore_request=_restore_request(check, by, note, settings)
            if choice == "restore_access"
            else None,
        )
    except ValueError as err:  # pydantic's ValidationError: the note, the operator's name
        raise Refused(f"the decision was refused: {err}") from err
    if key is not None:
        decision = decision.model_copy(
            update={"signature": sign_failed_refund_decision(key, task_id, decision, run_id=run_id)}
        )
    run = client.get_workflow_handle(task_id, run_id=run_id)
    for attempt in (1, 2):
        try:
            return await run.execute_update(
                DECIDE_UPDATE, decision, result_type=FailedRefundReceipt
            )
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            text = getattr(cause, "message", None) or str(cause or err)
            raise Refused(f"{task_id} refused: {text}") from err
        except RPCError as err:
            gone = (
                err.status == RPCStatusCode.NOT_FOUND or "already completed" in err.message.lower()
            )
            if not gone:
                raise OperationError(f"cannot decide {task_id}: {err.message}") from err
            # An update in flight when its workflow task failed is lost, not refused: send it
            # again while the run is still open (the task refuses a second decision).
            still_open = (await run.describe()).status == WorkflowExecutionStatus.RUNNING
            if attempt == 2 or not still_open:
                raise Refused(f"{task_id} has already ended; nothing to decide") from err
    raise AssertionError("unreachable")


async def _retry_request(
    client: Client, check: FailedRefundCheck, by: str, note: str, settings: Settings
) -> RefundRequest:
    saga_id = workflow_id_for(check.purchase_id)
    try:
        running = (
            await client.get_workflow_handle(saga_id).describe()
        ).status == WorkflowExecutionStatus.RUNNING
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise OperationError(f"cannot describe {saga_id}: {err.message}") from err
        running = False
    if running:
        raise Refused(
            f"a refund saga for purchase {check.purchase_id} is already running ({saga_id}): "
            f"decide again once it has ended; see `refund status {saga_id}`"
        )
    request = RefundRequest(
        purchase_id=check.purchase_id,
        amount_cents=check.amount_cents,
        currency=check.currency,
        reason=note or f"new attempt after refund {check.refund_id} failed at the processor",
        requested_by=by,
        # The saga that made the failed refund took progress and entitlement already.
        revoke_progress=False,
        remove_entitlement=False,
    )
    key = signing_key(settings)
    return request if key is None else sign_request(key, saga_id, request)


def _restore_request(
    check: FailedRefundCheck, by: str, note: str, settings: Settings
) -> RestoreRequest:
    if check.saga_workflow_id is None:
        raise Refused(f"the ledger names no saga for refund {check.refund_id}: nothing to restore")
    request = RestoreRequest(
        saga_workflow_id=check.saga_workflow_id,
        operator=by,
        reason=note or f"access back after refund {check.refund_id} failed at the processor",
    )
    key = signing_key(settings)
    if key is None:
        return request
    return sign_request(key, restore_id_for(check.saga_workflow_id), request)
