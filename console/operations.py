"""What support, approvers and ops do to sagas, as functions: the CLI, `starter.py` and the
demo all go through here. Each failure is a `Refused` (exit 2: the caller's input or the saga's
state) or an `OperationError` (exit 1: something else), with a one-line message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
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
from refundsaga.approval import policy_from_settings
from refundsaga.batch import plan_batch, summarize
from refundsaga.contracts import (
    AmsConfirmation,
    ApprovalDecision,
    BatchPlan,
    BatchRefundInput,
    BatchState,
    BatchStatus,
    DecisionReceipt,
    PurgeInput,
    RefundRequest,
    Resolution,
    RestoreRequest,
    RestoreState,
    RestoreStatus,
    SagaState,
    SagaStatus,
)
from refundsaga.ids import batch_id_for, restore_id_for, workflow_id_for
from refundsaga.processor import ProcessorClient, ProcessorError
from refundsaga.settings import Settings
from refundsaga.signing import SigningError, StartRequest, load_private_key, sign_request
from refundsaga.store import OasisStore
from workflows.batch_refund import BatchRefund
from workflows.refund_saga import RefundSaga
from workflows.restore_progress import PurgeExpiredSnapshots, RestoreProgress


class Refused(Exception):
    """The request was refused: bad input, or the saga is not in a state to take it (exit 2)."""


class OperationError(Exception):
    """Anything else that went wrong (exit 1)."""


def resolve_workflow_id(ref: str) -> str:
    """Accept a workflow id (`refund-42`) or a bare purchase id (`42`)."""
    ref = ref.strip()
    if ref.isdigit():
        return workflow_id_for(int(ref))
    if not ref:
        raise Refused("give a workflow id (refund-42) or a purchase id (42)")
    return ref


def signing_key(settings: Settings) -> Ed25519PrivateKey | None:
    """The person's signing key when REFUND_SIGNING_KEY_FILE is set.

    Raises:
        Refused: The file cannot be read or holds no Ed25519 key.
    """
    if settings.signing_key_file is None:
        return None
    try:
        return load_private_key(settings.signing_key_file)
    except SigningError as err:
        raise Refused(f"REFUND_SIGNING_KEY_FILE: {err}") from err


def _signed(settings: Settings, workflow_id: str, request: StartRequest) -> StartRequest:
    """The request signed with REFUND_SIGNING_KEY_FILE when it is set: with signing on, the
    workflow believes the person a request names only from this signature."""
    key = signing_key(settings)
    return request if key is None else sign_request(key, workflow_id, request)


async def start_refund(
    client: Client, settings: Settings, request: RefundRequest
) -> WorkflowHandle[RefundSaga, SagaStatus]:
    """Start a saga for the purchase, refused when one is already running for it."""
    if request.batch_approval is not None:
        raise Refused("a batch approval is given by `refund batch`, not by a single start")
    workflow_id = workflow_id_for(request.purchase_id)
    request = _signed(settings, workflow_id, request)
    amount = (
        "the unrefunded rest" if request.amount_cents is None else f"{request.amount_cents} cents"
    )
    try:
        return await client.start_workflow(
            RefundSaga.run,
            request,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=sa.at_start(request),
            static_summary=f"Refund purchase {request.purchase_id}: {amount}",
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
    handle = client.get_workflow_handle(workflow_id, result_type=SagaStatus)
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
    return await _send_update(client, workflow_id, update, message)


async def _send_update(
    client: Client, workflow_id: str, update: Any, message: Any, *, run_id: str | None = None
) -> DecisionReceipt:
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
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


# --- bulk approval ------------------------------------------------------------------------------


# What a bulk-approval filter may name: the saga's own search attributes and the start times.
# Anything else (WorkflowType, WorkflowId, ExecutionStatus, TaskQueue, ...) could reach past the
# sagas waiting for approval, so it is refused rather than trusted to the AND around it.
BULK_FILTER_ATTRIBUTES = frozenset({key.name for key in sa.ALL} | {"StartTime", "ExecutionTime"})
_FILTER_WORDS = frozenset({"AND", "OR", "NOT", "IN", "BETWEEN", "IS", "NULL", "STARTS_WITH"})
_FILTER_PUNCTUATION = frozenset("()=!<>,.-+: \t")


def check_bulk_filter(filter_: str) -> None:
    """Refuse a filter that could widen the bulk selection: an unclosed quote, unbalanced
    parentheses outside quoted strings, or an attribute outside `BULK_FILTER_ATTRIBUTES`."""
    if not filter_.strip():
        raise Refused("the filter is empty: give one, e.g. 'RequestedBy=\"sam\"'")
    # Escapes and comments are read differently by different parsers: the saga's values
    # (ids, user names, states) never need them, so none is let through.
    if "\\" in filter_ or "--" in filter_:
        raise Refused("the filter was refused: no backslashes or '--' in it")
    depth = 0
    i = 0
    while i < len(filter_):
        char = filter_[i]
        if char in "\"'":
            end = filter_.find(char, i + 1)
            if end < 0:
                raise Refused("the filter was refused: a quoted string is not closed")
            i = end + 1
            continue
        if char.isalpha() or char == "_":
            end = i
            while end < len(filter_) and (filter_[end].isalnum() or filter_[end] == "_"):
                end += 1
            word = filter_[i:end]
            if word.upper() not in _FILTER_WORDS and word not in BULK_FILTER_ATTRIBUTES:
                allowed = ", ".join(sorted(BULK_FILTER_ATTRIBUTES))
                raise Refused(f"the filter was refused: it may name only {allowed}")
            i = end
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise Refused("the filter was refused: a ')' closes what it did not open")
        elif not (char.isdigit() or char in _FILTER_PUNCTUATION):
            raise Refused(f"the filter was refused: {char!r} is not allowed in it")
        i += 1
    if depth:
        raise Refused("the filter was refused: a '(' is not closed")


def awaiting_approval_query(filter_: str) -> str:
    """Sagas waiting for approval that also match the caller's (checked) list filter."""
    check_bulk_filter(filter_)
    return f"{list_query(state=SagaState.AWAITING_APPROVAL)} AND ({filter_})"


