"""Money moves exactly once, against a processor that behaves like Stripe: the request's
identity survives retries, resets and forgotten keys; a second saga is refused by the store;
no status that moved no money ever reaches the ledger or a revoke.

Each test injects the fault in the processor sandbox and counts the money at the processor,
in the ledger and in the store, on the real time-skipping server.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from activities.errors import translated
from console.seed import SeededPurchase
from refundsaga.contracts import ApprovalDecision, Resolution, SagaState
from refundsaga.models import LedgerEntry
from refundsaga.processor import ProcessorUnavailable
from refundsaga.store.schema import Refund, RefundClaim
from tests.fixtures.temporal import SagaWorld
from workflows.refund_saga import RefundSaga

DAY_S = 86_400


def refunds_at_processor(world: SagaWorld, charge_id: str) -> list[dict[str, Any]]:
    """The charge's refunds as the processor holds them, newest first."""
    refunds: list[dict[str, Any]] = world.processor.get_charge(charge_id)["refunds"]["data"]
    return refunds


def ledger(world: SagaWorld, purchase_id: int) -> list[tuple[str, int, str]]:
    """(processor refund id, amount, status) of the purchase's ledger rows."""
    with world.store.engine.begin() as db:
        rows = db.execute(
            select(Refund.processor_refund_id, Refund.amount_cents, Refund.status).where(
                Refund.purchase_id == purchase_id
            )
        ).all()
    return sorted((r[0], r[1], r[2]) for r in rows)


def claims(world: SagaWorld, purchase_id: int) -> list[str]:
    with world.store.engine.begin() as db:
        return list(
            db.execute(
                select(RefundClaim.workflow_id).where(RefundClaim.purchase_id == purchase_id)
            ).scalars()
        )


def assert_ledger_equals_processor(world: SagaWorld, purchase: SeededPurchase) -> None:
    held = sorted(
        (r["id"], r["amount"], r["status"])
        for r in refunds_at_processor(world, purchase.charge_id)
        if r["status"] == "succeeded"
    )
    assert [row for row in ledger(world, purchase.purchase_id) if row[2] == "succeeded"] == held


def on_charge(world: SagaWorld, **charge: Any) -> SeededPurchase:
    """A standard purchase re-pointed at a new charge of the same amount with `charge`'s
    settings (e.g. refund_behavior)."""
    purchase = world.seed("standard")
    created = world.processor.create_charge(purchase.amount_cents, **charge)
    with world.store.engine.begin() as db:
        db.execute(
            text("UPDATE purchases SET processor_charge_id = :c WHERE id = :p"),
            {"c": created["id"], "p": purchase.purchase_id},
        )
    return purchase.model_copy(update={"charge_id": created["id"]})


def sandbox_admin(world: SagaWorld, path: str, body: dict[str, Any]) -> Any:
    response = world.processor.http.post(path, json=body)
    response.raise_for_status()
    return response.json()


async def reach(world: SagaWorld, handle: Any, state: SagaState) -> Any:
    """Skip time through retry backoffs until the saga is in `state` (queries skip none)."""
    for _ in range(60):
        status = await world.status(handle)
        if status.state == state:
            return status
        await world.env.sleep(timedelta(seconds=30))
    raise AssertionError(f"saga stayed {status.state}, never reached {state}")


async def approved(world: SagaWorld, purchase: SeededPurchase, **request: Any) -> Any:
    handle = await world.start(purchase, **request)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    return handle


