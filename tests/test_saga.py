"""Every path of the RefundSaga on the real time-skipping server, with the real activities,
the processor and AMS sandboxes over HTTP and a migrated store. Assertions are on outcomes:
money at the processor, rows in the store, entitlements in the AMS, the saga's state."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    WithStartWorkflowOperation,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy

from console.operations import start_refund
from refundsaga.contracts import (
    AmsConfirmation,
    ApprovalDecision,
    RefundRequest,
    Resolution,
    SagaState,
    SagaStatus,
    WaitingFor,
)
from refundsaga.processor_events import PROCESSOR_EVENT_SIGNAL, ProcessorEvent
from refundsaga.search_attributes import REFUND_AMOUNT_CENTS, REFUND_STATE, WAITING_FOR
from tests.fixtures.temporal import SagaWorld, listed_states, patch_trail
from workflows.refund_saga import RefundSaga


def processor_refunds(world: SagaWorld, charge_id: str) -> tuple[int, int]:
    """(amount refunded, number of refunds) as the processor holds them."""
    charge = world.processor.get_charge(charge_id)
    return charge["amount_refunded"], len(charge["refunds"]["data"])


async def meaningful_events(handle: WorkflowHandle[Any, Any]) -> list[str]:
    """The history's event types, without workflow-task bookkeeping."""
    history = await handle.fetch_history()
    names = [EventType.Name(e.event_type) for e in history.events]
    return [n for n in names if "WORKFLOW_TASK" not in n]


async def test_standard_full_refund_completes_and_removes_every_access(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase)

    waiting = await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    assert waiting.waiting_for == WaitingFor.APPROVAL
    assert waiting.plan is not None
    assert waiting.plan.amount_cents == purchase.amount_cents
    assert waiting.plan.progress_records == 6
    assert waiting.plan.ams_action == "remove_via_api"
    assert processor_refunds(world, purchase.charge_id) == (0, 0)

    receipt = await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    assert receipt.approvals == 1
    result = await handle.result()

    assert result.state == SagaState.COMPLETED
    assert result.branch == "refund"
    assert result.refund.source == "processor"
    assert result.refund.amount_cents == purchase.amount_cents
    assert processor_refunds(world, purchase.charge_id) == (purchase.amount_cents, 1)
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None
    assert snapshot.refunded_cents == purchase.amount_cents
    assert snapshot.status == "refunded"
    assert snapshot.progress_count == 0
    assert world.store.archived_progress(workflow_id=handle.id) == 6
    assert result.progress_deleted == 6
    assert world.ams.entitlements(purchase.ams_member_id or "") == []
    assert result.ams.state == "removed"
    assert result.access is not None and not result.access.has_access
    # Started without search attributes (as a batch starts its sagas): lists learn the start,
    # the rest, the pivot and the end, not every step after the pivot.
    assert await listed_states(handle) == [
        "PREPARING",
        "AWAITING_APPROVAL",
        "REFUNDING",
        "COMPLETED",
    ]
    events = [e.event for e in world.store.audit_trail(workflow_id=handle.id)]
    assert "refund_recorded" in events and "progress_revoked" in events
    assert "approved" in events and events[-1] == "saga_ended"
    assert "approval_requested" in world.notifier.kinds(handle.id)


async def test_already_refunded_at_processor_moves_no_money_and_records_external(
    world: SagaWorld,
) -> None:
    purchase = world.seed("already_refunded")
    handle = await world.start(purchase)
    waiting = await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    assert waiting.plan is not None and waiting.plan.already_refunded
    assert waiting.plan.amount_cents == 0

    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="carol"))
    result = await handle.result()

    assert result.state == SagaState.COMPLETED
    assert result.branch == "already_refunded"
    assert result.refund.source == "external"
    # Only the refund made outside OASIS exists at the processor.
    assert processor_refunds(world, purchase.charge_id) == (purchase.amount_cents, 1)
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.status == "refunded"
    assert snapshot.refunded_cents == purchase.amount_cents and snapshot.progress_count == 0
    assert world.ams.entitlements(purchase.ams_member_id or "") == []


async def test_already_refunded_discovered_at_the_refund_call_takes_the_branch(
    world: SagaWorld,
) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    # Someone refunds in the processor's dashboard while the saga waits for approval.
    world.processor.refund_outside(purchase.charge_id)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    result = await handle.result()

    assert result.state == SagaState.COMPLETED
    assert result.branch == "already_refunded"
    assert processor_refunds(world, purchase.charge_id) == (purchase.amount_cents, 1)
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.refunded_cents == purchase.amount_cents


