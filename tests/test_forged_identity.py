"""Authority comes from checked identities, never from a field in the payload: each test sends
what an attacker with Temporal access can send by hand (a raw start, a signal, an update) and
asserts that no money moved and nothing changed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from refundsaga.contracts import (
    AmsConfirmation,
    ApprovalDecision,
    RefundRequest,
    Resolution,
    SagaState,
)
from refundsaga.signing import (
    generate_private_key,
    public_key_b64,
    sign_decision,
    sign_ops_decision,
    sign_request,
)
from tests.fixtures.temporal import SagaWorld
from tests.test_exactly_once import on_charge
from workflows.refund_saga import RefundSaga

ALICE, BOB, SAM, OLIVIA = (generate_private_key() for _ in range(4))
KEYS = {
    "alice": public_key_b64(ALICE),
    "bob": public_key_b64(BOB),
    "sam": public_key_b64(SAM),
    "olivia": public_key_b64(OLIVIA),
}
SIGNED = pytest.mark.saga_settings(approver_public_keys=KEYS)


def money_moved(world: SagaWorld, charge_id: str) -> int:
    amount: int = world.processor.get_charge(charge_id)["amount_refunded"]
    return amount


@SIGNED
@pytest.mark.parametrize(
    ("signer", "why"),
    [(None, "not signed"), (ALICE, "is not sam's")],
    ids=["unsigned", "alice-as-sam"],
)
async def test_a_start_not_signed_by_its_requester_ends_failed_with_nothing_changed(
    world: SagaWorld, signer: Any, why: str
) -> None:
    purchase = world.seed("standard")
    workflow_id = f"refund-{purchase.purchase_id}-{uuid.uuid4().hex[:8]}"
    request = RefundRequest(purchase_id=purchase.purchase_id, reason="r", requested_by="sam")
    if signer is not None:
        request = sign_request(signer, workflow_id, request)
    handle = await world.client.start_workflow(
        RefundSaga.run, request, id=workflow_id, task_queue=world.task_queue
    )
    result = await handle.result()
    assert result.state == SagaState.FAILED
    assert result.error is not None and why in result.error
    assert result.plan is None and money_moved(world, purchase.charge_id) == 0


@SIGNED
async def test_a_signed_request_starts_one_saga_only(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    workflow_id = f"refund-{purchase.purchase_id}-{uuid.uuid4().hex[:8]}"
    request = sign_request(
        SAM,
        workflow_id,
        RefundRequest(purchase_id=purchase.purchase_id, reason="r", requested_by="sam"),
    )
    first = await world.client.start_workflow(
        RefundSaga.run, request, id=workflow_id, task_queue=world.task_queue
    )
    await world.wait_for(first, SagaState.AWAITING_APPROVAL)
    reject = ApprovalDecision(approver="bob", approve=False)
    signature = sign_decision(BOB, workflow_id, reject, run_id=first.result_run_id or "")
    await first.execute_update(
        RefundSaga.decide, reject.model_copy(update={"signature": signature})
    )
    assert (await first.result()).state == SagaState.REJECTED

    # The signed request, read from the first saga's history, replayed under its workflow id.
    again = await world.client.start_workflow(
        RefundSaga.run, request, id=workflow_id, task_queue=world.task_queue
    )
    result = await again.result()
    assert result.state == SagaState.FAILED
    assert result.error is not None and "already started saga" in result.error
    assert money_moved(world, purchase.charge_id) == 0


@SIGNED
async def test_the_signed_requester_cannot_approve_their_own_refund(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    handle = await world.start(purchase, requested_by="alice", signer=ALICE)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    mine = ApprovalDecision(approver="alice")
    signature = sign_decision(ALICE, handle.id, mine, run_id=handle.result_run_id or "")
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(
            RefundSaga.decide, mine.model_copy(update={"signature": signature})
        )
    assert "four-eyes" in str(refused.value.cause)
    assert (await world.status(handle)).approvals == []
    assert money_moved(world, purchase.charge_id) == 0


async def test_splitting_a_refund_does_not_dodge_the_second_approver(world: SagaWorld) -> None:
    purchase = world.seed("manual_ams")  # 599.00; two approvers from 500.00
    first = await world.start(purchase, amount_cents=29_950)
    waiting = await world.wait_for(first, SagaState.AWAITING_APPROVAL)
    assert waiting.required_approvals == 1
    await first.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    assert (await first.result()).state == SagaState.COMPLETED

    second = await world.start(purchase, amount_cents=29_950)
    waiting = await world.wait_for(second, SagaState.AWAITING_APPROVAL)
    assert waiting.required_approvals == 2
    await second.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    assert (await world.status(second)).state == SagaState.AWAITING_APPROVAL
    assert money_moved(world, purchase.charge_id) == 29_950


async def manual_task(world: SagaWorld, *, requested_by: str) -> Any:
    purchase = world.seed("manual_ams")
    handle = await world.start(purchase, requested_by=requested_by)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    for approver in ("bob", "carol"):
        await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver=approver))
    await world.wait_for(handle, SagaState.AWAITING_AMS_CONFIRMATION)
    return handle


@pytest.mark.parametrize(
    ("requested_by", "operator", "why"),
    [
        ("olivia", "olivia", "four-eyes"),
        ("sam", "sam", "operator allowlist"),
        ("sam", "bob", "operator allowlist"),
    ],
)
async def test_only_an_operator_other_than_the_requester_confirms_an_ams_removal(
    world: SagaWorld, requested_by: str, operator: str, why: str
) -> None:
    handle = await manual_task(world, requested_by=requested_by)
    forged = AmsConfirmation(operator=operator, ams_reference="MADE-UP")
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(RefundSaga.confirm_ams, forged)
    assert why in str(refused.value.cause)
    # The signal path refuses the same and records why; the saga still waits.
    await handle.signal(RefundSaga.confirm_ams_removal, forged)
    status = await world.status(handle)
    for _ in range(200):
        if status.ignored:
            break
        status = await world.status(handle)
    assert [i.by for i in status.ignored] == [operator]
    assert status.state == SagaState.AWAITING_AMS_CONFIRMATION
    assert status.ams.reference is None

    await handle.execute_update(
        RefundSaga.confirm_ams, AmsConfirmation(operator="oscar", ams_reference="AMS-CASE-77")
    )
    assert (await handle.result()).ams.reference == "AMS-CASE-77"


async def test_a_resolve_from_the_requester_or_a_non_operator_is_refused(
    world: SagaWorld,
) -> None:
    # A refund the processor fails puts the saga in NEEDS_ATTENTION at once.
    purchase = on_charge(world, refund_behavior="fail")
    handle = await world.start(purchase, requested_by="olivia")
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    await world.wait_for(handle, SagaState.NEEDS_ATTENTION)
    world.processor.set_refund_behavior(purchase.charge_id, "succeed")
    for operator, why in (("olivia", "four-eyes"), ("bob", "operator allowlist")):
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(
                RefundSaga.resolve_attention, Resolution(action="retry", operator=operator)
            )
        assert why in str(refused.value.cause)
    await handle.execute_update(
        RefundSaga.resolve_attention, Resolution(action="retry", operator="oscar")
    )
    assert (await handle.result()).state == SagaState.COMPLETED
    assert money_moved(world, purchase.charge_id) == purchase.amount_cents


@SIGNED
async def test_with_signing_on_a_resolution_counts_only_signed_for_this_run(
    world: SagaWorld,
) -> None:
    purchase = on_charge(world, refund_behavior="fail")
    handle = await world.start(purchase, signer=SAM)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    approve = ApprovalDecision(approver="bob")
    run_id = handle.result_run_id or ""
    await handle.execute_update(
        RefundSaga.decide,
        approve.model_copy(
            update={"signature": sign_decision(BOB, handle.id, approve, run_id=run_id)}
        ),
    )
    await world.wait_for(handle, SagaState.NEEDS_ATTENTION)
    world.processor.set_refund_behavior(purchase.charge_id, "succeed")
    retry = Resolution(action="retry", operator="olivia")
    forged = {
        "unsigned": (retry, "not signed"),
        "other run": (
            retry.model_copy(
                update={"signature": sign_ops_decision(OLIVIA, handle.id, retry, run_id="x")}
            ),
            "does not match",
        ),
        "abort signed as retry": (
            retry.model_copy(
                update={
                    "signature": sign_ops_decision(
                        OLIVIA,
                        handle.id,
                        retry.model_copy(update={"action": "abort"}),
                        run_id=run_id,
                    )
                }
            ),
            "does not match",
        ),
    }
    for name, (resolution, why) in forged.items():
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(RefundSaga.resolve_attention, resolution)
        assert why in str(refused.value.cause), name
    good = retry.model_copy(
        update={"signature": sign_ops_decision(OLIVIA, handle.id, retry, run_id=run_id)}
    )
    await handle.execute_update(RefundSaga.resolve_attention, good)
    assert (await handle.result()).state == SagaState.COMPLETED


@pytest.fixture
def world(saga_world: SagaWorld) -> SagaWorld:
    return saga_world


async def test_the_audit_trail_keeps_every_run_of_a_purchases_sagas(world: SagaWorld) -> None:
    purchase = world.seed("standard")
    workflow_id = f"refund-{purchase.purchase_id}-{uuid.uuid4().hex[:8]}"
    request = RefundRequest(purchase_id=purchase.purchase_id, reason="r", requested_by="sam")
    runs = []
    for decision in (
        ApprovalDecision(approver="carol", approve=False),
        ApprovalDecision(approver="bob"),
    ):
        # Both sagas of the purchase have the same workflow id, as `refund start` gives them.
        handle = await world.client.start_workflow(
            RefundSaga.run, request, id=workflow_id, task_queue=world.task_queue
        )
        await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
        await handle.execute_update(RefundSaga.decide, decision)
        await handle.result()
        runs.append(handle.result_run_id)

    trail = world.store.purchase_audit(purchase.purchase_id)
    by_run = {
        run: [
            e.event
            for e in trail
            if e.run_id == run and e.event in ("approved", "rejected", "saga_ended")
        ]
        for run in runs
    }
    assert by_run == {runs[0]: ["rejected", "saga_ended"], runs[1]: ["approved", "saga_ended"]}
    assert {e.workflow_id for e in trail} == {workflow_id}

    env = {
        **os.environ,
        "REFUND_DATABASE_URL": world.store.engine.url.render_as_string(hide_password=False),
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "console.cli", "audit", str(purchase.purchase_id), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)["events"]
    assert [(e["run_id"], e["event"]) for e in printed] == [(e.run_id, e.event) for e in trail]
    assert all(e["signed"] is False for e in printed)


@pytest.mark.parametrize(
    "raw",
    [
        {"purchase_id": -5, "reason": "call jane.doe@example.com", "requested_by": "sam"},
        {"purchase_id": "Jane Doe", "reason": "r", "requested_by": "Jane Doe"},
        {"reason": "r"},
    ],
    ids=["negative-id", "names", "missing"],
)
async def test_a_raw_start_with_invalid_input_fails_at_once_without_echoing_it(
    world: SagaWorld, raw: dict[str, Any]
) -> None:
    handle = await world.client.start_workflow(
        "RefundSaga", raw, id=f"raw-{uuid.uuid4().hex[:8]}", task_queue=world.task_queue
    )
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "InvalidMessage"
    assert cause.message.startswith("invalid RefundRequest: ")
    history = (await handle.fetch_history()).to_json()
    failure = history[history.index("workflowExecutionFailedEventAttributes") :]
    for typed in ("jane", "Jane", "-5"):
        assert typed not in cause.message and typed not in failure