async def test_a_second_saga_for_a_purchase_fails_and_moves_no_money(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    first = await world.start(purchase)
    await world.wait_for(first, SagaState.AWAITING_APPROVAL)

    # Started around the CLI, under another workflow id: the store refuses it at prepare.
    second = await world.start(purchase, reason="raw start")
    refused = await second.result()
    assert refused.state == SagaState.FAILED
    assert refused.error is not None and "already has a refund in flight" in refused.error
    assert first.id in refused.error
    assert refused.approvals == [] and refused.plan is None
    assert claims(world, purchase.purchase_id) == [first.id]

    await first.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    done = await first.result()
    assert done.state == SagaState.COMPLETED
    assert [r["amount"] for r in refunds_at_processor(world, purchase.charge_id)] == [
        purchase.amount_cents
    ]
    assert_ledger_equals_processor(world, purchase)
    assert claims(world, purchase.purchase_id) == []


async def test_the_refund_step_sends_nothing_the_ledger_does_not_allow(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    # While the saga waits, the whole amount is recorded as refunded elsewhere.
    world.store.record_refunds(
        purchase.purchase_id,
        [
            LedgerEntry(
                processor_refund_id="re_elsewhere",
                amount_cents=purchase.amount_cents,
                currency="usd",
                source="external",
            )
        ],
        workflow_id=None,
    )
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    result = await handle.result()

    assert result.state == SagaState.FAILED
    assert result.error is not None and "ledger has left" in result.error
    assert refunds_at_processor(world, purchase.charge_id) == []
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.progress_count == 6


async def test_an_ops_retry_after_the_processor_forgot_the_key_adopts_the_refund(
    world: SagaWorld,
) -> None:
    purchase = world.seed("partial")
    handle = await world.start(purchase, amount_cents=2_500)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    # Every answer about refunds is lost: the refund is made, the saga never learns it.
    world.processor.set_faults(lost_response_rate=1.0, paths=["/v1/refunds"])
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    await reach(world, handle, SagaState.NEEDS_ATTENTION)
    world.processor.clear_faults()
    assert [r["amount"] for r in refunds_at_processor(world, purchase.charge_id)] == [2_500]

    # A day later the processor has pruned the idempotency key; ops retry.
    sandbox_admin(world, "/_sandbox/clock", {"advance_s": DAY_S + 60})
    await handle.execute_update(
        RefundSaga.resolve_attention, Resolution(action="retry", operator="olivia")
    )
    result = await handle.result()

    assert result.state == SagaState.COMPLETED
    assert [r["amount"] for r in refunds_at_processor(world, purchase.charge_id)] == [2_500]
    assert_ledger_equals_processor(world, purchase)


@pytest.mark.parametrize("behavior", ["fail", "canceled"])
async def test_a_refund_that_moved_no_money_revokes_nothing_and_retry_sends_one_new_refund(
    world: SagaWorld, behavior: str
) -> None:
    purchase = on_charge(world, refund_behavior=behavior)
    handle = await approved(world, purchase)
    status = await world.wait_for(handle, SagaState.NEEDS_ATTENTION)
    assert status.error is not None and "no money moved" in status.error
    # Nothing after the pivot ran: no ledger row says succeeded, progress is untouched.
    assert [row[2] for row in ledger(world, purchase.purchase_id)] == []
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.progress_count == 6
    assert world.ams.entitlements(purchase.ams_member_id or "") != []
    # Skipping the pivot would revoke access although no money moved.
    with pytest.raises(WorkflowUpdateFailedError):
        await handle.execute_update(
            RefundSaga.resolve_attention, Resolution(action="skip", operator="olivia")
        )

    sandbox_admin(
        world,
        f"/_sandbox/charges/{purchase.charge_id}/refund_behavior",
        {"refund_behavior": "succeed"},
    )
    await handle.execute_update(
        RefundSaga.resolve_attention, Resolution(action="retry", operator="olivia")
    )
    result = await handle.result()

    assert result.state == SagaState.COMPLETED
    statuses = sorted(r["status"] for r in refunds_at_processor(world, purchase.charge_id))
    assert statuses == sorted(["succeeded", "failed" if behavior == "fail" else "canceled"])
    assert world.processor.get_charge(purchase.charge_id)["amount_refunded"] == (
        purchase.amount_cents
    )
    assert_ledger_equals_processor(world, purchase)


async def test_a_refund_that_requires_action_waits_then_is_adopted_once_it_succeeds(
    world: SagaWorld,
) -> None:
    purchase = on_charge(world, refund_behavior="requires_action")
    handle = await approved(world, purchase)
    status = await world.wait_for(handle, SagaState.NEEDS_ATTENTION)
    assert status.error is not None and "requires action" in status.error
    assert ledger(world, purchase.purchase_id) == []
    (waiting,) = refunds_at_processor(world, purchase.charge_id)
    assert waiting["status"] == "requires_action"

    # Retried while still waiting at the processor: adopted, not sent again.
    await handle.execute_update(
        RefundSaga.resolve_attention, Resolution(action="retry", operator="olivia")
    )
    await asyncio.sleep(0.2)
    await world.wait_for(handle, SagaState.NEEDS_ATTENTION)
    assert len(refunds_at_processor(world, purchase.charge_id)) == 1

    world.processor.settle(waiting["id"], "succeeded")
    await handle.execute_update(
        RefundSaga.resolve_attention, Resolution(action="retry", operator="olivia")
    )
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    assert [r["id"] for r in refunds_at_processor(world, purchase.charge_id)] == [waiting["id"]]
    assert_ledger_equals_processor(world, purchase)


async def test_a_saved_500_that_executed_is_found_and_adopted(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    # The refund is made, then Stripe saves a 500 under the key and says not to retry.
    world.processor.set_faults(executed_saved_error_rate=1.0, paths=["/v1/refunds"])
    world.processor.clear_requests()
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    result = await handle.result()
    world.processor.clear_faults()

    assert result.state == SagaState.COMPLETED
    assert [r["amount"] for r in refunds_at_processor(world, purchase.charge_id)] == [
        purchase.amount_cents
    ]
    posts = [r for r in world.processor.requests() if r["method"] == "POST"]
    assert len(posts) == 1  # the saved answer was not asked again and again
    assert_ledger_equals_processor(world, purchase)


async def test_saved_500s_take_new_keys_then_ops_and_money_moves_once(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    # Nothing executes; each key's 500 is saved and replayed.
    world.processor.set_faults(saved_error_rate=1.0, paths=["/v1/refunds"])
    world.processor.clear_requests()
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    status = await reach(world, handle, SagaState.NEEDS_ATTENTION)
    assert status.error is not None and "ProcessorRequestSpent" in status.error
    keys = [r["idempotency_key"] for r in world.processor.requests() if r["method"] == "POST"]
    assert len(keys) == len(set(keys)) == 4  # the first key and three new ones, each sent once
    assert refunds_at_processor(world, purchase.charge_id) == []

    world.processor.clear_faults()
    await handle.execute_update(
        RefundSaga.resolve_attention, Resolution(action="retry", operator="olivia")
    )
    result = await handle.result()
    assert result.state == SagaState.COMPLETED
    assert len(refunds_at_processor(world, purchase.charge_id)) == 1
    assert_ledger_equals_processor(world, purchase)


async def test_a_429_storm_refunds_exactly_once(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    world.processor.set_faults(rate_limit_rate=0.35, retry_after_s=2, seed=7, paths=["/v1/"])
    world.processor.clear_requests()
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    result = await handle.result()
    limited = [r for r in world.processor.requests() if r["status"] == 429]
    world.processor.clear_faults()

    assert result.state == SagaState.COMPLETED
    assert limited, "the storm never struck"
    assert len(refunds_at_processor(world, purchase.charge_id)) == 1
    assert_ledger_equals_processor(world, purchase)


def test_a_429s_retry_after_paces_the_activitys_next_attempt() -> None:
    with pytest.raises(ApplicationError) as caught, translated():
        raise ProcessorUnavailable("Too many requests", http_status=429, retry_after_s=7)
    assert not caught.value.non_retryable
    assert caught.value.next_retry_delay == timedelta(seconds=7)


async def test_the_request_identity_is_the_first_run_and_names_the_refund(
    world: SagaWorld,
) -> None:
    purchase = world.seed("standard")
    world.processor.clear_requests()
    handle = await approved(world, purchase)
    result = await handle.result()
    # Two processor calls per refund on the happy path: the charge read and the refund.
    calls = [(r["method"], r["path"], r["idempotency_key"]) for r in world.processor.requests()]
    description = await handle.describe()
    assert result.request_id == f"{handle.id}/{description.run_id}"
    assert calls == [
        ("GET", f"/v1/charges/{purchase.charge_id}", None),
        ("POST", "/v1/refunds", f"{result.request_id}/refund"),
    ]
    (refund,) = refunds_at_processor(world, purchase.charge_id)
    assert refund["metadata"]["refund_request"] == result.request_id


@pytest.fixture
def world(saga_world: SagaWorld) -> SagaWorld:
    return saga_world
