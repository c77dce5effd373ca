"""Every path of the RefundSaga on the real time-skipping server, with the real activities,
the processor and AMS sandboxes over HTTP and a migrated store. Assertions are on outcomes:
money at the processor, rows in the store, entitlements in the AMS, the saga's state."""

from __future__ import annotations

from datetime import timedelta

import pytest
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError

from refundsaga.contracts import (
    AmsConfirmation,
    ApprovalDecision,
    Resolution,
    SagaState,
    WaitingFor,
)
from tests.fixtures.temporal import SagaWorld
from workflows.refund_saga import RefundSaga


def processor_refunds(world: SagaWorld, charge_id: str) -> tuple[int, int]:
    """(amount refunded, number of refunds) as the processor holds them."""
    charge = world.processor.get_charge(charge_id)
    return charge["amount_refunded"], len(charge["refunds"]["data"])


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
    events = [e.event for e in world.store.audit_trail(workflow_id=handle.id)]
    assert "refund_recorded" in events and "progress_revoked" in events
    assert "approved" in events and events[-1] == "saga_ended"
    assert "approval_requested" in world.notifier.kinds(handle.id)


@pytest.fixture
def world(saga_world: SagaWorld) -> SagaWorld:
    return saga_world
