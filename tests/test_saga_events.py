"""The saga's side of processor events, on the real time-skipping server with the processor and
AMS sandboxes over HTTP and a migrated SQLite store: a pending refund settled by the
`processor_event` signal (a slow timer as the fallback), and reconciliations of money that went
back outside OASIS. Assertions are on outcomes: requests at the processor, ledger rows,
progress, entitlements and the saga's state."""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError

from activities.reconciliation import prepare_reconciliation
from activities.refund_activities import RefundActivities
from console.seed import SeededPurchase
from refundsaga.approval import start_refusal
from refundsaga.contracts import (
    ApprovalDecision,
    ApprovalPolicy,
    BatchApproval,
    ReconcileInput,
    RefundPlan,
    RefundRequest,
    Resolution,
    SagaState,
    SagaStatus,
)
from refundsaga.ids import reconcile_id_for
from refundsaga.models import LedgerEntry
from refundsaga.planning import (
    PlannedRefund,
    PlanRefusal,
    evidence_refusal,
    money_returned,
    plan_reconciliation,
)
from refundsaga.processor import (
    ProcessorCharge,
    ProcessorDispute,
    ProcessorRefund,
    ProcessorRejected,
)
from refundsaga.processor_events import (
    PROCESSOR_EVENT_SIGNAL,
    PROCESSOR_REQUESTER,
    ProcessorEvent,
    Reconciliation,
)
from refundsaga.reconcile import reconcile_request
from refundsaga.store import OasisStore
from refundsaga.store.schema import Refund
from tests.fixtures.planning import PRICE, snapshot
from tests.fixtures.temporal import SagaWorld
from workflows.refund_saga import RefundSaga
from workflows.saga_pivot import SETTLE_FIRST_READ, SETTLE_MAX_INTERVAL, SETTLE_TIMEOUT


@pytest.fixture
def world(saga_world: SagaWorld) -> SagaWorld:
    saga_world.processor.clear_requests()
    return saga_world


def on_charge(world: SagaWorld, **charge: Any) -> SeededPurchase:
    """A standard purchase re-pointed at a new charge of the same amount with `charge`'s
    settings (refund_behavior, settle_after_polls)."""
    purchase = world.seed("standard")
    created = world.processor.create_charge(purchase.amount_cents, **charge)
    with world.store.engine.begin() as db:
        db.execute(
            text("UPDATE purchases SET processor_charge_id = :c WHERE id = :p"),
            {"c": created["id"], "p": purchase.purchase_id},
        )
    return purchase.model_copy(update={"charge_id": created["id"]})


def calls(world: SagaWorld, method: str, path: str) -> int:
    """How many `/v1` requests the sandbox logged for `method path`."""
    return sum(1 for r in world.processor.requests() if (r["method"], r["path"]) == (method, path))


async def following(world: SagaWorld, handle: WorkflowHandle[Any, Any]) -> SagaStatus:
    """Wait (queries only: no time skips) until the saga follows a pending refund."""
    for _ in range(2000):
        status = await world.status(handle)
        if status.refund.pending_refund_id:
            return status
        if status.state.is_end:
            break
        await asyncio.sleep(0.025)
    raise AssertionError(f"the saga never followed a pending refund: {status.state}")


async def approved(world: SagaWorld, purchase: SeededPurchase) -> WorkflowHandle[Any, Any]:
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    return handle


def event(refund_id: str) -> ProcessorEvent:
    return ProcessorEvent(refund_id=refund_id, event_id=f"evt_{uuid.uuid4().hex[:12]}")


# --- a pending refund settles by event ---------------------------------------------------------