def is_awaiting_approval(execution: WorkflowExecution) -> bool:
    """A listed execution is a saga waiting for approval by its own type and search attribute,
    whatever the filter let through."""
    return (
        execution.workflow_type == RefundSaga.__name__
        and execution.typed_search_attributes.get(sa.REFUND_STATE)
        == SagaState.AWAITING_APPROVAL.value
    )


async def select_for_approval(
    client: Client, filter_: str, *, limit: int
) -> tuple[str, list[WorkflowExecution]]:
    """The sagas a bulk decision goes to, and the query that listed them: `--dry-run` shows
    exactly this selection and `--yes` decides exactly it."""
    query = awaiting_approval_query(filter_)
    listed = await list_sagas(client, query, limit=limit)
    return query, [execution for execution in listed if is_awaiting_approval(execution)]


@dataclass(frozen=True)
class BulkDecision:
    """What one saga of a bulk decision said."""

    workflow_id: str
    outcome: Literal["approved", "rejected", "refused", "failed"]
    message: str
    approvals: int | None = None
    required_approvals: int | None = None


async def decide_listed(
    client: Client,
    listed: Sequence[WorkflowExecution],
    decision_for: Callable[[WorkflowExecution], ApprovalDecision],
    *,
    concurrency: int,
    on_done: Callable[[BulkDecision], None] | None = None,
) -> list[BulkDecision]:
    """One validating `decide` update per listed saga run, at most `concurrency` in flight.

    Each update goes to the run that was listed (so a signed decision, bound to that run, can
    only land there); the saga still refuses what its policy refuses, and a refusal of one
    does not stop the others.
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(execution: WorkflowExecution) -> BulkDecision:
        async with gate:
            decision = decision_for(execution)
            try:
                receipt = await _send_update(
                    client, execution.id, RefundSaga.decide, decision, run_id=execution.run_id
                )
            except Refused as e:
                done = BulkDecision(execution.id, "refused", str(e))
            except (OperationError, RPCError) as e:
                done = BulkDecision(execution.id, "failed", str(e))
            else:
                done = BulkDecision(
                    execution.id,
                    "approved" if decision.approve else "rejected",
                    receipt.message,
                    receipt.approvals,
                    receipt.required_approvals,
                )
            if on_done is not None:
                on_done(done)
            return done

    return list(await asyncio.gather(*(one(e) for e in listed)))


# --- batches, restores and the purge schedule -------------------------------------------------

PURGE_SCHEDULE_ID = "refund-purge-expired-snapshots"
PURGE_EVERY = timedelta(days=1)
_POLL_S = 1.0


async def start_batch(
    client: Client, settings: Settings, inp: BatchRefundInput
) -> WorkflowHandle[BatchRefund, BatchStatus]:
    """Start a batch, refused when one is already running for the same product or list."""
    workflow_id = batch_id_for(product_id=inp.product_id, purchase_ids=inp.purchase_ids or ())
    inp = _signed(settings, workflow_id, inp)
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
    try:
        return await client.start_workflow(
            BatchRefund.run,
            inp,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=attributes,
            static_summary=f"Batch refund of {what}",
            static_details=f"Requested by **{inp.requested_by}**: refund every purchase of {what}.",
        )
    except WorkflowAlreadyStartedError as err:
        raise Refused(
            f"a batch for {what} is already running: {workflow_id}; see "
            f"`refund batch status {workflow_id}`"
        ) from err
    except RPCError as err:
        raise OperationError(f"Temporal refused to start {workflow_id}: {err.message}") from err


async def _describe(client: Client, workflow_id: str, what: str) -> WorkflowExecutionDescription:
    try:
        return await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise Refused(f"no {what} {workflow_id}") from err
        raise OperationError(f"cannot describe {workflow_id}: {err.message}") from err


async def batch_status(client: Client, batch_id: str) -> BatchStatus:
    """The batch's progress: from its result when it has completed, else from the query."""
    description = await _describe(client, batch_id, "batch")
    handle = client.get_workflow_handle(batch_id, result_type=BatchStatus)
    if description.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED:
        return await handle.result()
    try:
        return await handle.query(BatchRefund.progress)
    except RPCError as err:
        raise OperationError(
            f"{batch_id} did not answer its progress query ({err.message}); is a worker running?"
        ) from err