async def test_partial_refund_keeps_progress_and_entitlement(world: SagaWorld) -> None:
    purchase = world.seed("partial")
    handle = await world.start(purchase, amount_cents=2_500)
    waiting = await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    assert waiting.plan is not None
    assert not waiting.plan.revoke_progress and not waiting.plan.remove_entitlement
    await handle.signal(RefundSaga.approve, ApprovalDecision(approver="alice"))
    result = await handle.result()

    assert result.state == SagaState.COMPLETED
    assert processor_refunds(world, purchase.charge_id) == (2_500, 1)
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None
    assert snapshot.status == "partially_refunded" and snapshot.refunded_cents == 2_500
    assert snapshot.progress_count == 4
    assert world.ams.entitlements(purchase.ams_member_id or "") == [purchase.ams_product_code]
    assert result.access is not None and result.access.has_access
    assert result.ams.state == "not_needed"


async def test_partial_refund_can_ask_for_revoke_and_removal(world: SagaWorld) -> None:
    purchase = world.seed("partial")
    handle = await world.start(
        purchase, amount_cents=1_000, revoke_progress=True, remove_entitlement=True
    )
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="alice"))
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    assert result.progress_deleted == 4
    assert world.ams.entitlements(purchase.ams_member_id or "") == []
    assert result.access is not None and not result.access.has_access


async def test_oasis_entitled_product_ends_the_purchase_entitlement(world: SagaWorld) -> None:
    purchase = world.seed("oasis_entitled")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    assert result.ams.mode == "oasis"
    facts = world.store.access_facts(purchase.user_id, purchase.product_id)
    assert facts.progress_count == 0 and not facts.active_purchase
    assert result.access is not None and not result.access.has_access


async def test_pending_refund_is_followed_until_it_settles(world: SagaWorld) -> None:
    purchase = world.seed("pending_refund")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    charge = world.processor.get_charge(purchase.charge_id)
    assert [r["status"] for r in charge["refunds"]["data"]] == ["succeeded"]
    assert any("pending" in t.outcome for t in result.timeline)


async def test_pending_refund_that_fails_needs_attention_and_abort_ends_failed(
    world: SagaWorld,
) -> None:
    charge = world.processor.create_charge(
        9_995, refund_behavior="pending_fail", settle_after_polls=1
    )
    purchase = world.seed("standard")
    # Re-point the purchase at a charge whose refund will fail after pending.
    from sqlalchemy import text

    with world.store.engine.begin() as conn:
        conn.execute(
            text("UPDATE purchases SET processor_charge_id = :c WHERE id = :p"),
            {"c": charge["id"], "p": purchase.purchase_id},
        )
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    refund_id = None
    for _ in range(2000):
        refund_id = (await world.status(handle)).refund.pending_refund_id
        if refund_id:
            break
        await asyncio.sleep(0.025)
    assert refund_id is not None
    # The processor reports the change (a webhook): the saga reads the refund, now failed.
    await handle.signal(PROCESSOR_EVENT_SIGNAL, ProcessorEvent(refund_id=refund_id))
    status = await world.wait_for(handle, SagaState.NEEDS_ATTENTION)
    assert status.waiting_for == WaitingFor.OPS
    assert status.error is not None and "RefundFailed" in status.error
    await handle.execute_update(
        RefundSaga.resolve_attention, Resolution(action="abort", operator="olivia", note="call")
    )
    result = await handle.result()
    assert result.state == SagaState.FAILED
    assert result.resolutions[0].action == "abort"
    assert world.processor.get_charge(charge["id"])["amount_refunded"] == 0
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.refunded_cents == 0 and snapshot.progress_count == 6