async def test_a_pending_refund_settles_on_the_processor_event_with_one_read(
    world: SagaWorld,
) -> None:
    # Left to itself the sandbox would settle the refund only after many reads.
    purchase = on_charge(world, refund_behavior="pending", settle_after_polls=1_000)
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    # Nothing is followed yet: an event now is recorded as ignored and reads nothing.
    await handle.signal(PROCESSOR_EVENT_SIGNAL, event("re_early0"))
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    status = await following(world, handle)
    refund_id = status.refund.pending_refund_id
    assert refund_id is not None and status.state == SagaState.REFUNDING
    assert status.refund.next_read_at is not None
    assert status.refund.next_read_at - status.timeline[-1].at == SETTLE_FIRST_READ

    # An event for another refund carries no weight: ignored, nothing read.
    await handle.signal(PROCESSOR_EVENT_SIGNAL, event("re_someoneelse0"))
    world.processor.settle(refund_id, "succeeded")
    await handle.signal(PROCESSOR_EVENT_SIGNAL, event(refund_id))
    await world.wait_for(handle, SagaState.COMPLETED)
    result = await handle.result()

    assert calls(world, "POST", "/v1/refunds") == 1
    # One read, the one the event asked for: no timed polls.
    assert calls(world, "GET", f"/v1/refunds/{refund_id}") == 1
    assert result.refund.reads == 1 and result.refund.pending_refund_id is None
    assert result.refund.processor_refund_ids == [refund_id]
    assert any(
        t.step == "settle" and "processor reported a change" in t.outcome for t in result.timeline
    )
    ignored = [(i.kind, i.by, i.reason) for i in result.ignored]
    assert ignored == [
        (
            "processor_event",
            "processor",
            "the saga follows no pending refund (it is AWAITING_APPROVAL)",
        ),
        (
            "processor_event",
            "processor",
            f"refund re_someoneelse0 is not the refund this saga follows ({refund_id})",
        ),
    ]
    snapshot_ = world.store.load_purchase(purchase.purchase_id)
    assert snapshot_ is not None and snapshot_.refunded_cents == purchase.amount_cents
    assert snapshot_.progress_count == 0


async def test_without_an_event_the_fallback_timer_reads_with_a_backoff(world: SagaWorld) -> None:
    # The sandbox settles the refund at its third read.
    purchase = on_charge(world, refund_behavior="pending", settle_after_polls=3)
    handle = await approved(world, purchase)
    status = await following(world, handle)
    refund_id = status.refund.pending_refund_id
    assert calls(world, "GET", f"/v1/refunds/{refund_id}") == 0

    result = await handle.result()  # lets the test server skip to each timer

    assert result.state == SagaState.COMPLETED
    assert calls(world, "GET", f"/v1/refunds/{refund_id}") == 3
    assert result.refund.reads == 3
    pending_at = next(t.at for t in result.timeline if "pending at the processor" in t.outcome)
    settled = next(t for t in result.timeline if t.step == "settle")
    assert "fallback timer" in settled.outcome
    # 10, then 20, then 40 minutes.
    assert settled.at - pending_at >= SETTLE_FIRST_READ * 7
    assert settled.at - pending_at < SETTLE_FIRST_READ * 8


async def test_an_event_that_comes_before_the_refund_call_answers_is_kept(
    world: SagaWorld,
) -> None:
    # The first read settles the refund: only an event makes the saga read before 10 minutes.
    purchase = on_charge(world, refund_behavior="pending", settle_after_polls=1)
    # The refund is made, its answer lost: the saga keeps calling, the refund exists.
    world.processor.set_faults(lost_response_rate=1.0, paths=["/v1/refunds"])
    handle = await approved(world, purchase)
    made: list[dict[str, Any]] = []
    for _ in range(400):
        made = world.processor.get_charge(purchase.charge_id)["refunds"]["data"]
        if made:
            break
        await asyncio.sleep(0.025)
    (refund,) = made
    status = await world.status(handle)
    assert status.state == SagaState.REFUNDING and status.refund.pending_refund_id is None

    # The webhook is faster than the refund call's answer.
    await handle.signal(PROCESSOR_EVENT_SIGNAL, event(refund["id"]))
    await handle.signal(PROCESSOR_EVENT_SIGNAL, event("re_unrelated0"))
    world.processor.clear_faults()
    # Queries skip no time: COMPLETED now means no timer was needed.
    await world.wait_for(handle, SagaState.COMPLETED)
    result = await handle.result()

    assert calls(world, "GET", f"/v1/refunds/{refund['id']}") == 1
    assert result.refund.processor_refund_ids == [refund["id"]]
    assert [i.reason for i in result.ignored] == [
        "refund re_unrelated0 is not the refund this saga follows"
    ]
    assert len(world.processor.get_charge(purchase.charge_id)["refunds"]["data"]) == 1


