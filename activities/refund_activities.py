"""The RefundSaga's activities: each a thin adapter over one domain client, safe to run twice.

They translate domain outcomes into Temporal terms (`activities.errors`): business failures
become non-retryable `ApplicationError`s whose `type` the workflow branches on; transient
failures stay retryable so Temporal retries them with backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from temporalio import activity

from activities.errors import (
    INVALID_REQUEST,
    PURCHASE_CLAIMED,
    REFUND_FAILED,
    REFUND_REFUSED,
    REFUND_REQUIRES_ACTION,
    REQUEST_REPLAYED,
    REQUEST_SPENT,
    invalid,
    outcome,
    refund_result,
    request_spent,
    translated,
)
from activities.reconciliation import prepare_reconciliation
from refundsaga.access import decide_access
from refundsaga.ams import AmsClient
from refundsaga.approval import required_approvals, start_refusal
from refundsaga.contracts import (
    REFUND_REQUEST_METADATA,
    AmsRemovalInput,
    AmsRemovalResult,
    ApprovalPolicy,
    CloseInput,
    DeactivateInput,
    Notification,
    PrepareInput,
    ProcessorRefundInput,
    ProcessorRefundResult,
    ReconcileInput,
    ReconcileResult,
    RecordRefundsInput,
    RefundPlan,
    RevokeInput,
    SettleInput,
    VerifyInput,
)
from refundsaga.models import AccessDecision, LedgerEntry, RecordRefundsResult, RevokeResult
from refundsaga.notify import Notifier
from refundsaga.planning import PlanRefusal, check_request, plan_refund, refund_plan
from refundsaga.processor import (
    ChargeNotFound,
    ProcessorCharge,
    ProcessorClient,
    ProcessorRequestSpent,
)
from refundsaga.store import OasisStore

# The error types the workflows branch on stay importable from here, beside the activities.
__all__ = [
    "INVALID_REQUEST",
    "LIVE_STATUSES",
    "PURCHASE_CLAIMED",
    "REFUND_FAILED",
    "REFUND_REFUSED",
    "REFUND_REQUIRES_ACTION",
    "REQUEST_REPLAYED",
    "REQUEST_SPENT",
    "RefundActivities",
]

# Refund statuses that hold (or may still move) the money: a refund of ours in one of them is
# adopted instead of sending another. Failed and canceled refunds moved nothing.
LIVE_STATUSES = frozenset({"succeeded", "pending", "requires_action"})


class RefundActivities:
    """The saga's activities, bound to the clients the worker hands in at start."""

    def __init__(
        self,
        *,
        store: OasisStore,
        processor: ProcessorClient,
        ams: AmsClient,
        notifier: Notifier,
        policy: ApprovalPolicy,
    ) -> None:
        self._store = store
        self._processor = processor
        self._ams = ams
        self._notifier = notifier
        self._policy = policy

    @activity.defn
    async def prepare_refund(self, inp: PrepareInput) -> RefundPlan:
        """Step 1: load the purchase, read the charge, validate the amount, plan every step."""
        req = inp.request
        if req.batch_approval is None or req.reconcile is not None:
            # The saga has refused a batch approval not given by its parent batch; a batch's
            # children are vouched for by the batch's approval, every other start by its signer
            # (a reconciliation by the processor's evidence, checked below).
            refusal = start_refusal(self._policy, workflow_id=inp.workflow_id, request=req)
            if refusal:
                raise invalid(f"{refusal}; nothing changed")
        if req.reconcile is not None:
            with translated():
                reconciled = await prepare_reconciliation(
                    store=self._store, processor=self._processor, policy=self._policy, request=req
                )
            if isinstance(reconciled, str):
                raise invalid(reconciled)
            await self._claim(inp, reconciled.purchase_id)
            return reconciled
        with translated():
            checked = check_request(
                req.purchase_id,
                await asyncio.to_thread(self._store.load_purchase, req.purchase_id),
                amount_cents=req.amount_cents,
                currency=req.currency,
            )
            # Refused on the store's facts alone: no processor read.
            if isinstance(checked, PlanRefusal):
                raise invalid(checked.message)
            purchase = checked
            charge: ProcessorCharge | None = None
            # The processor's answer, as the cause of the refusal of an unknown charge.
            unknown: ChargeNotFound | None = None
            try:
                charge = await self._processor.get_charge(purchase.processor_charge_id)
            except ChargeNotFound as err:
                unknown = err
        planned = plan_refund(
            req.purchase_id,
            purchase,
            charge,
            amount_cents=req.amount_cents,
            currency=req.currency,
            revoke_progress=req.revoke_progress,
            remove_entitlement=req.remove_entitlement,
            refunded_everywhere="plan",
        )
        if isinstance(planned, PlanRefusal):
            raise invalid(planned.message) from unknown
        assert charge is not None  # planned, so the processor knows the charge
        await self._claim(inp, purchase.purchase_id)
        return refund_plan(
            purchase,
            charge,
            planned,
            required=required_approvals(
                self._policy, planned.amount_cents, refunded_before_cents=purchase.refunded_cents
            ),
            policy=self._policy,
        )

    async def _claim(self, inp: PrepareInput, purchase_id: int) -> None:
        """Claim the purchase for the saga's request: one refund in flight per purchase."""
        request_id = inp.request_id
        if request_id is None:
            return
        req = inp.request
        with translated():
            await asyncio.to_thread(
                lambda: self._store.claim_purchase(
                    purchase_id=purchase_id,
                    request_id=request_id,
                    workflow_id=inp.workflow_id,
                    nonce=req.nonce if req.signature else None,
                )
            )

    @activity.defn
    async def refund_at_processor(self, inp: ProcessorRefundInput) -> ProcessorRefundResult:
        """Step 3, the pivot: refund at the processor, exactly once for the saga's request.

        A resend (any attempt after the first, or `look_first`) first asks the processor for the
        charge's refunds and adopts the one carrying the request's identity: an idempotency key
        alone is not enough, since the processor forgets keys after a day. Before sending, the
        store must agree: the request holds the purchase's claim and the ledger has the amount.
        """
        spent: set[str] = set()
        with translated():
            resend = activity.in_activity() and activity.info().attempt > 1
            if inp.look_first or resend:
                ours = [
                    r
                    for r in await self._processor.list_refunds(inp.charge_id)
                    if r.metadata.get(REFUND_REQUEST_METADATA) == inp.request_id
                ]
                live = [r for r in ours if r.status in LIVE_STATUSES]
                if live:
                    activity.logger.info("adopting refund %s of this request", live[0].id)
                    return outcome(live[0])
                spent = {r.id for r in ours}
            await asyncio.to_thread(
                lambda: self._store.check_refund(
                    purchase_id=inp.purchase_id,
                    request_id=inp.request_id,
                    amount_cents=inp.amount_cents,
                )
            )
            try:
                refund = await self._processor.create_refund(
                    charge_id=inp.charge_id,
                    amount_cents=inp.amount_cents,
                    idempotency_key=inp.idempotency_key,
                    metadata={
                        REFUND_REQUEST_METADATA: inp.request_id,
                        "workflow_id": inp.workflow_id,
                        "purchase_id": str(inp.purchase_id),
                    },
                    reason="requested_by_customer",
                )
            except ProcessorRequestSpent as err:
                raise request_spent(f"{err.message} (HTTP {err.http_status})") from err
        if refund.id in spent:
            # The processor replayed its saved answer for a refund that has since failed.
            raise request_spent(
                f"the key's saved answer is refund {refund.id}, now {refund.status}"
            )
        return outcome(refund)

    @activity.defn
    async def read_refund(self, inp: SettleInput) -> ProcessorRefundResult:
        """Read a pending refund once (one GET): pending comes back as a result, not an error,
        so the saga decides when to read again (a processor event, or its fallback timer)."""
        with translated():
            refund = await self._processor.get_refund(inp.refund_id)
        if refund.status == "pending":
            return refund_result(refund)
        return outcome(refund)

    @activity.defn
    async def record_refunds(self, inp: RecordRefundsInput) -> RecordRefundsResult:
        """Step 4: write the refund into the OASIS ledger (unique by processor refund id)."""
        with translated():
            return await asyncio.to_thread(
                lambda: self._store.record_refunds(
                    inp.purchase_id, inp.entries, workflow_id=inp.workflow_id
                )
            )

    @activity.defn
    async def reconcile_external_refunds(self, inp: ReconcileInput) -> ReconcileResult:
        """Step 4b: record the refunds the processor already holds as `external`, and a
        reconciled lost dispute as a `chargeback`."""
        with translated():
            refunds = await self._processor.list_refunds(inp.charge_id)
            entries = [
                LedgerEntry(
                    processor_refund_id=r.id,
                    amount_cents=r.amount_cents,
                    currency=r.currency,
                    source="processor"
                    if inp.request_id and r.metadata.get(REFUND_REQUEST_METADATA) == inp.request_id
                    else "external",
                    status="succeeded" if r.status == "succeeded" else "pending",
                )
                for r in refunds
                if r.status in ("succeeded", "pending") and r.amount_cents > 0
            ]
            if inp.chargeback is not None:
                entries.append(inp.chargeback)
            result = await asyncio.to_thread(
                lambda: self._store.record_refunds(
                    inp.purchase_id, entries, workflow_id=inp.workflow_id
                )
            )
        return ReconcileResult(entries=entries, refunded_cents=result.refunded_cents)

    @activity.defn
    async def revoke_progress(self, inp: RevokeInput) -> RevokeResult:
        """Step 5: archive the user's progress, then delete it, in one transaction."""
        with translated():
            return await asyncio.to_thread(
                lambda: self._store.revoke_progress(
                    purchase_id=inp.purchase_id,
                    user_id=inp.user_id,
                    product_id=inp.product_id,
                    workflow_id=inp.workflow_id,
                )
            )

    @activity.defn
    async def remove_ams_entitlement(self, inp: AmsRemovalInput) -> AmsRemovalResult:
        """Step 6 (api): remove the entitlement in the AMS; already gone counts as done."""
        with translated():
            removal = await self._ams.remove_entitlement(
                inp.member_id, inp.product_code, idempotency_key=inp.idempotency_key
            )
        return AmsRemovalResult(removed=removal.removed, already_absent=removal.already_absent)

    @activity.defn
    async def deactivate_purchase(self, inp: DeactivateInput) -> None:
        """Step 6 (oasis products): end the entitlement the OASIS purchase grants."""
        with translated():
            await asyncio.to_thread(
                lambda: self._store.end_entitlement(
                    purchase_id=inp.purchase_id, workflow_id=inp.workflow_id
                )
            )

    @activity.defn
    async def verify_access(self, inp: VerifyInput) -> AccessDecision:
        """Step 7: evaluate the OASIS access rule for the user and product."""
        with translated():
            facts = await asyncio.to_thread(self._store.access_facts, inp.user_id, inp.product_id)
            ams_entitled: bool | None = None
            if inp.entitlement_source == "ams":
                ams_entitled = bool(inp.ams_member_id) and await self._ams.has_active_entitlement(
                    inp.ams_member_id or "", inp.product_code
                )
            elif inp.entitlement_source == "ams_manual":
                # No integration: only a person's confirmation says the AMS entitlement is gone.
                ams_entitled = not inp.ams_removal_confirmed
        return decide_access(
            entitlement_source=inp.entitlement_source,
            progress_count=facts.progress_count,
            active_purchase=facts.active_purchase,
            ams_entitled=ams_entitled,
        )

    @activity.defn
    async def close_saga(self, inp: CloseInput) -> None:
        """Step 8 and every other end: purchase status, audit trail, final notification."""
        decisions: list[tuple[str, str, dict[str, Any]]] = [
            (
                "approved" if a.approve else "rejected",
                a.approver,
                # The signature makes the decision attributable to the approver's key later.
                {"at": a.at.isoformat(), "comment": a.comment}
                | ({"signature": a.signature} if a.signature else {}),
            )
            for a in inp.approvals
        ] + [
            (
                f"ops_{r.action}",
                r.operator,
                {"step": r.step, "at": r.at.isoformat(), "note": r.note},
            )
            for r in inp.resolutions
        ]
        with translated():
            # One transaction: the purchase's final status (when COMPLETED) and the end.
            first = await asyncio.to_thread(
                lambda: self._store.close_saga(
                    workflow_id=inp.workflow_id,
                    purchase_id=inp.purchase_id,
                    state=inp.state.value,
                    revoked=inp.revoked,
                    decisions=decisions,
                    detail=dict(inp.detail),
                    request_id=inp.request_id,
                )
            )
        if first or activity.info().attempt > 1:
            # Also on a retry: the end may have been recorded by an attempt whose notification
            # then failed. A repeat carries the same delivery id (X-Refund-Delivery), so
            # receivers drop it; a first run that finds the end recorded (a replayed local
            # activity) does not send again.
            await self._notifier.send(
                Notification(
                    kind="saga_ended",
                    workflow_id=inp.workflow_id,
                    purchase_id=inp.purchase_id,
                    text=f"refund saga ended {inp.state.value}",
                    state=inp.state,
                )
            )

    @activity.defn
    async def notify(self, notification: Notification) -> None:
        """Tell people: approval requests, reminders, manual AMS tasks, NEEDS_ATTENTION."""
        await self._notifier.send(notification)

    def all(self) -> list[Callable[..., Any]]:
        """Every activity (a worker that serves both task queues, e.g. in tests)."""
        return [*self.processor_calls(), *self.others()]

    def processor_calls(self) -> list[Callable[..., Any]]:
        """The activities that call the processor: they run on the rate-limited queue
        (`processor_task_queue`), so that every saga together stays under the limit."""
        return [
            self.prepare_refund,
            self.refund_at_processor,
            self.read_refund,
            self.reconcile_external_refunds,
        ]

    def others(self) -> list[Callable[..., Any]]:
        """The activities on the saga's own task queue."""
        return [
            self.record_refunds,
            self.revoke_progress,
            self.remove_ams_entitlement,
            self.deactivate_purchase,
            self.verify_access,
            self.close_saga,
            self.notify,
        ]