async def test_rejection_changes_nothing(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.signal(RefundSaga.reject, ApprovalDecision(approver="carol", comment="dup"))
    result = await handle.result()
    assert result.state == SagaState.REJECTED
    assert processor_refunds(world, purchase.charge_id) == (0, 0)
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.progress_count == 6 and snapshot.status == "active"
    assert world.ams.entitlements(purchase.ams_member_id or "") == [purchase.ams_product_code]
    events = [e.event for e in world.store.audit_trail(workflow_id=handle.id)]
    assert events == ["rejected", "saga_ended"]


async def test_no_decision_expires_after_the_timeout_with_reminders(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase)
    result = await handle.result()  # the time-skipping server jumps through the 72 hours
    assert result.state == SagaState.EXPIRED
    assert processor_refunds(world, purchase.charge_id) == (0, 0)
    kinds = world.notifier.kinds(handle.id)
    assert kinds.count("approval_reminder") == 2  # at 24 h and 48 h; expiry at 72 h
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.progress_count == 6


async def test_invalid_requests_fail_before_approval_with_a_clear_reason(
    world: SagaWorld,
) -> None:
    purchase = world.seed("standard")
    cases: list[tuple[int, dict[str, Any], str]] = [
        (999_999, {}, "purchase 999999 does not exist"),
        (purchase.purchase_id, {"amount_cents": 10**7}, "exceeds the unrefunded"),
        (purchase.purchase_id, {"currency": "eur"}, "does not match"),
    ]
    for purchase_id, request, reason in cases:
        handle = await world.start(purchase_id, **request)
        result = await handle.result()
        assert result.state == SagaState.FAILED
        assert result.error is not None and reason in result.error
        assert result.approvals == []
    assert processor_refunds(world, purchase.charge_id) == (0, 0)
    assert world.notifier.kinds(world.handles[0].id) == ["saga_ended"]


async def test_approval_validator_refuses_without_touching_history(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase, requested_by="alice")
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    # Settled: the approval request went out and the reminder timer runs.
    for _ in range(200):
        events_before = await meaningful_events(handle)
        if events_before[-1] == "EVENT_TYPE_TIMER_STARTED":
            break
        await asyncio.sleep(0.025)
    refusals = {
        "alice": "four-eyes",
        "mallory": "not on the approver allowlist",
    }
    for approver, reason in refusals.items():
        with pytest.raises(WorkflowUpdateFailedError) as info:
            await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver=approver))
        assert reason in str(info.value.cause)
    # Nothing accepted, nothing scheduled: only (speculative) workflow tasks may differ.
    assert await meaningful_events(handle) == events_before
    # The same refusal by signal is recorded as ignored and changes nothing.
    await handle.signal(RefundSaga.approve, ApprovalDecision(approver="alice"))
    status = await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    for _ in range(100):
        if status.ignored:
            break
        status = await world.status(handle)
    assert [(i.by, "four-eyes" in i.reason) for i in status.ignored] == [("alice", True)]
    assert status.approvals == []
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    with pytest.raises(WorkflowUpdateFailedError):
        await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="carol"))
    assert (await handle.result()).state == SagaState.COMPLETED


async def test_dual_approval_above_the_threshold_needs_two_distinct_approvers(
    world: SagaWorld,
) -> None:
    purchase = world.seed("manual_ams")  # 599.00, above the 500.00 threshold
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    receipt = await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    assert (receipt.approvals, receipt.required_approvals) == (1, 2)
    assert receipt.state == SagaState.AWAITING_APPROVAL
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    assert "already decided" in str(info.value.cause)
    assert processor_refunds(world, purchase.charge_id) == (0, 0)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="carol"))
    await world.wait_for(handle, SagaState.AWAITING_AMS_CONFIRMATION)
    assert processor_refunds(world, purchase.charge_id) == (purchase.amount_cents, 1)
    await handle.terminate("test over")


@pytest.mark.saga_settings(
    ams_reminder_every=timedelta(seconds=1), ams_escalate_after=timedelta(seconds=2)
)
async def test_manual_ams_waits_for_confirmation_with_reminders_and_escalation(
    world: SagaWorld,
) -> None:
    purchase = world.seed("manual_ams")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="carol"))
    status = await world.wait_for(handle, SagaState.AWAITING_AMS_CONFIRMATION)
    assert status.waiting_for == WaitingFor.AMS_CONFIRMATION
    assert "ams_task_opened" in world.notifier.kinds(handle.id)

    # Short policy timers (set below) fire in real time while the test polls.
    for _ in range(400):
        kinds = world.notifier.kinds(handle.id)
        if kinds.count("ams_task_reminder") >= 2 and "ams_task_escalated" in kinds:
            break
        await asyncio.sleep(0.05)
    assert kinds.count("ams_task_reminder") >= 2
    assert kinds.count("ams_task_escalated") == 1
    assert (await world.status(handle)).state == SagaState.AWAITING_AMS_CONFIRMATION

    # A person removes it in the AMS by hand, then confirms.
    with pytest.raises(WorkflowUpdateFailedError):
        await handle.execute_update(
            RefundSaga.decide, ApprovalDecision(approver="alice")
        )  # wrong state
    receipt = await handle.execute_update(
        RefundSaga.confirm_ams,
        AmsConfirmation(operator="olivia", ams_reference="AMS-CASE-77"),
    )
    assert receipt.message == "AMS removal confirmed"
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    assert result.ams.state == "confirmed" and result.ams.reference == "AMS-CASE-77"
    assert result.access is not None and not result.access.has_access
    assert processor_refunds(world, purchase.charge_id) == (purchase.amount_cents, 1)


