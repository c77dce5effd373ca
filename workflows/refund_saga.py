"""The RefundSaga workflow: refund, revoke, de-entitle and verify, durably, with approvals.

Orchestration only: every side effect is an activity. A forward-recovery saga: before the
pivot (the refund at the processor) it can stop with nothing changed; after it, every step is
retried until it succeeds or ops decide (NEEDS_ATTENTION).

This file holds the steps of the README's step table, in its order, and `run` reads as the
table; it is longer than 400 lines so that all eight steps stay in one place. What the steps
lean on is beside it: saga_base (retry policies, status, search attributes), saga_attention
(NEEDS_ATTENTION and the ops decisions), saga_pivot (the refund at the processor in detail),
saga_batch (a saga a batch started), approvals (approve, reject, decide).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from workflows.failures import error_text, error_type
from workflows.saga_base import (
    HTTP_TIMEOUT,
    STEP_RETRY,
    CannotContinue,
    SagaAborted,
)
from workflows.saga_batch import BatchChild
from workflows.saga_pivot import Pivot
from workflows.waiting import wait_for_decision

with workflow.unsafe.imports_passed_through():
    from activities.refund_activities import (
        INVALID_REQUEST,
        PURCHASE_CLAIMED,
        REQUEST_REPLAYED,
        RefundActivities,
    )
    from refundsaga.contracts import (
        AmsRemovalInput,
        ApprovalPolicy,
        CloseInput,
        DeactivateInput,
        PrepareInput,
        ReconcileInput,
        RecordRefundsInput,
        RefundPlan,
        RefundRequest,
        RevokeInput,
        SagaState,
        SagaStatus,
        VerifyInput,
        WaitingFor,
        describe_plan,
    )
    from refundsaga.models import AccessDecision, LedgerEntry
    from refundsaga.processor_events import describe_reconciliation
    from refundsaga.search_attributes import REFUND_STATE

AMS_MODES: dict[str, Literal["api", "manual", "oasis"]] = {
    "ams": "api",
    "ams_manual": "manual",
    "oasis": "oasis",
}
# Prepare failures no retry fixes: the saga ends FAILED with the reason, nothing changed.
PREPARE_REFUSALS = (
    INVALID_REQUEST,
    "ChargeNotFound",
    "PurchaseNotFound",
    PURCHASE_CLAIMED,
    REQUEST_REPLAYED,
)


@workflow.defn
class RefundSaga(Pivot, BatchChild):
    """One refund of one purchase, from request to verified loss of access."""

    @workflow.init
    def __init__(self, request: RefundRequest) -> None:
        self._request = request
        info = workflow.info()
        # The refund request's identity for its whole life: the first run of this workflow id,
        # which continue-as-new, retries and resets all keep; a new saga gets a new one.
        self._request_id = f"{info.workflow_id}/{info.first_execution_run_id}"
        self._refund_sent = False
        self._refund_in_flight = False
        self._early_events = []
        self._refund_event = False
        self._attention_step = None
        self._status = SagaStatus(
            workflow_id=info.workflow_id,
            request_id=self._request_id,
            state=SagaState.PREPARING,
            purchase_id=request.purchase_id,
            amount_cents=request.amount_cents,
            currency=request.currency,
            requested_by=request.requested_by,
            reconcile=request.reconcile,
        )
        self._plan = None
        self._rejected_by = None
        self._ams_confirmation = None
        self._resolution = None
        self._cancel_requested = False
        # A batch counts a saga it started as running.
        self._batch_bucket = "running"
        self._batch_reports = None
        # `refund start`, starter.py and batches set the search attributes at the start.
        started_as = info.typed_search_attributes.get(REFUND_STATE) or ""
        self._listed_state = SagaState(started_as) if started_as in SagaState.__members__ else None

    @workflow.run
    async def run(self, request: RefundRequest) -> SagaStatus:
        if request.batch_approval is not None and not self._from_batch():
            # Only the batch that gave the approval can start a saga carrying it: anyone else
            # setting the field is refused before anything is read or changed.
            self._status.error = (
                "a batch approval is accepted only from the batch that gave it (start "
                "batches with `refund batch`); nothing changed"
            )
            return await self._end(SagaState.FAILED)
        try:
            plan = await self._prepare()  # 1
            if not await self._approve(plan):  # 2
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
            await self._forward(self._refund, plan)  # 3 and 4
            if plan.revoke_progress:
                await self._forward(self._revoke, plan)  # 5
            else:
                self._mark("revoke", "skipped: not requested (progress kept)")
            if plan.remove_entitlement:
                await self._forward(self._deentitle, plan)  # 6
            else:
                self._status.ams.state = "not_needed"
                self._mark("deentitle", "skipped: not requested (entitlement kept)")
            await self._forward(self._verify, plan)  # 7
            return await self._end(SagaState.COMPLETED)  # 8
        except CannotContinue as err:
            # Raised by the pivot before it sent anything: no money moved.
            self._status.error = str(err)
            return await self._end(SagaState.FAILED)
        except SagaAborted:
            return await self._end(SagaState.FAILED)

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
                if error_type(err) in PREPARE_REFUSALS:
                    raise CannotContinue(error_text(err)) from err
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
            self._decided,
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

    def _approval_policy(self) -> ApprovalPolicy | None:
        waiting = self._status.state == SagaState.AWAITING_APPROVAL
        return self._plan.policy if waiting and self._plan is not None else None

    def _requester(self) -> str:
        return self._request.requested_by

    # --- step 3 and 4: refund (the pivot) and record ----------------------------------------

    async def _refund(self, plan: RefundPlan) -> None:
        self._set_state(SagaState.REFUNDING)
        if plan.reconcile is not None:
            await self._reconcile(plan, describe_reconciliation(plan.reconcile.reconciliation))
            return
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

    async def _reconcile(self, plan: RefundPlan, why: str) -> None:
        """Branch 4b: move no money; record what the processor already refunded as external,
        and a reconciled lost dispute as a chargeback."""
        evidence = plan.reconcile
        chargeback = None
        if evidence is not None and evidence.reconciliation.kind == "chargeback":
            chargeback = LedgerEntry(
                processor_refund_id=evidence.reconciliation.processor_object_id,
                amount_cents=evidence.amount_cents,
                currency=plan.currency,
                source="chargeback",
                status="succeeded",
            )
        result = await self._attempt(
            "reconcile",
            lambda: workflow.execute_activity_method(
                RefundActivities.reconcile_external_refunds,
                ReconcileInput(
                    workflow_id=workflow.info().workflow_id,
                    purchase_id=plan.purchase_id,
                    charge_id=plan.charge_id,
                    request_id=self._request_id,
                    chargeback=chargeback,
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
        refunds = sum(1 for e in result.entries if e.source != "chargeback")
        self._mark(
            "refund",
            f"no money moved ({why}); {refunds} external refund(s) recorded"
            + ("; the lost dispute recorded as a chargeback" if chargeback else ""),
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
        confirmation = await self._wait_for_ams_confirmation(plan.policy)
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
                **self._reconcile_detail(),
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

    def _reconcile_detail(self) -> dict[str, str]:
        reconciliation = self._request.reconcile
        if reconciliation is None:
            return {}
        return {
            "reconcile_kind": reconciliation.kind,
            "reconcile_object": reconciliation.processor_object_id,
            "reconcile_source": reconciliation.source,
        }

    # --- where the saga is ----------------------------------------------------------------------

    @workflow.query
    def status(self) -> SagaStatus:
        """Where the saga is, what it did and what it waits for."""
        return self._status

    @workflow.update(name="planned")
    async def planned(self) -> SagaStatus:
        """The status once the saga has left its prepare step: with its plan, waiting for ops
        at prepare, or ended (refused). Sent with the start (update-with-start), it gives the
        starter the plan in one call."""
        await workflow.wait_condition(
            lambda: self._plan is not None or self._status.state != SagaState.PREPARING
        )
        return self._status
