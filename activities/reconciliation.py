"""Step 1 of a reconciliation: what the processor confirms went back outside OASIS, planned.

RefundActivities.prepare_refund calls it for a request that carries a reconciliation, turns
its errors into Temporal's and claims the purchase. The event that started the saga carries
no authority: every fact planned on is read here, at the processor and in the ledger.
"""

from __future__ import annotations

import asyncio

from refundsaga.approval import required_approvals
from refundsaga.contracts import ApprovalPolicy, ReconcileEvidence, RefundPlan, RefundRequest
from refundsaga.planning import (
    PlanRefusal,
    check_request,
    evidence_refusal,
    money_returned,
    plan_reconciliation,
    refund_plan,
)
from refundsaga.processor import (
    ProcessorClient,
    ProcessorDispute,
    ProcessorRefund,
    ProcessorRejected,
)
from refundsaga.store import OasisStore


async def prepare_reconciliation(
    *,
    store: OasisStore,
    processor: ProcessorClient,
    policy: ApprovalPolicy,
    request: RefundRequest,
) -> RefundPlan | str:
    """The reconciliation's plan, or why nothing may happen (a sentence ending in "nothing
    changed").

    Raises:
        ProcessorError: The processor failed (transient ones are retried by the activity).
        StoreError: The store refused.
    """
    reconciliation = request.reconcile
    assert reconciliation is not None
    named = reconciliation.processor_object_id
    checked = check_request(
        request.purchase_id,
        await asyncio.to_thread(store.load_purchase, request.purchase_id),
        currency=request.currency,
    )
    if isinstance(checked, PlanRefusal):
        return f"{checked.message}; nothing changed"
    purchase = checked
    ledger = await asyncio.to_thread(store.ledger_entries, purchase.purchase_id)
    if any(entry.processor_refund_id == named for entry in ledger):
        return f"{named} is already reconciled; nothing changed"
    charge = await processor.get_charge(purchase.processor_charge_id)
    refund: ProcessorRefund | None = None
    dispute: ProcessorDispute | None = None
    try:
        if reconciliation.kind == "external_refund":
            refund = await processor.get_refund(named)
        else:
            dispute = await processor.get_dispute(named)
    except ProcessorRejected as err:
        if err.code != "resource_missing" and err.http_status != 404:
            raise
    refusal = evidence_refusal(
        reconciliation,
        charge_ids={purchase.processor_charge_id, charge.id},
        refund=refund,
        dispute=dispute,
    )
    if refusal:
        return refusal
    confirmed = refund or dispute
    assert confirmed is not None  # the evidence holds
    returned = money_returned(
        await processor.list_refunds(purchase.processor_charge_id), ledger, dispute
    )
    planned = plan_reconciliation(request.purchase_id, purchase, returned_cents=returned)
    if isinstance(planned, PlanRefusal):
        return f"{planned.message}; nothing changed"
    return refund_plan(
        purchase,
        charge,
        planned,
        # A person approves before anything irreversible happens, however little went back.
        required=max(1, required_approvals(policy, 0, refunded_before_cents=returned)),
        policy=policy,
        reconcile=ReconcileEvidence(
            reconciliation=reconciliation,
            amount_cents=confirmed.amount_cents,
            returned_cents=returned,
        ),
    )