async def wait_batch(
    client: Client,
    batch_id: str,
    *,
    timeout_s: float,
    on_poll: Callable[[BatchStatus], None] = lambda _: None,
) -> BatchStatus:
    """Poll the batch until it has ended, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await batch_status(client, batch_id)
        on_poll(status)
        if status.state.is_end:
            return status
        if time.monotonic() >= deadline:
            raise OperationError(f"{batch_id} is still {status.state.value} after {timeout_s:g} s")
        await asyncio.sleep(_POLL_S)


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


async def start_restore(
    client: Client, settings: Settings, request: RestoreRequest
) -> WorkflowHandle[RestoreProgress, RestoreStatus]:
    """Start a restore of a saga's archived progress; refused while one runs for it."""
    workflow_id = restore_id_for(request.saga_workflow_id)
    request = _signed(settings, workflow_id, request)
    try:
        return await client.start_workflow(
            RestoreProgress.run,
            request,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(sa.REQUESTED_BY, request.operator)]
            ),
            static_summary=f"Restore the progress revoked by {request.saga_workflow_id}",
        )
    except WorkflowAlreadyStartedError as err:
        raise Refused(
            f"a restore of {request.saga_workflow_id} is already running: {workflow_id}; see "
            f"`refund restore-status {request.saga_workflow_id}`"
        ) from err
    except RPCError as err:
        raise OperationError(f"Temporal refused to start {workflow_id}: {err.message}") from err


async def restore_status(client: Client, restore_id: str) -> RestoreStatus:
    """The restore's status: from its result when it has completed, else from the query."""
    description = await _describe(client, restore_id, "restore")
    handle = client.get_workflow_handle(restore_id, result_type=RestoreStatus)
    if description.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED:
        return await handle.result()
    try:
        return await handle.query(RestoreProgress.restore_status)
    except RPCError as err:
        raise OperationError(
            f"{restore_id} did not answer its status query ({err.message}); is a worker running?"
        ) from err


async def wait_restore(
    client: Client,
    restore_id: str,
    states: set[RestoreState],
    *,
    timeout_s: float,
) -> RestoreStatus:
    """Poll the restore until it is in one of `states` (or ended), or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await restore_status(client, restore_id)
        if status.state in states or status.state in RESTORE_ENDS:
            return status
        if time.monotonic() >= deadline:
            raise OperationError(
                f"{restore_id} is still {status.state.value} after {timeout_s:g} s"
            )
        await asyncio.sleep(0.5)


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


async def ensure_purge_schedule(client: Client, settings: Settings) -> str:
    """Create the daily purge of expired progress snapshots, or bring it up to date.

    Safe to call at every deploy or `refund stack up`: the schedule's retention and task
    queue follow the settings of the caller.

    Returns:
        ``created`` or ``updated``.
    """
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            PurgeExpiredSnapshots.run,
            PurgeInput(retention=settings.restore_retention),
            id=f"{PURGE_SCHEDULE_ID}-run",
            task_queue=settings.task_queue,
            static_summary="Purge progress snapshots past the restore retention",
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=PURGE_EVERY)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    try:
        await client.create_schedule(PURGE_SCHEDULE_ID, schedule)
        return "created"
    except ScheduleAlreadyRunningError:
        pass
    except RPCError as err:
        raise OperationError(f"cannot create schedule {PURGE_SCHEDULE_ID}: {err.message}") from err
    try:
        await client.get_schedule_handle(PURGE_SCHEDULE_ID).update(
            lambda _current: ScheduleUpdate(schedule=schedule)
        )
    except RPCError as err:
        raise OperationError(f"cannot update schedule {PURGE_SCHEDULE_ID}: {err.message}") from err
    return "updated"
