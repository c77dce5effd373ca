"""The RefundSaga workflow: refund, revoke, de-entitle and verify, durably, with approvals.

Orchestration only: every side effect is an activity. A forward-recovery saga: before the
pivot (the refund at the processor) it can stop with nothing changed; after it, every step is
retried until it succeeds or ops decide (NEEDS_ATTENTION).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Literal, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError

from workflows.waiting import (
    approval_record,
    ignored_malformed,
    malformed,
    take_signalled_decision,
    wait_for_decision,
)

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
        RefundActivities,
    )
    from refundsaga.approval import ops_refusal, refusal_reason, required_approvals
    from refundsaga.contracts import (
        BATCH_REPORT_SIGNAL,
        END_STATES,
        AmsConfirmation,
        AmsRemovalInput,
        ApprovalDecision,
        ApprovalRecord,
        BatchBucket,
        BatchChildReport,
        CloseInput,
        DeactivateInput,
        DecisionReceipt,
        IgnoredMessage,
        Notification,
        NotificationKind,
        PrepareInput,
        ProcessorRefundInput,
        ProcessorRefundResult,
        ReconcileInput,
        RecordRefundsInput,
        RefundPlan,
        RefundRequest,
        Resolution,
        ResolutionRecord,
        RevokeInput,
        SagaState,
        SagaStatus,
        SettleInput,
        TimelineEntry,
        VerifyInput,
        WaitingFor,
        batch_bucket,
        describe_plan,
        processor_task_queue,
    )
    from refundsaga.models import AccessDecision, LedgerEntry
    from refundsaga.search_attributes import (
        PURCHASE_ID,
        REFUND_AMOUNT_CENTS,
        REFUND_STATE,
        REQUESTED_BY,
        WAITING_FOR,
    )

T = TypeVar("T")

# Errors the activities raise that no retry can fix (ApplicationError types).
ALREADY_REFUNDED = "ChargeAlreadyRefunded"
# How many new keys the pivot takes by itself, each after looking for the refund, before a
# person decides.
MAX_NEW_KEYS = 3
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

AMS_MODES: dict[str, Literal["api", "manual", "oasis"]] = {
    "ams": "api",
    "ams_manual": "manual",
    "oasis": "oasis",
}

# Patch id: store-only steps became local activities (old histories keep regular ones).
LOCAL_STORE_STEPS = "store-steps-as-local-activities"
# Patch id: search attributes are upserted where ops filter, not at every step (old histories
# keep an upsert per transition). Each upsert is a history event and a visibility write: about
# 5 ms of Temporal server CPU (bench/README.md).
VISIBILITY_AT_REST = "search-attributes-at-rest"
# Patch id: a saga started from here on takes both changes above with this one marker (and
# one `TemporalChangeVersion` upsert) instead of one per change: two history events and a
# visibility write less per saga. Sagas started before keep deciding per change.
CURRENT_SHAPE = "local-store-steps-and-lists-at-rest"
# Memo key: a saga started with `{SHAPE_MEMO: CURRENT_SHAPE}` takes that shape without asking
# `workflow.patched`: no marker and no `TemporalChangeVersion` upsert, two history events and a
# visibility write (about 5 ms of Temporal server CPU, bench/README.md) less per saga. The memo
# is in the start event, so a replay decides the same. `refund start` and starter.py set it
# (console.operations.start_refund), and so do batches (CHILDREN_PINNED); a saga started
# without it (by an older starter or batch run) asks the patch as before. Shapes named here
# are honoured for as long as sagas started with them may be running.
SHAPE_MEMO = "saga_shape"
SHAPES_AT_START = frozenset({CURRENT_SHAPE})


def shape_memo() -> dict[str, str]:
    """The start memo that pins a new saga to the current shape (SHAPE_MEMO)."""
    return {SHAPE_MEMO: CURRENT_SHAPE}


# With VISIBILITY_AT_REST, an upsert on entering or leaving these, at the pivot, and at the
# end. The steps after the pivot (revoke, de-entitle, verify) show as REFUNDING in lists until
# the end, and exactly in `refund status`, the status query and the current details.
AT_REST = frozenset(
    {SagaState.AWAITING_APPROVAL, SagaState.AWAITING_AMS_CONFIRMATION, SagaState.NEEDS_ATTENTION}
)
LISTED = AT_REST | END_STATES | {SagaState.PREPARING, SagaState.REFUNDING}

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
# A pending refund settles on the processor's schedule: poll with a slow backoff, for days.
SETTLE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    non_retryable_error_types=BUSINESS_ERRORS,
)
SETTLE_TIMEOUT = timedelta(days=7)


class SagaAborted(Exception):
    """Ops chose `abort` for a saga in NEEDS_ATTENTION."""


class CannotContinue(Exception):
    """A step failed in a way no retry fixes and the saga must end FAILED, nothing changed."""


def refund_key(request_id: str, generation: int) -> str:
    """The pivot's idempotency key: the request and the step, never the run or the attempt.

    A new generation is taken only once the processor has proved the previous key's request
    finished (it replays a saved final answer), and always after looking for the refund.
    """
    return f"{request_id}/refund" + (f"/{generation}" if generation else "")


def _error_text(err: BaseException) -> str:
    """The innermost message of an activity failure: what a person needs to read."""
    cause: BaseException | None = err
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return f"{cause.type or 'Error'}: {cause.message}"
    return str(cause)


def _error_type(err: BaseException) -> str | None:
    cause = err.cause if isinstance(err, ActivityError) else None
    return cause.type if isinstance(cause, ApplicationError) else None


@workflow.defn
class RefundSaga:
    """One refund of one purchase, from request to verified loss of access."""

    @workflow.init
    def __init__(self, request: RefundRequest) -> None:
        self._request = request
        info = workflow.info()
        # The refund request's identity for its whole life: the first run of this workflow id,
        # which continue-as-new, retries and resets all keep; a new saga gets a new one.
        self._request_id = f"{info.workflow_id}/{info.first_execution_run_id}"
        # Set once the pivot has sent (or may have sent) the refund: any later call looks first.
        self._refund_sent = False
        self._attention_step: str | None = None
        self._status = SagaStatus(
            workflow_id=info.workflow_id,
            request_id=self._request_id,
            state=SagaState.PREPARING,
            purchase_id=request.purchase_id,
            amount_cents=request.amount_cents,
            currency=request.currency,
            requested_by=request.requested_by,
        )
        self._plan: RefundPlan | None = None
        self._rejected_by: str | None = None
        self._ams_confirmation: AmsConfirmation | None = None
        self._resolution: Resolution | None = None
        self._cancel_requested = False
        # A saga started by a BatchRefund tells it where it is (see _report_to_batch); the
        # batch counts a saga it started as running.
        self._batch_bucket: BatchBucket = "running"
        self._batch_reports: asyncio.Task[None] | None = None
        self._visibility_at_rest = False
        self._local_store_steps = False  # True: without asking LOCAL_STORE_STEPS per step
        self._listed_state: SagaState | None = None  # what list filters see

    # --- the saga -------------------------------------------------------------------------

    @workflow.run
    async def run(self, request: RefundRequest) -> SagaStatus:
        # Decided once, before the first transition, so a saga keeps one way of upserting.
        if self._shape_at_start() in SHAPES_AT_START or workflow.patched(CURRENT_SHAPE):
            self._visibility_at_rest = self._local_store_steps = True
        else:
            self._visibility_at_rest = workflow.patched(VISIBILITY_AT_REST)
        # `refund start`, starter.py and batches set the attributes at start (older batch runs
        # did not).
        started_as = workflow.info().typed_search_attributes.get(REFUND_STATE) or ""
        self._listed_state = SagaState(started_as) if started_as in SagaState.__members__ else None
        if request.batch_approval is not None and not self._from_batch():
            # Only the batch that gave the approval can start a saga carrying it: anyone else
            # setting the field is refused before anything is read or changed.
            self._status.error = (
                "a batch approval is accepted only from the batch that gave it (start "
                "batches with `refund batch`); nothing changed"
            )
            return await self._end(SagaState.FAILED)
        try:
            plan = await self._prepare()
            if not await self._approve(plan):
                return await self._end(self._status.state)
        except CannotContinue as err:
            self._status.error = str(err)
            return await self._end(SagaState.FAILED)
        except SagaAborted:
            return await self._end(SagaState.FAILED)
        except asyncio.CancelledError:
            # Before the pivot nothing has changed: release and say so.
            self._status.error = "cancelled before any money moved; nothing changed"
            await self._end(SagaState.CANCELLED)
            raise
        try:
            return await self._after_pivot(plan)
        except CannotContinue as err:
            # Raised by the pivot before it sent anything: no money moved.
            self._status.error = str(err)
            return await self._end(SagaState.FAILED)
        except SagaAborted:
            return await self._end(SagaState.FAILED)

    async def _after_pivot(self, plan: RefundPlan) -> SagaStatus:
        await self._forward(self._refund, plan)
        if plan.revoke_progress:
            await self._forward(self._revoke, plan)
        else:
            self._mark("revoke", "skipped: not requested (progress kept)")
        if plan.remove_entitlement:
            await self._forward(self._deentitle, plan)
        else:
            self._status.ams.state = "not_needed"
            self._mark("deentitle", "skipped: not requested (entitlement kept)")
        await self._forward(self._verify, plan)
        return await self._end(SagaState.COMPLETED)

    async def _forward(
        self, step: Callable[[RefundPlan], Awaitable[None]], plan: RefundPlan
    ) -> None:
        """Run a step after the pivot: a cancellation no longer stops the saga, it finishes."""
        while True:
            try:
                await step(plan)
                return
            except asyncio.CancelledError:
                self._cancel_requested = True
                self._mark("cancel", "cancel requested after the refund: finishing forward", "ops")

    # --- step 1: prepare ------------------------------------------------------------------

    async def _prepare(self) -> RefundPlan:
        self._set_state(SagaState.PREPARING)
        info = workflow.info()

        async def prepare() -> RefundPlan:
            try:
                return await workflow.execute_activity_method(
                    RefundActivities.prepare_refund,
                    PrepareInput(
                        request=self._request,
                        workflow_id=info.workflow_id,
                        request_id=self._request_id,
                    ),
                    task_queue=self._processor_queue(),
                    start_to_close_timeout=HTTP_TIMEOUT,
                    retry_policy=STEP_RETRY,
                    summary=f"prepare purchase {self._request.purchase_id}",
                )
            except ActivityError as err:
                if _error_type(err) in (
                    INVALID_REQUEST,
                    "ChargeNotFound",
                    "PurchaseNotFound",
                    PURCHASE_CLAIMED,
                    REQUEST_REPLAYED,
                ):
                    raise CannotContinue(_error_text(err)) from err
                raise

        plan = await self._attempt("prepare", prepare)
        self._plan = plan
        self._status.plan = plan
        self._status.amount_cents = plan.amount_cents
        self._status.currency = plan.currency
        self._status.required_approvals = plan.required_approvals
        self._status.branch = "already_refunded" if plan.already_refunded else "refund"
        self._status.ams.mode = AMS_MODES[plan.entitlement_source]
        self._mark("prepare", describe_plan(plan))
        return plan

    # --- step 2: plan and approve -----------------------------------------------------------

    async def _approve(self, plan: RefundPlan) -> bool:
        if self._request.batch_approval is not None and self._accept_batch_approval(plan):
            return True
        if plan.required_approvals == 0:
            self._mark("approve", "auto-approved below the policy threshold", "policy")
            return True
        self._set_state(SagaState.AWAITING_APPROVAL, WaitingFor.APPROVAL)
        await self._notify("approval_requested", describe_plan(plan))
        outcome = await wait_for_decision(
            lambda: self._approved() or self._rejected_by is not None,
            deadline=workflow.now() + plan.policy.approval_timeout,
            reminder_every=plan.policy.reminder_every,
            remind=lambda: self._notify("approval_reminder", "still waiting for approval"),
        )
        if outcome != "decided":
            self._status.error = f"no decision within {plan.policy.approval_timeout}"
            self._set_state(SagaState.EXPIRED)
            self._mark("approve", "expired: nothing changed", "policy")
            return False
        if self._rejected_by is not None:
            self._set_state(SagaState.REJECTED)
            return False
        return True

    def _approved(self) -> bool:
        required = self._status.required_approvals or 0
        return sum(1 for a in self._status.approvals if a.approve) >= required

    def _decision_refusal(self, decision: ApprovalDecision) -> str | None:
        if self._status.state != SagaState.AWAITING_APPROVAL or self._plan is None:
            return f"the saga is {self._status.state.value}, not waiting for approval"
        return refusal_reason(
            self._plan.policy,
            approver=decision.approver,
            requested_by=self._request.requested_by,
            decisions=self._status.approvals,
            decision=decision,
            workflow_id=workflow.info().workflow_id,
            run_id=workflow.info().run_id,
        )

    def _apply_decision(self, decision: ApprovalDecision) -> None:
        self._status.approvals.append(approval_record(decision))
        verb = "approved" if decision.approve else "rejected"
        self._mark(
            "approve",
            f"{verb}{': ' + decision.comment if decision.comment else ''}",
            decision.approver,
        )
        if not decision.approve:
            self._rejected_by = decision.approver

    @workflow.signal
    def approve(self, decision: ApprovalDecision) -> None:
        """Approve the refund (fire and forget; a refused approval is recorded as ignored)."""
        take_signalled_decision(
            decision,
            approve=True,
            refusal=self._decision_refusal,
            apply=self._apply_decision,
            ignore=self._ignore,
        )

    @workflow.signal
    def reject(self, decision: ApprovalDecision) -> None:
        """Reject the refund: nothing changes, the saga ends REJECTED."""
        take_signalled_decision(
            decision,
            approve=False,
            refusal=self._decision_refusal,
            apply=self._apply_decision,
            ignore=self._ignore,
        )

    @workflow.update
    async def decide(self, decision: ApprovalDecision) -> DecisionReceipt:
        """Approve or reject and learn the outcome at once; refusals never touch history."""
        self._apply_decision(decision)
        return self._receipt("approved" if decision.approve else "rejected")

    @decide.validator
    def _validate_decide(self, decision: ApprovalDecision) -> None:
        reason = malformed(decision, ApprovalDecision) or self._decision_refusal(decision)
        if reason:
            raise ValueError(reason)

    # --- a saga started by a batch ------------------------------------------------------------

    def _from_batch(self) -> bool:
        """Started as a child of the batch whose approval the request carries."""
        batch = self._request.batch_approval
        parent = workflow.info().parent
        return (
            batch is not None
            and parent is not None
            and parent.workflow_id == batch.batch_workflow_id
        )

    def _accept_batch_approval(self, plan: RefundPlan) -> bool:
        """Count the batch's approvals, unless the plan moves more than the batch approved
        (the purchase changed since): then this saga waits for its own approval."""
        batch = self._request.batch_approval
        assert batch is not None
        refusal = self._batch_approval_refusal(plan)
        if refusal:
            self._mark("approve", f"{refusal}: this refund needs its own approval", "policy")
            return False
        if plan.amount_cents > batch.max_amount_cents:
            self._mark(
                "approve",
                f"the plan moves {plan.amount_cents}, the batch approved "
                f"{batch.max_amount_cents}: this refund needs its own approval",
                "policy",
            )
            return False
        for record in batch.approvals:
            comment = f"batch {batch.batch_workflow_id}" + (
                f": {record.comment}" if record.comment else ""
            )
            self._status.approvals.append(record.model_copy(update={"comment": comment}))
        approvers = ", ".join(a.approver for a in batch.approvals if a.approve)
        self._mark(
            "approve",
            f"approved with batch {batch.batch_workflow_id}"
            + (f" by {approvers}" if approvers else " (auto-approved)"),
            "policy",
        )
        return True

    def _batch_approval_refusal(self, plan: RefundPlan) -> str | None:
        """Check the batch's approvals as if they were given to this saga: allowlisted, not
        the requester, one each, signed for the batch with signing on, enough for this refund.
        The parent is the batch (checked at the start), but the approvals are still data."""
        batch = self._request.batch_approval
        assert batch is not None
        counted: list[ApprovalRecord] = []
        for record in batch.approvals:
            if not record.approve:
                return f"the batch approval holds a rejection by {record.approver}"
            decision = ApprovalDecision(
                approver=record.approver, comment=record.comment, signature=record.signature
            )
            reason = refusal_reason(
                plan.policy,
                approver=record.approver,
                requested_by=self._request.requested_by,
                decisions=counted,
                decision=decision,
                workflow_id=batch.batch_workflow_id,
                run_id=batch.approval_run_id or "",
            )
            if reason:
                return f"the batch's approval does not hold ({reason})"
            counted.append(record)
        needed = required_approvals(
            plan.policy, plan.amount_cents, refunded_before_cents=plan.ledger_refunded_cents
        )
        if len(counted) < needed:
            return f"the batch holds {len(counted)} approval(s), this refund needs {needed}"
        return None

    def _report_to_batch(self, *, final: bool = False) -> None:
        """Tell the batch this saga moved between buckets; reports go out in order."""
        if not self._from_batch():
            return
        state = self._status.state
        if state.is_end and not final:
            return  # the end is reported once the saga has closed its books (_end)
        bucket = batch_bucket(state)
        if bucket == self._batch_bucket:
            return
        refund = self._status.refund
        report = BatchChildReport(
            purchase_id=self._request.purchase_id,
            workflow_id=workflow.info().workflow_id,
            previous=self._batch_bucket,
            current=bucket,
            state=state,
            refunded_cents=refund.amount_cents if refund.source == "processor" else 0,
            error=self._status.error,
        )
        self._batch_bucket = bucket
        self._batch_reports = asyncio.create_task(self._send_report(self._batch_reports, report))

    async def _send_report(
        self, after: asyncio.Task[None] | None, report: BatchChildReport
    ) -> None:
        if after is not None:
            await after
        parent = workflow.info().parent
        assert parent is not None
        try:
            # By workflow id only: the batch may have continued as new since it started us.
            await workflow.get_external_workflow_handle(parent.workflow_id).signal(
                BATCH_REPORT_SIGNAL, report
            )
        except Exception as err:
            # The batch may have ended (cancelled); the refund goes on regardless.
            workflow.logger.warning("batch %s not told: %s", parent.workflow_id, err)

    # --- step 3 and 4: refund (the pivot) and record ----------------------------------------

    async def _refund(self, plan: RefundPlan) -> None:
        self._set_state(SagaState.REFUNDING)
        if plan.already_refunded:
            await self._reconcile(plan, "the processor already holds the refund")
            return
        result = await self._pay(plan)
        if result is None:
            self._status.branch = "already_refunded"
            await self._reconcile(plan, "the processor said the charge was already refunded")
            return
        info = workflow.info()
        self._status.refund.source = "processor"
        self._status.refund.amount_cents = result.amount_cents
        self._status.refund.processor_refund_ids = [result.refund_id]
        self._mark(
            "refund", f"refunded {result.amount_cents} {result.currency} ({result.refund_id})"
        )
        entry = LedgerEntry(
            processor_refund_id=result.refund_id,
            amount_cents=result.amount_cents,
            currency=result.currency,
            source="processor",
            status="succeeded",
        )
        await self._attempt(
            "record",
            lambda: self._store_step(
                RefundActivities.record_refunds,
                RecordRefundsInput(
                    workflow_id=info.workflow_id, purchase_id=plan.purchase_id, entries=[entry]
                ),
                summary="record the refund in the OASIS ledger",
            ),
        )
        self._mark("record", "recorded in the OASIS ledger")

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
                kind = _error_type(err)
                if kind == ALREADY_REFUNDED:
                    return None
                if kind == REFUND_REFUSED:
                    raise CannotContinue(_error_text(err)) from err
                look_first = True
                if kind == REQUEST_SPENT:
                    generation += 1
                    if new_keys < MAX_NEW_KEYS:
                        new_keys += 1
                        self._mark("refund", f"{_error_text(err)}; looking, then a new key")
                        continue
                resolution = await self._needs_attention(step, _error_text(err))
                if resolution.action == "abort":
                    raise SagaAborted from err
                new_keys = 0

    async def _reconcile(self, plan: RefundPlan, why: str) -> None:
        """Branch 4b: move no money; record what the processor already refunded as external."""
        result = await self._attempt(
            "reconcile",
            lambda: workflow.execute_activity_method(
                RefundActivities.reconcile_external_refunds,
                ReconcileInput(
                    workflow_id=workflow.info().workflow_id,
                    purchase_id=plan.purchase_id,
                    charge_id=plan.charge_id,
                    request_id=self._request_id,
                ),
                task_queue=self._processor_queue(),
                start_to_close_timeout=HTTP_TIMEOUT,
                retry_policy=STEP_RETRY,
                summary=f"reconcile refunds of {plan.charge_id}",
            ),
        )
        self._status.refund.source = "external"
        self._status.refund.amount_cents = sum(e.amount_cents for e in result.entries)
        self._status.refund.processor_refund_ids = [e.processor_refund_id for e in result.entries]
        self._mark(
            "refund",
            f"no money moved ({why}); {len(result.entries)} external refund(s) recorded",
        )

    # --- step 5: revoke progress ------------------------------------------------------------

    async def _revoke(self, plan: RefundPlan) -> None:
        self._set_state(SagaState.REVOKING)
        result = await self._attempt(
            "revoke",
            lambda: self._store_step(
                RefundActivities.revoke_progress,
                RevokeInput(
                    workflow_id=workflow.info().workflow_id,
                    purchase_id=plan.purchase_id,
                    user_id=plan.user_id,
                    product_id=plan.product_id,
                ),
                summary="archive then delete course progress",
            ),
            skipped=None,
        )
        if result is None:
            return
        self._status.progress_deleted = (self._status.progress_deleted or 0) + result.deleted
        self._mark("revoke", f"{result.deleted} progress record(s) archived and deleted")

    # --- step 6: remove the entitlement -----------------------------------------------------

    async def _deentitle(self, plan: RefundPlan) -> None:
        info = workflow.info()
        if plan.ams_action == "remove_via_api" and plan.ams_member_id:
            self._set_state(SagaState.DEENTITLING)
            member_id = plan.ams_member_id
            result = await self._attempt(
                "deentitle",
                lambda: workflow.execute_activity_method(
                    RefundActivities.remove_ams_entitlement,
                    AmsRemovalInput(
                        workflow_id=info.workflow_id,
                        member_id=member_id,
                        product_code=plan.product_code,
                        idempotency_key=f"{info.workflow_id}/{info.run_id}/deentitle",
                    ),
                    start_to_close_timeout=HTTP_TIMEOUT,
                    retry_policy=STEP_RETRY,
                    summary=f"remove AMS entitlement {plan.product_code}",
                ),
                skipped=None,
            )
            if result is None:
                self._status.ams.state = "skipped"
                return
            self._status.ams.state = "removed" if result.removed else "already_absent"
            self._mark("deentitle", f"AMS entitlement {self._status.ams.state}")
        elif plan.ams_action == "manual_task":
            await self._await_manual_ams(plan)
        elif plan.ams_action == "deactivate_purchase":
            self._set_state(SagaState.DEENTITLING)
            await self._attempt(
                "deentitle",
                lambda: self._store_step(
                    RefundActivities.deactivate_purchase,
                    DeactivateInput(workflow_id=info.workflow_id, purchase_id=plan.purchase_id),
                    summary="end the OASIS purchase's entitlement",
                ),
                skipped=None,
            )
            self._status.ams.state = "removed"
            self._mark("deentitle", "OASIS purchase entitlement ended")
        else:
            self._status.ams.state = "not_needed"

    async def _await_manual_ams(self, plan: RefundPlan) -> None:
        self._set_state(SagaState.AWAITING_AMS_CONFIRMATION, WaitingFor.AMS_CONFIRMATION)
        self._status.ams.state = "awaiting_confirmation"
        await self._notify(
            "ams_task_opened",
            f"remove entitlement {plan.product_code} of AMS member {plan.ams_member_id} "
            "in the AMS by hand, then run `refund confirm-ams`",
        )
        escalate_at = workflow.now() + plan.policy.ams_escalate_after
        escalated = False
        self._resolution = None
        while self._ams_confirmation is None and self._resolution is None:
            until_escalation = escalate_at - workflow.now()
            wait = plan.policy.ams_reminder_every
            if not escalated and until_escalation > timedelta(0):
                wait = min(wait, until_escalation)
            try:
                await workflow.wait_condition(
                    lambda: self._ams_confirmation is not None or self._resolution is not None,
                    timeout=wait,
                    timeout_summary="AMS task reminder",
                )
            except TimeoutError:
                if not escalated and workflow.now() >= escalate_at:
                    escalated = True
                    await self._notify("ams_task_escalated", "manual AMS removal is overdue")
                else:
                    await self._notify("ams_task_reminder", "manual AMS removal still open")
        confirmation = self._ams_confirmation
        if confirmation is None:
            resolution = self._take_resolution("deentitle")
            if resolution.action == "abort":
                raise SagaAborted
            self._status.ams.state = "skipped"
            return
        self._status.ams.state = "confirmed"
        self._status.ams.reference = confirmation.ams_reference
        self._mark(
            "deentitle",
            f"removal confirmed (AMS ref {confirmation.ams_reference})",
            confirmation.operator,
        )

    def _confirmation_refusal(self, confirmation: AmsConfirmation) -> str | None:
        if self._status.state != SagaState.AWAITING_AMS_CONFIRMATION:
            return f"the saga is {self._status.state.value}, not waiting for an AMS confirmation"
        return self._operator_refusal(confirmation)

    def _operator_refusal(self, decision: Resolution | AmsConfirmation) -> str | None:
        """An ops decision counts only from an allowlisted operator (signed, with signing on).
        Before the plan there is no policy yet, and nothing to move but the saga itself."""
        if self._plan is None:
            return None
        info = workflow.info()
        return ops_refusal(
            self._plan.policy,
            decision,
            requested_by=self._request.requested_by,
            workflow_id=info.workflow_id,
            run_id=info.run_id,
        )

    @workflow.signal
    def confirm_ams_removal(self, confirmation: AmsConfirmation) -> None:
        """Someone removed the entitlement in the AMS by hand."""
        if self._ignored_malformed("confirm_ams_removal", confirmation, AmsConfirmation):
            return
        reason = self._confirmation_refusal(confirmation)
        if reason:
            self._ignore("confirm_ams_removal", confirmation.operator, reason)
        else:
            self._ams_confirmation = confirmation

    @workflow.update
    async def confirm_ams(self, confirmation: AmsConfirmation) -> DecisionReceipt:
        """Confirm the manual AMS removal and learn the outcome at once."""
        self._ams_confirmation = confirmation
        return self._receipt("AMS removal confirmed")

    @confirm_ams.validator
    def _validate_confirm_ams(self, confirmation: AmsConfirmation) -> None:
        reason = malformed(confirmation, AmsConfirmation) or self._confirmation_refusal(
            confirmation
        )
        if reason:
            raise ValueError(reason)

    # --- step 7: verify ---------------------------------------------------------------------

    async def _verify(self, plan: RefundPlan) -> None:
        self._set_state(SagaState.VERIFYING)
        must_lose_access = plan.revoke_progress and plan.remove_entitlement
        verify_input = VerifyInput(
            user_id=plan.user_id,
            product_id=plan.product_id,
            entitlement_source=plan.entitlement_source,
            ams_member_id=plan.ams_member_id,
            product_code=plan.product_code,
            ams_removal_confirmed=self._status.ams.state == "confirmed",
        )

        async def verify() -> AccessDecision:
            decision: AccessDecision = await workflow.execute_activity_method(
                RefundActivities.verify_access,
                verify_input,
                start_to_close_timeout=HTTP_TIMEOUT,
                retry_policy=STEP_RETRY,
                summary="evaluate the OASIS access rule",
            )
            self._status.access = decision
            if must_lose_access and decision.has_access:
                raise ApplicationError(
                    "user still has access via: " + ", ".join(decision.reasons),
                    type="AccessNotRevoked",
                )
            return decision

        decision = await self._attempt("verify", verify, skipped=None)
        if decision is not None:
            outcome = "access still granted by " + ", ".join(decision.reasons)
            if not decision.has_access:
                outcome = "access gone"
            self._mark("verify", outcome)

    # --- step 8: complete, and every other end ------------------------------------------------

    async def _end(self, state: SagaState) -> SagaStatus:
        self._set_state(state)
        plan = self._plan
        info = workflow.info()
        close = CloseInput(
            workflow_id=info.workflow_id,
            purchase_id=self._request.purchase_id,
            state=state,
            request_id=self._request_id,
            revoked=bool(plan and plan.revoke_progress and state == SagaState.COMPLETED),
            detail={
                "branch": self._status.branch,
                "error": self._status.error,
                "refund_cents": self._status.refund.amount_cents,
                "progress_deleted": self._status.progress_deleted,
                "ams": self._status.ams.state,
                "cancel_requested": self._cancel_requested,
            },
            approvals=self._status.approvals,
            resolutions=self._status.resolutions,
        )
        await self._attempt(
            "complete",
            lambda: self._store_step(
                RefundActivities.close_saga,
                close,
                summary=f"close the saga as {state.value}",
            ),
            skipped=None,
        )
        self._set_state(state)
        self._mark("end", state.value)
        self._report_to_batch(final=True)
        if self._batch_reports is not None:
            await self._batch_reports
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._status

    @staticmethod
    def _shape_at_start() -> str | None:
        """The shape the starter pinned in the memo (SHAPE_MEMO), if any."""
        try:
            shape = workflow.memo_value(SHAPE_MEMO, None, type_hint=str)
        except Exception:  # a memo this code cannot read pins nothing
            return None
        return shape if isinstance(shape, str) else None

    def _processor_queue(self) -> str:
        """Where the processor calls run: the rate-limited queue beside the saga's own."""
        return processor_task_queue(workflow.info().task_queue)

    def _store_step(self, activity: Callable[..., Any], arg: Any, *, summary: str) -> Any:
        """A store-only step: short, idempotent, no external call, so a local activity.

        It runs in the worker that holds the workflow, saving the three activity events and a
        workflow task round trip of a regular activity (see bench/README.md). Sagas started
        before this change keep their regular activities (workflow.patched).
        """
        if self._local_store_steps or workflow.patched(LOCAL_STORE_STEPS):
            return workflow.execute_local_activity_method(
                activity,
                arg,
                start_to_close_timeout=STORE_TIMEOUT,
                retry_policy=STEP_RETRY,
                summary=summary,
            )
        return workflow.execute_activity_method(
            activity,
            arg,
            start_to_close_timeout=STORE_TIMEOUT,
            retry_policy=STEP_RETRY,
            summary=summary,
        )

    # --- NEEDS_ATTENTION ----------------------------------------------------------------------

    async def _attempt(
        self,
        step: str,
        action: Callable[[], Awaitable[T]],
        skipped: T | None = None,
    ) -> T:
        """Run a step; when it fails for good, wait for ops to retry, skip or abort it."""
        while True:
            try:
                return await action()
            except (ActivityError, ApplicationError) as err:
                resolution = await self._needs_attention(step, _error_text(err))
                if resolution.action == "retry":
                    continue
                if resolution.action == "skip":
                    return skipped  # type: ignore[return-value]
                raise SagaAborted from err

    async def _needs_attention(self, step: str, error: str) -> Resolution:
        resume_state = self._status.state
        resume_waiting = self._status.waiting_for
        self._status.error = f"{step}: {error}"
        self._attention_step = step
        self._set_state(SagaState.NEEDS_ATTENTION, WaitingFor.OPS)
        self._mark(step, f"needs attention: {error}")
        await self._notify("needs_attention", f"step {step} failed: {error}")
        self._resolution = None
        await workflow.wait_condition(lambda: self._resolution is not None)
        resolution = self._take_resolution(step)
        if resolution.action != "abort":
            self._status.error = None
            self._set_state(resume_state, resume_waiting)
        return resolution

    def _take_resolution(self, step: str) -> Resolution:
        resolution = self._resolution
        assert resolution is not None
        self._resolution = None
        self._status.resolutions.append(
            ResolutionRecord(
                step=step,
                action=resolution.action,
                operator=resolution.operator,
                at=workflow.now(),
                note=resolution.note,
            )
        )
        self._mark(step, f"ops chose {resolution.action}", resolution.operator)
        if resolution.action == "abort":
            self._status.error = f"aborted by {resolution.operator} at {step}" + (
                f": {resolution.note}" if resolution.note else ""
            )
        return resolution

    def _resolution_refusal(self, resolution: Resolution) -> str | None:
        if self._status.state not in (
            SagaState.NEEDS_ATTENTION,
            SagaState.AWAITING_AMS_CONFIRMATION,
        ):
            return f"the saga is {self._status.state.value}, not waiting for ops"
        if (
            resolution.action == "skip"
            and self._status.state == SagaState.NEEDS_ATTENTION
            and self._attention_step in ("refund", "settle")
        ):
            # Skipping the pivot would revoke access although no money has moved.
            return "skip is refused at the refund: no money has moved; retry or abort"
        return self._operator_refusal(resolution)

    @workflow.signal
    def resolve(self, resolution: Resolution) -> None:
        """Ops' decision for a saga in NEEDS_ATTENTION: retry, skip or abort the step."""
        if self._ignored_malformed("resolve", resolution, Resolution):
            return
        reason = self._resolution_refusal(resolution)
        if reason:
            self._ignore("resolve", resolution.operator, reason)
        else:
            self._resolution = resolution

    @workflow.update
    async def resolve_attention(self, resolution: Resolution) -> DecisionReceipt:
        """Resolve and learn the outcome at once."""
        self._resolution = resolution
        return self._receipt(f"{resolution.action} accepted")

    @resolve_attention.validator
    def _validate_resolve(self, resolution: Resolution) -> None:
        reason = malformed(resolution, Resolution) or self._resolution_refusal(resolution)
        if reason:
            raise ValueError(reason)

    # --- status, search attributes, notes -------------------------------------------------------

    @workflow.query
    def status(self) -> SagaStatus:
        """Where the saga is, what it did and what it waits for."""
        return self._status

    def _receipt(self, message: str) -> DecisionReceipt:
        return DecisionReceipt(
            state=self._status.state,
            approvals=sum(1 for a in self._status.approvals if a.approve),
            required_approvals=self._status.required_approvals,
            message=message,
        )

    def _set_state(self, state: SagaState, waiting_for: WaitingFor | None = None) -> None:
        changed = state != self._status.state or waiting_for != self._status.waiting_for
        self._status.state = state
        if waiting_for != self._status.waiting_for:
            self._status.waiting_since = workflow.now() if waiting_for else None
        self._status.waiting_for = waiting_for
        if self._visibility_at_rest:
            if self._lists_must_learn(state):
                self._upsert_search_attributes()
        elif changed or state == SagaState.PREPARING:
            self._upsert_search_attributes()
        workflow.set_current_details(self._details_markdown())
        self._report_to_batch()

    def _lists_must_learn(self, state: SagaState) -> bool:
        """Whether this transition goes to the search attributes (VISIBILITY_AT_REST).

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
        if s.waiting_for:
            lines.append(
                f"**Waiting for:** {s.waiting_for.value} since {s.waiting_since:%Y-%m-%d %H:%M} UTC"
            )
        if s.plan:
            lines.append(f"**Plan:** {describe_plan(s.plan)}")
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

    def _ignore(self, kind: str, by: str, reason: str) -> None:
        self._status.ignored.append(
            IgnoredMessage(kind=kind, by=by, at=workflow.now(), reason=reason)
        )
        workflow.logger.info("ignored %s: %s", kind, reason)

    async def _notify(self, kind: NotificationKind, text: str) -> None:
        try:
            await workflow.execute_activity_method(
                RefundActivities.notify,
                Notification(
                    kind=kind,
                    workflow_id=workflow.info().workflow_id,
                    purchase_id=self._request.purchase_id,
                    text=text,
                    state=self._status.state,
                ),
                start_to_close_timeout=HTTP_TIMEOUT,
                retry_policy=RetryPolicy(
                    maximum_attempts=3, maximum_interval=timedelta(seconds=30)
                ),
                summary=f"notify: {kind}",
            )
        except ActivityError as err:
            # A lost notification must not stop a refund: a few tries, then go on (the
            # status and the Temporal UI still show what the saga waits for).
            self._mark("notify", f"{kind} not delivered: {_error_text(err)}")
            workflow.logger.warning("notification %s not delivered: %s", kind, _error_text(err))
