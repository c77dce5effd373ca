"""Batch refunds from a client: start one, follow it, list them, and plan one as a dry run."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from temporalio.client import Client, WorkflowExecution, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError

from console.operations.errors import OperationError
from console.operations.executions import StatusSource, read_status, start_execution, wait_status
from console.operations.sagas import list_sagas
from console.operations.signatures import signed
from refundsaga import search_attributes as sa
from refundsaga.approval import policy_from_settings
from refundsaga.batch import plan_batch, summarize
from refundsaga.contracts import BatchPlan, BatchRefundInput, BatchState, BatchStatus
from refundsaga.ids import batch_id_for
from refundsaga.processor import ProcessorClient, ProcessorError
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from workflows.batch_refund import BatchRefund

BATCH = StatusSource("batch", BatchStatus, BatchRefund.progress, query_noun="progress")
_POLL_S = 1.0


async def start_batch(
    client: Client, settings: Settings, inp: BatchRefundInput
) -> WorkflowHandle[BatchRefund, BatchStatus]:
    """Start a batch, refused when one is already running for the same product or list."""
    workflow_id = batch_id_for(product_id=inp.product_id, purchase_ids=inp.purchase_ids or ())
    inp = signed(settings, workflow_id, inp)
    what = (
        f"product {inp.product_id}"
        if inp.product_id is not None
        else f"{len(inp.purchase_ids or [])} listed purchase(s)"
    )
    attributes = TypedSearchAttributes(
        [
            SearchAttributePair(sa.REFUND_STATE, BatchState.PLANNING.value),
            SearchAttributePair(sa.WAITING_FOR, "none"),
            SearchAttributePair(sa.REQUESTED_BY, inp.requested_by),
        ]
    )
    handle: WorkflowHandle[BatchRefund, BatchStatus] = await start_execution(
        client,
        BatchRefund.run,
        inp,
        workflow_id=workflow_id,
        task_queue=settings.task_queue,
        already_running=f"a batch for {what} is already running: {workflow_id}; see "
        f"`refund batch status {workflow_id}`",
        search_attributes=attributes,
        static_summary=f"Batch refund of {what}",
        static_details=f"Requested by **{inp.requested_by}**: refund every purchase of {what}.",
    )
    return handle


async def batch_status(client: Client, batch_id: str) -> BatchStatus:
    """The batch's progress: from its result when it has completed, else from the query."""
    return await read_status(client, batch_id, BATCH)


async def wait_batch(
    client: Client,
    batch_id: str,
    *,
    timeout_s: float,
    on_poll: Callable[[BatchStatus], None] = lambda _: None,
) -> BatchStatus:
    """Poll the batch until it has ended, or time runs out."""
    return await wait_status(
        client,
        batch_id,
        BATCH,
        lambda status: status.state.is_end,
        timeout_s=timeout_s,
        poll_s=_POLL_S,
        on_poll=on_poll,
    )


async def wait_batch_planned(client: Client, batch_id: str, *, timeout_s: float) -> BatchStatus:
    """The batch once it has planned (or ended); after `timeout_s`, the batch as it is then."""
    return await wait_status(
        client,
        batch_id,
        BATCH,
        lambda status: status.state != BatchState.PLANNING,
        timeout_s=timeout_s,
        raise_on_timeout=False,
    )


async def list_batches(client: Client, *, limit: int) -> list[WorkflowExecution]:
    """Batches, newest first."""
    return await list_sagas(client, 'WorkflowType="BatchRefund"', limit=limit)


async def running_saga_ids(client: Client, purchase_ids: Sequence[int]) -> dict[int, str]:
    """The purchases among these that a saga is refunding now (from the list of sagas)."""
    wanted = set(purchase_ids)
    running: dict[int, str] = {}
    query = 'WorkflowType="RefundSaga" AND ExecutionStatus="Running"'
    try:
        async for execution in client.list_workflows(query):
            raw = execution.typed_search_attributes.get(sa.PURCHASE_ID)
            if raw and raw.isdigit() and int(raw) in wanted:
                running[int(raw)] = execution.id
    except RPCError as err:
        raise OperationError(f"cannot list the running sagas: {err.message}") from err
    return running


async def dry_run_batch(
    client: Client | None,
    settings: Settings,
    store: OasisStore,
    *,
    product_id: int | None = None,
    purchase_ids: Sequence[int] | None = None,
    window: int | None = None,
    rate_per_s: float | None = None,
) -> BatchPlan:
    """Exactly what a batch would do, per purchase and in total; changes nothing.

    Plans with this machine's settings (the batch itself plans on a worker, with its own);
    with a client, purchases a saga is refunding now are shown as skipped.
    """
    async with ProcessorClient(
        settings.processor_url,
        settings.processor_api_key,
        timeout_s=settings.processor_timeout_s,
        api_version=settings.processor_api_version,
    ) as processor:
        try:
            plan = await plan_batch(
                store,
                processor,
                product_id=product_id,
                purchase_ids=purchase_ids,
                policy=policy_from_settings(settings),
                window=window or settings.batch_window,
                rate_per_s=rate_per_s or settings.batch_rate_per_s,
            )
        except ProcessorError as err:
            raise OperationError(f"the processor did not answer: {err.message}") from err
    if client is None:
        return plan
    running = await running_saga_ids(client, [i.purchase_id for i in plan.items if i.included])
    if not running:
        return plan
    items = [
        i.model_copy(
            update={
                "skip_reason": f"a refund saga is already running: {running[i.purchase_id]}",
                "amount_cents": 0,
            }
        )
        if i.purchase_id in running
        else i
        for i in plan.items
    ]
    summary = summarize(
        items,
        policy=plan.summary.policy,
        window=plan.summary.window,
        rate_per_s=plan.summary.rate_per_s,
    )
    return BatchPlan(summary=summary, items=items)
