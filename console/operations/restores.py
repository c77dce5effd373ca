"""Restores of a mistaken revoke from a client: start one, read and wait for its status."""

from __future__ import annotations

from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from console.operations.executions import StatusSource, read_status, start_execution, wait_status
from console.operations.signatures import signed
from refundsaga import search_attributes as sa
from refundsaga.contracts import RestoreRequest, RestoreState, RestoreStatus
from refundsaga.ids import restore_id_for
from refundsaga.settings import Settings
from workflows.restore_progress import RestoreProgress

RESTORE = StatusSource("restore", RestoreStatus, RestoreProgress.restore_status)
RESTORE_ENDS = frozenset(
    {
        RestoreState.COMPLETED,
        RestoreState.REFUSED,
        RestoreState.REJECTED,
        RestoreState.EXPIRED,
        RestoreState.CANCELLED,
        RestoreState.FAILED,
    }
)


async def start_restore(
    client: Client, settings: Settings, request: RestoreRequest
) -> WorkflowHandle[RestoreProgress, RestoreStatus]:
    """Start a restore of a saga's archived progress; refused while one runs for it."""
    workflow_id = restore_id_for(request.saga_workflow_id)
    request = signed(settings, workflow_id, request)
    handle: WorkflowHandle[RestoreProgress, RestoreStatus] = await start_execution(
        client,
        RestoreProgress.run,
        request,
        workflow_id=workflow_id,
        task_queue=settings.task_queue,
        already_running=f"a restore of {request.saga_workflow_id} is already running: "
        f"{workflow_id}; see `refund restore-status {request.saga_workflow_id}`",
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(sa.REQUESTED_BY, request.operator)]
        ),
        static_summary=f"Restore the progress revoked by {request.saga_workflow_id}",
    )
    return handle


async def restore_status(client: Client, restore_id: str) -> RestoreStatus:
    """The restore's status: from its result when it has completed, else from the query."""
    return await read_status(client, restore_id, RESTORE)


async def wait_restore(
    client: Client,
    restore_id: str,
    states: set[RestoreState],
    *,
    timeout_s: float,
) -> RestoreStatus:
    """Poll the restore until it is in one of `states` (or ended), or time runs out."""
    return await wait_status(
        client,
        restore_id,
        RESTORE,
        lambda status: status.state in states or status.state in RESTORE_ENDS,
        timeout_s=timeout_s,
    )