async def test_a_refund_still_pending_after_seven_days_needs_attention(world: SagaWorld) -> None:
    purchase = on_charge(world, refund_behavior="pending", settle_after_polls=1_000)
    handle = await approved(world, purchase)
    status = await following(world, handle)
    refund_id = status.refund.pending_refund_id

    await world.env.sleep(SETTLE_TIMEOUT + timedelta(hours=1))
    status = await world.wait_for(handle, SagaState.NEEDS_ATTENTION)

    assert status.error == f"settle: refund {refund_id} still pending after 7 days"
    reads = calls(world, "GET", f"/v1/refunds/{refund_id}")
    # 10 minutes doubling to 6 hours: 6 reads in the first 10.5 hours, then one every 6 hours
    # and a last one at the deadline.
    assert reads == status.refund.reads
    first = sum((SETTLE_FIRST_READ * 2**i for i in range(6)), timedelta())
    assert (
        first == timedelta(hours=10, minutes=30) and SETTLE_FIRST_READ * 2**6 > SETTLE_MAX_INTERVAL
    )
    assert reads == 6 + math.ceil((SETTLE_TIMEOUT - first) / SETTLE_MAX_INTERVAL) == 33
    await handle.execute_update(
        RefundSaga.resolve_attention, Resolution(action="abort", operator="olivia")
    )
    result = await handle.result()
    assert result.state == SagaState.FAILED
    snapshot_ = world.store.load_purchase(purchase.purchase_id)
    assert snapshot_ is not None and snapshot_.progress_count == 6


# --- reconciliations: money that went back outside OASIS ---------------------------------------


def processor_refund(
    world: SagaWorld, charge_id: str, amount: int | None = None, **metadata: str
) -> dict[str, Any]:
    """`POST /v1/refunds` at the sandbox, as someone in the processor's dashboard would."""
    form = {"charge": charge_id} | ({"amount": str(amount)} if amount else {})
    form |= {f"metadata[{key}]": value for key, value in metadata.items()}
    response = world.processor.http.post(
        "/v1/refunds", data=form, headers={"Idempotency-Key": uuid.uuid4().hex}
    )
    response.raise_for_status()
    refund: dict[str, Any] = response.json()
    return refund


def dispute_at_processor(
    world: SagaWorld, charge_id: str, amount: int | None = None, closed: str | None = None
) -> dict[str, Any]:
    """The cardholder disputes the charge at the sandbox; `closed` closes it won or lost."""
    body = {} if amount is None else {"amount": amount}
    opened = world.processor.http.post(f"/_sandbox/charges/{charge_id}/dispute", json=body)
    opened.raise_for_status()
    dispute: dict[str, Any] = opened.json()
    if closed is not None:
        response = world.processor.http.post(
            f"/_sandbox/disputes/{dispute['id']}/close", json={"status": closed}
        )
        response.raise_for_status()
        dispute = response.json()
    return dispute


def ledger(world: SagaWorld, purchase_id: int) -> list[tuple[str, int, str, str]]:
    """(processor id, amount, source, status) of the purchase's ledger rows."""
    with world.store.engine.begin() as db:
        rows = db.execute(
            select(
                Refund.processor_refund_id, Refund.amount_cents, Refund.source, Refund.status
            ).where(Refund.purchase_id == purchase_id)
        ).all()
    return sorted((r[0], r[1], r[2], r[3]) for r in rows)