@pytest.mark.timeout(600)
async def test_ams_outage_needs_attention_then_ops_retry_completes(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    world.ams.set_faults(error_rate=1.0, seed=1, paths=["/v1/members"])
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    # The 8 retries take about two minutes of real backoff. No time skipping here: with no
    # timer pending in NEEDS_ATTENTION, an awaited result() lets the test server jump to the
    # end of time and close the saga.
    status = await world.wait_for(handle, SagaState.NEEDS_ATTENTION, tries=12_000)
    assert status.error is not None and status.error.startswith("deentitle")
    assert "needs_attention" in world.notifier.kinds(handle.id)
    # The money moved exactly once, and stays moved.
    assert processor_refunds(world, purchase.charge_id) == (purchase.amount_cents, 1)
    # A confirmation now is the wrong message for this state: ignored, with the reason.
    await handle.signal(
        RefundSaga.confirm_ams_removal, AmsConfirmation(operator="olivia", ams_reference="x")
    )
    for _ in range(200):
        status = await world.status(handle)
        if status.ignored:
            break
        await asyncio.sleep(0.025)
    assert [(i.kind, i.by) for i in status.ignored] == [("confirm_ams_removal", "olivia")]
    assert status.state == SagaState.NEEDS_ATTENTION
    world.ams.clear_faults()
    await handle.execute_update(
        RefundSaga.resolve_attention, Resolution(action="retry", operator="olivia")
    )
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    assert world.ams.entitlements(purchase.ams_member_id or "") == []
    assert [r.action for r in result.resolutions] == ["retry"]
    events = [e.event for e in world.store.audit_trail(workflow_id=handle.id)]
    assert "ops_retry" in events
    # Lists saw the rest and the step it resumed, then the end.
    assert (await listed_states(handle))[-3:] == ["NEEDS_ATTENTION", "DEENTITLING", "COMPLETED"]


async def test_access_still_granted_needs_attention_naming_why_and_skip_completes(
    world: SagaWorld,
) -> None:
    purchase = world.seed("oasis_entitled")
    # The same user bought the product twice: refunding one purchase leaves the other active.
    charge = world.processor.create_charge(purchase.amount_cents)
    world.store.create_purchase(
        user_id=purchase.user_id,
        product_id=purchase.product_id,
        amount_cents=purchase.amount_cents,
        currency="usd",
        processor_charge_id=charge["id"],
    )
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    status = await world.wait_for(handle, SagaState.NEEDS_ATTENTION, tries=2000)
    assert status.error == "verify: AccessNotRevoked: user still has access via: oasis_purchase"
    await handle.signal(RefundSaga.resolve, Resolution(action="skip", operator="olivia"))
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    assert result.access is not None and result.access.reasons == ["oasis_purchase"]
    assert [(r.step, r.action) for r in result.resolutions] == [("verify", "skip")]


async def test_cancel_before_the_pivot_releases_with_nothing_changed(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    status = await world.status(handle)
    assert status.state == SagaState.CANCELLED
    assert processor_refunds(world, purchase.charge_id) == (0, 0)
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.progress_count == 6
    events = [e.event for e in world.store.audit_trail(workflow_id=handle.id)]
    assert events == ["saga_ended"]


async def start_for_the_plan(
    world: SagaWorld, purchase_id: int
) -> tuple[SagaStatus, WorkflowHandle[RefundSaga, SagaStatus]]:
    """Start a saga and wait for its plan in one call (update-with-start of `planned`)."""
    start = WithStartWorkflowOperation(
        RefundSaga.run,
        RefundRequest(purchase_id=purchase_id, reason="customer asked", requested_by="sam"),
        id=f"refund-{purchase_id}-{uuid.uuid4().hex[:8]}",
        task_queue=world.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
    )
    # By name, as the CLI sends it.
    planned: SagaStatus = await world.client.execute_update_with_start_workflow(
        "planned", start_workflow_operation=start, result_type=SagaStatus
    )
    handle = await start.workflow_handle()
    world.handles.append(handle)
    return planned, handle


async def test_the_plan_comes_back_with_the_start(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    planned, handle = await start_for_the_plan(world, purchase.purchase_id)

    assert planned.state == SagaState.AWAITING_APPROVAL
    assert planned.plan is not None
    assert planned.plan.amount_cents == purchase.amount_cents
    assert planned.plan.progress_records == 6
    assert planned.plan.ams_action == "remove_via_api"
    assert planned.required_approvals == 1
    assert planned == await world.status(handle)  # what the status query says
    assert processor_refunds(world, purchase.charge_id) == (0, 0)

    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    assert (await handle.result()).state == SagaState.COMPLETED


async def test_a_refused_start_answers_planned_with_its_end(world: SagaWorld) -> None:
    planned, handle = await start_for_the_plan(world, 999_999)
    assert planned.state == SagaState.FAILED
    assert planned.plan is None
    assert planned.error is not None and "purchase 999999 does not exist" in planned.error
    assert (await handle.result()).state == SagaState.FAILED


@pytest.mark.saga_settings(auto_approve_below_cents=10_000)
async def test_auto_approval_below_the_threshold_needs_no_approver(world: SagaWorld) -> None:
    purchase = world.seed("oasis_entitled")  # 49.00, below the 100.00 auto-approval
    handle = await world.start(purchase)
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    assert result.required_approvals == 0 and result.approvals == []
    assert processor_refunds(world, purchase.charge_id) == (purchase.amount_cents, 1)
    assert "approval_requested" not in world.notifier.kinds(handle.id)


@pytest.mark.saga_settings(auto_approve_below_cents=10_000)
async def test_lists_learn_the_pivot_and_the_end_of_a_saga_started_with_attributes(
    world: SagaWorld,
) -> None:
    purchase = world.seed("oasis_entitled")  # auto-approved
    handle = await start_refund(  # as `refund start` and starter.py do
        world.client,
        world.settings.model_copy(update={"task_queue": world.task_queue}),
        RefundRequest(purchase_id=purchase.purchase_id, reason="dup", requested_by="sam"),
    )
    world.handles.append(handle)
    assert (await handle.result()).state == SagaState.COMPLETED
    # PREPARING came with the start (as `refund start` sets it): no upsert for it.
    assert await listed_states(handle) == ["REFUNDING", "COMPLETED"]
    # The 1.0 saga asks no patch: no marker, no version upsert.
    assert await patch_trail(handle) == ([], [])
    listed = (await handle.describe()).typed_search_attributes
    assert listed.get(REFUND_STATE) == "COMPLETED"
    assert listed.get(REFUND_AMOUNT_CENTS) == purchase.amount_cents
    assert listed.get(WAITING_FOR) == "none"


@pytest.mark.saga_settings(auto_approve_below_cents=10_000)
async def test_a_saga_started_without_attributes_lists_itself_and_asks_no_patch(
    world: SagaWorld,
) -> None:
    purchase = world.seed("oasis_entitled")
    handle = await world.start(purchase)  # no search attributes at the start
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    assert processor_refunds(world, purchase.charge_id) == (purchase.amount_cents, 1)
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.status == "refunded"
    assert await patch_trail(handle) == ([], [])
    # The store steps run as local activities: none is scheduled on the task queue.
    history = await handle.fetch_history()
    scheduled = {
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }
    assert scheduled == {"prepare_refund", "refund_at_processor", "verify_access"}
    assert await listed_states(handle) == ["PREPARING", "REFUNDING", "COMPLETED"]


async def test_a_signal_after_the_end_is_refused(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.signal(RefundSaga.reject, ApprovalDecision(approver="bob"))
    assert (await handle.result()).state == SagaState.REJECTED
    with pytest.raises(Exception, match=r"(?i)completed|not found|closed"):
        await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="carol"))


@pytest.fixture
def world(saga_world: SagaWorld) -> SagaWorld:
    return saga_world