def held_at_processor(world: SagaWorld, charge_id: str) -> list[tuple[str, int, str, str]]:
    """The charge's succeeded refunds as ledger rows of refunds made outside OASIS."""
    refunds = world.processor.get_charge(charge_id)["refunds"]["data"]
    return sorted(
        (r["id"], r["amount"], "external", "succeeded")
        for r in refunds
        if r["status"] == "succeeded"
    )


async def reconcile(
    world: SagaWorld,
    purchase_id: int,
    object_id: str,
    kind: str = "external_refund",
    **request: Any,
) -> WorkflowHandle[RefundSaga, SagaStatus]:
    """Start a reconciliation as the webhook receiver does (its id made unique per test)."""
    request.setdefault("requested_by", PROCESSOR_REQUESTER)
    reconciliation = Reconciliation.model_validate(
        {"kind": kind, "processor_object_id": object_id, "source": "webhook", "event_id": "evt_t1"}
    )
    handle = await world.client.start_workflow(
        RefundSaga.run,
        RefundRequest(
            purchase_id=purchase_id,
            reason=f"the processor reports {object_id}",
            reconcile=reconciliation,
            **request,
        ),
        id=f"reconcile-{purchase_id}-{uuid.uuid4().hex[:8]}",
        task_queue=world.task_queue,
        static_summary=f"reconcile {kind} {object_id} (webhook)",
    )
    world.handles.append(handle)
    return handle


# Reconciliations wait for a person even where a refund of the amount would be auto-approved.
@pytest.mark.saga_settings(auto_approve_below_cents=1_000_000)
async def test_an_outside_refund_is_reconciled_once_approved(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    outside = processor_refund(world, purchase.charge_id)
    world.processor.clear_requests()

    handle = await reconcile(world, purchase.purchase_id, outside["id"])
    waiting = await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    assert waiting.reconcile is not None and waiting.reconcile.processor_object_id == outside["id"]
    plan = waiting.plan
    assert plan is not None and plan.reconcile is not None
    assert plan.amount_cents == 0 and plan.already_refunded and plan.required_approvals == 1
    assert plan.reconcile.returned_cents == purchase.amount_cents
    assert plan.revoke_progress and plan.remove_entitlement
    assert "reconciliation of a refund made outside OASIS" in waiting.timeline[0].outcome
    description = await handle.describe()
    assert await description.static_summary() == (
        f"reconcile external_refund {outside['id']} (webhook)"
    )
    # Nothing irreversible before the approval.
    snapshot_ = world.store.load_purchase(purchase.purchase_id)
    assert snapshot_ is not None and snapshot_.progress_count == 6
    assert world.ams.entitlements(purchase.ams_member_id or "") != []
    # The processor asked: it may not approve.
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(
            RefundSaga.decide, ApprovalDecision(approver=PROCESSOR_REQUESTER)
        )
    assert "processor is not on the approver allowlist" in str(refused.value.cause)

    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    result = await handle.result()

    assert result.state == SagaState.COMPLETED and result.branch == "already_refunded"
    assert result.refund.source == "external" and result.refund.amount_cents == 9_995
    snapshot_ = world.store.load_purchase(purchase.purchase_id)
    assert snapshot_ is not None and snapshot_.progress_count == 0
    assert snapshot_.status == "refunded" and snapshot_.refunded_cents == purchase.amount_cents
    assert world.ams.entitlements(purchase.ams_member_id or "") == []
    assert result.access is not None and not result.access.has_access
    assert ledger(world, purchase.purchase_id) == held_at_processor(world, purchase.charge_id)
    assert calls(world, "POST", "/v1/refunds") == 0
    ended = [e for e in world.store.audit_trail(workflow_id=handle.id) if e.event == "saga_ended"]
    assert ended[-1].detail["reconcile_kind"] == "external_refund"
    assert ended[-1].detail["reconcile_object"] == outside["id"]


async def test_a_partial_outside_refund_keeps_access(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    outside = processor_refund(world, purchase.charge_id, amount=2_000)
    world.processor.clear_requests()

    handle = await reconcile(world, purchase.purchase_id, outside["id"])
    waiting = await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    assert waiting.plan is not None and not waiting.plan.revoke_progress
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    result = await handle.result()

    assert result.state == SagaState.COMPLETED
    snapshot_ = world.store.load_purchase(purchase.purchase_id)
    assert snapshot_ is not None and snapshot_.progress_count == 6
    assert snapshot_.status == "partially_refunded" and snapshot_.refunded_cents == 2_000
    assert world.ams.entitlements(purchase.ams_member_id or "") != []
    assert result.access is not None and result.access.has_access
    assert ledger(world, purchase.purchase_id) == held_at_processor(world, purchase.charge_id)
    assert calls(world, "POST", "/v1/refunds") == 0


async def test_a_lost_chargeback_is_reconciled_and_recorded_as_a_chargeback(
    world: SagaWorld,
) -> None:
    purchase = world.seed("standard")
    lost = dispute_at_processor(world, purchase.charge_id, closed="lost")
    world.processor.clear_requests()

    handle = await reconcile(world, purchase.purchase_id, lost["id"], "chargeback")
    waiting = await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    assert waiting.plan is not None and waiting.plan.reconcile is not None
    assert waiting.plan.reconcile.amount_cents == purchase.amount_cents
    assert waiting.plan.revoke_progress and waiting.plan.required_approvals == 1
    assert "reconciliation of a lost chargeback" in waiting.timeline[0].outcome
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    result = await handle.result()

    assert result.state == SagaState.COMPLETED
    assert ledger(world, purchase.purchase_id) == [
        (lost["id"], purchase.amount_cents, "chargeback", "succeeded")
    ]
    snapshot_ = world.store.load_purchase(purchase.purchase_id)
    assert snapshot_ is not None and snapshot_.progress_count == 0
    assert snapshot_.status == "refunded" and snapshot_.refunded_cents == purchase.amount_cents
    assert world.ams.entitlements(purchase.ams_member_id or "") == []
    assert calls(world, "POST", "/v1/refunds") == 0
    assert any("recorded as a chargeback" in t.outcome for t in result.timeline)


def forged(world: SagaWorld, purchase: SeededPurchase, case: str) -> tuple[str, str, str]:
    """(kind, object id, why it is refused) of a reconciliation the processor does not back."""
    if case == "no_such_refund":
        return "external_refund", "re_doesnotexist0", "it has no such refund"
    if case == "our_refund":
        ours = processor_refund(world, purchase.charge_id, refund_request="refund-1/run-1")
        return "external_refund", ours["id"], "OASIS's own"
    if case == "another_charge":
        other = world.processor.create_charge(9_995)
        theirs = processor_refund(world, other["id"])
        return "external_refund", theirs["id"], f"of charge {other['id']}"
    if case == "still_pending":
        world.processor.set_refund_behavior(purchase.charge_id, "pending")
        pending = processor_refund(world, purchase.charge_id)
        return "external_refund", pending["id"], "pending, not succeeded"
    if case == "dispute_not_lost":
        opened = dispute_at_processor(world, purchase.charge_id)
        return "chargeback", opened["id"], "needs_response, not lost"
    if case == "dispute_won":
        won = dispute_at_processor(world, purchase.charge_id, closed="won")
        return "chargeback", won["id"], "won, not lost"
    if case == "dispute_of_another_charge":
        other = world.processor.create_charge(9_995)
        lost = dispute_at_processor(world, other["id"], closed="lost")
        return "chargeback", lost["id"], f"of charge {other['id']}"
    assert case == "no_such_dispute"
    return "chargeback", "dp_doesnotexist0", "it has no such dispute"


FORGED = [
    "no_such_refund",
    "our_refund",
    "another_charge",
    "still_pending",
    "no_such_dispute",
    "dispute_not_lost",
    "dispute_won",
    "dispute_of_another_charge",
]


@pytest.mark.parametrize("case", FORGED)
async def test_a_reconciliation_the_processor_does_not_confirm_changes_nothing(
    world: SagaWorld, case: str
) -> None:
    purchase = world.seed("standard")
    kind, object_id, why = forged(world, purchase, case)
    world.processor.clear_requests()

    handle = await reconcile(world, purchase.purchase_id, object_id, kind)
    result = await handle.result()

    assert result.state == SagaState.FAILED
    assert result.error is not None
    assert f"the processor does not confirm {object_id}" in result.error
    assert why in result.error and result.error.endswith("nothing changed")
    assert result.plan is None and result.approvals == []
    assert ledger(world, purchase.purchase_id) == []
    snapshot_ = world.store.load_purchase(purchase.purchase_id)
    assert snapshot_ is not None and snapshot_.progress_count == 6
    assert snapshot_.status == "active" and snapshot_.refunded_cents == 0
    assert world.ams.entitlements(purchase.ams_member_id or "") != []
    assert calls(world, "POST", "/v1/refunds") == 0


async def test_a_second_reconciliation_of_the_same_refund_changes_nothing(
    world: SagaWorld,
) -> None:
    purchase = world.seed("standard")
    outside = processor_refund(world, purchase.charge_id, amount=2_000)
    first = await reconcile(world, purchase.purchase_id, outside["id"])
    await world.wait_for(first, SagaState.AWAITING_APPROVAL)
    await first.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    assert (await first.result()).state == SagaState.COMPLETED
    books = ledger(world, purchase.purchase_id)
    world.processor.clear_requests()

    second = await reconcile(world, purchase.purchase_id, outside["id"])
    result = await second.result()

    assert result.state == SagaState.FAILED
    assert (
        result.error
        == f"InvalidRefundRequest: {outside['id']} is already reconciled; nothing changed"
    )
    assert ledger(world, purchase.purchase_id) == books
    assert world.processor.requests() == []  # refused on the ledger alone


@pytest.mark.parametrize(
    ("request_fields", "refusal"),
    [
        ({"requested_by": "sam"}, "a reconciliation is requested by processor, not sam"),
        ({"amount_cents": 100}, "leave the amount, revoke and entitlement unset"),
    ],
)
async def test_a_reconciliation_only_the_processor_asks_for_as_it_is(
    world: SagaWorld, request_fields: dict[str, Any], refusal: str
) -> None:
    purchase = world.seed("standard")
    outside = processor_refund(world, purchase.charge_id)
    handle = await reconcile(world, purchase.purchase_id, outside["id"], **request_fields)
    result = await handle.result()
    assert result.state == SagaState.FAILED
    assert result.error is not None and refusal in result.error
    assert ledger(world, purchase.purchase_id) == []


async def test_a_person_may_not_request_a_refund_as_the_processor(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase, requested_by=PROCESSOR_REQUESTER)
    result = await handle.result()
    assert result.state == SagaState.FAILED
    assert result.error is not None and "reserved" in result.error
    assert world.processor.get_charge(purchase.charge_id)["amount_refunded"] == 0


# --- the rules, pure -------------------------------------------------------------------------

POLICY = ApprovalPolicy(
    approvers=["alice", "bob"],
    dual_approval_cents=50_000,
    auto_approve_below_cents=0,
    approval_timeout=timedelta(hours=72),
    reminder_every=timedelta(hours=24),
    ams_reminder_every=timedelta(hours=24),
    ams_escalate_after=timedelta(hours=72),
)
CHARGEBACK = Reconciliation(kind="chargeback", processor_object_id="dp_7", source="sweep")


def reconciliation_request(reconciliation: Reconciliation = CHARGEBACK, **fields: Any) -> Any:
    return RefundRequest.model_validate(
        {
            "purchase_id": 7,
            "reason": "chargeback lost",
            "requested_by": PROCESSOR_REQUESTER,
            "reconcile": reconciliation,
            **fields,
        }
    )


def test_starts_name_the_processor_only_for_a_reconciliation() -> None:
    signed_off = POLICY
    assert start_refusal(signed_off, workflow_id="w", request=reconciliation_request()) is None
    # What the webhook receiver and the sweep start passes.
    started = reconcile_request(7, CHARGEBACK)
    assert start_refusal(signed_off, workflow_id=reconcile_id_for(7), request=started) is None
    # With signing on a reconciliation still needs no signature: the evidence is checked.
    signing = POLICY.model_copy(update={"approver_public_keys": {"sam": "A" * 44}})
    assert start_refusal(signing, workflow_id="w", request=reconciliation_request()) is None
    plain = RefundRequest(purchase_id=7, reason="asked", requested_by=PROCESSOR_REQUESTER)
    assert "reserved" in (start_refusal(signed_off, workflow_id="w", request=plain) or "")
    batch = BatchApproval(batch_workflow_id="batch-1", approvals=[], max_amount_cents=1)
    assert start_refusal(
        signed_off, workflow_id="w", request=reconciliation_request(batch_approval=batch)
    ) == ("a reconciliation carries no batch approval")
    mismatch = Reconciliation(kind="chargeback", processor_object_id="re_7", source="webhook")
    assert start_refusal(signed_off, workflow_id="w", request=reconciliation_request(mismatch)) == (
        "a chargeback reconciliation names a dp_ object"
    )


def dispute(status: str = "lost", charge_id: str = "ch_7", amount: int = PRICE) -> Any:
    return ProcessorDispute(
        id="dp_7", amount_cents=amount, currency="usd", charge_id=charge_id, status=status
    )


def refund(status: str = "succeeded", amount: int = PRICE, **metadata: str) -> ProcessorRefund:
    return ProcessorRefund(
        id="re_7",
        amount_cents=amount,
        currency="usd",
        charge_id="ch_7",
        status=status,
        metadata=metadata,
    )


def test_the_evidence_must_be_a_lost_dispute_of_the_purchase_s_charge() -> None:
    charges = {"ch_7"}
    assert evidence_refusal(CHARGEBACK, charge_ids=charges, dispute=dispute()) is None
    assert "not lost" in (
        evidence_refusal(CHARGEBACK, charge_ids=charges, dispute=dispute("won")) or ""
    )
    assert "of charge ch_9" in (
        evidence_refusal(CHARGEBACK, charge_ids=charges, dispute=dispute(charge_id="ch_9")) or ""
    )
    assert "no such dispute" in (evidence_refusal(CHARGEBACK, charge_ids=charges) or "")
    outside = Reconciliation(kind="external_refund", processor_object_id="re_7", source="webhook")
    assert evidence_refusal(outside, charge_ids=charges, refund=refund()) is None
    ours = refund(refund_request="refund-7/r1")
    assert "OASIS's own" in (evidence_refusal(outside, charge_ids=charges, refund=ours) or "")


def test_money_back_counts_succeeded_refunds_and_lost_disputes() -> None:
    earlier = LedgerEntry(
        processor_refund_id="dp_1", amount_cents=1_000, currency="usd", source="chargeback"
    )
    refunds = [refund(amount=2_000), refund("failed", amount=500), refund("pending", amount=300)]
    assert money_returned(refunds, [earlier], dispute(amount=3_000)) == 6_000
    assert money_returned([], []) == 0


def test_a_reconciliation_revokes_only_when_the_money_back_covers_the_purchase() -> None:
    full = plan_reconciliation(7, snapshot(), returned_cents=PRICE)
    assert full == PlannedRefund(
        amount_cents=0,
        full_refund=True,
        already_refunded=True,
        revoke_progress=True,
        progress_records=4,
        remove_entitlement=True,
        ams_action="remove_via_api",
    )
    partial = plan_reconciliation(7, snapshot(), returned_cents=PRICE - 1)
    assert isinstance(partial, PlannedRefund)
    assert (partial.revoke_progress, partial.remove_entitlement, partial.ams_action) == (
        False,
        False,
        "none",
    )
    assert isinstance(plan_reconciliation(7, None, returned_cents=PRICE), PlanRefusal)


class StubProcessor:
    """The processor as a reconciliation reads it: one charge, no refunds, given disputes."""

    def __init__(self, charge_id: str, disputes: dict[str, ProcessorDispute]) -> None:
        self.charge_id = charge_id
        self.disputes = disputes

    async def get_charge(self, charge_id: str) -> ProcessorCharge:
        return ProcessorCharge(
            id=charge_id,
            amount_cents=PRICE,
            currency="usd",
            amount_refunded_cents=0,
            refunded=False,
        )

    async def get_dispute(self, dispute_id: str) -> ProcessorDispute:
        if dispute_id not in self.disputes:
            raise ProcessorRejected("No such dispute", code="resource_missing", http_status=404)
        return self.disputes[dispute_id]

    async def list_refunds(self, charge_id: str) -> list[ProcessorRefund]:
        return []


def seeded(store: OasisStore) -> tuple[int, str]:
    """A purchase of an OASIS-entitled product with four progress records, and its charge."""
    user = store.create_user(name="Test Buyer", email="buyer@example.test")
    product = store.create_product(code="SELF-1", title="Self-paced", entitlement_source="oasis")
    charge_id = "ch_stub7"
    purchase = store.create_purchase(
        user_id=user,
        product_id=product,
        amount_cents=PRICE,
        currency="usd",
        processor_charge_id=charge_id,
    )
    store.add_progress(user_id=user, product_id=product, items=4)
    return purchase, charge_id


@pytest.mark.parametrize(
    ("status", "amount", "outcome"),
    [("lost", PRICE, "revoke"), ("lost", 3_000, "keep"), ("won", PRICE, "refused")],
)
async def test_a_lost_chargeback_is_planned_and_recorded_as_a_chargeback(
    sqlite_store: OasisStore, status: str, amount: int, outcome: str
) -> None:
    purchase_id, charge_id = seeded(sqlite_store)
    lost = ProcessorDispute(
        id="dp_7", amount_cents=amount, currency="usd", charge_id=charge_id, status=status
    )
    processor: Any = StubProcessor(charge_id, {"dp_7": lost})
    request = reconciliation_request(purchase_id=purchase_id)

    plan = await prepare_reconciliation(
        store=sqlite_store, processor=processor, policy=POLICY, request=request
    )

    if outcome == "refused":
        assert plan == "the processor does not confirm dp_7 (the dispute is won, not lost); " + (
            "nothing changed"
        )
        return
    assert isinstance(plan, RefundPlan) and plan.reconcile is not None
    assert plan.amount_cents == 0 and plan.required_approvals == 1
    assert plan.reconcile.returned_cents == amount
    assert plan.revoke_progress is (outcome == "revoke")
    assert plan.ams_action == ("deactivate_purchase" if outcome == "revoke" else "none")

    activities = RefundActivities(
        store=sqlite_store,
        processor=processor,
        ams=None,  # type: ignore[arg-type]
        notifier=None,  # type: ignore[arg-type]
        policy=POLICY,
    )
    chargeback = LedgerEntry(
        processor_refund_id="dp_7", amount_cents=amount, currency="usd", source="chargeback"
    )
    result = await activities.reconcile_external_refunds(
        ReconcileInput(
            workflow_id="reconcile-7",
            purchase_id=purchase_id,
            charge_id=charge_id,
            chargeback=chargeback,
        )
    )
    assert result.refunded_cents == amount
    assert sqlite_store.ledger_entries(purchase_id) == [chargeback]
    # Reconciled once: a second report of the same dispute is refused on the ledger alone.
    again = await prepare_reconciliation(
        store=sqlite_store, processor=processor, policy=POLICY, request=request
    )
    assert again == "dp_7 is already reconciled; nothing changed"
