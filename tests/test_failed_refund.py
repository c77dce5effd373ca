"""A refund the processor fails after its saga completed: the ledger rule on SQLite and
PostgreSQL, and FailedRefundTask on the time-skipping server with the real activities, the
store and a processor sandbox served in-process, whose state the tests fail refunds in."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select, update
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle, WorkflowHistory, WorkflowUpdateFailedError
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from console import failed_refunds
from console.operations import Refused
from console.seed import SeededPurchase, seed_purchase
from refundsaga import search_attributes as sa
from refundsaga.contracts import (
    ApprovalDecision,
    RefundRequest,
    RestoreRequest,
    RestoreState,
    RestoreStatus,
    SagaState,
    SagaStatus,
)
from refundsaga.failed_refunds import (
    DECIDE_UPDATE,
    FailedRefundDecision,
    FailedRefundState,
    FailedRefundStatus,
)
from refundsaga.ids import failed_refund_id_for, restore_id_for, workflow_id_for
from refundsaga.models import LedgerEntry
from refundsaga.processor_events import FailedRefund
from refundsaga.settings import Settings
from refundsaga.signing import (
    generate_private_key,
    public_key_b64,
    sign_decision,
    sign_failed_refund_decision,
    sign_request,
    write_private_key,
)
from refundsaga.store import OasisStore
from refundsaga.store.late_failures import (
    LATE_FAILURE_EVENT,
    LateFailureRefused,
    record_late_failure,
    status_after_failure,
)
from refundsaga.store.schema import ProgressArchive, Refund
from refundsaga.temporal import connect, payload_data_converter
from sandboxes import processor as processor_app
from tests.fixtures.batch import batch_time_env
from tests.fixtures.sandboxes import ProcessorSandbox, admin_client, serve_app
from tests.fixtures.stack import LiveStack
from tests.fixtures.temporal import SagaWorld, world_on
from worker import WORKFLOWS
from workflows.failed_refund import FailedRefundTask
from workflows.refund_saga import RefundSaga
from workflows.restore_progress import RestoreProgress

__all__ = ["batch_time_env"]  # the module's time-skipping server

KEY = "sk_test_failed_refunds"
HISTORIES = Path(__file__).parent / "histories" / "1.0" / "failed-refund"
ALICE, BOB, SAM, OLIVIA = (generate_private_key() for _ in range(4))
KEYS = {
    "alice": public_key_b64(ALICE),
    "bob": public_key_b64(BOB),
    "sam": public_key_b64(SAM),
    "olivia": public_key_b64(OLIVIA),
}
SIGNED = pytest.mark.saga_settings(approver_public_keys=KEYS)


# --- the ledger rule, pure and in the store ---------------------------------------------------


@pytest.mark.parametrize(
    ("before", "refunded", "after"),
    [
        ("refunded", 0, "revoked"),  # access was gone: it stays gone until ops decide
        ("refunded", 4_000, "revoked"),
        ("refunded", 9_995, "refunded"),  # another refund still covers it all
        ("revoked", 0, "revoked"),
        ("partially_refunded", 0, "active"),  # access was never taken
        ("partially_refunded", 1_000, "partially_refunded"),
    ],
)
def test_a_failed_refund_never_gives_access_back_by_itself(
    before: Any, refunded: int, after: str
) -> None:
    assert status_after_failure(before, refunded_cents=refunded, amount_cents=9_995) == after


def refunded_purchase(store: OasisStore) -> tuple[int, str, str]:
    """A purchase a (pretend) saga refunded in full: (purchase, charge, refund id)."""
    tag = uuid.uuid4().hex[:8]
    user = store.create_user(name="F", email=f"f-{tag}@example.org", ams_member_id=None)
    product = store.create_product(code=f"F-{tag}", title="F", entitlement_source="oasis")
    charge = f"ch_{tag}"
    purchase = store.create_purchase(
        user_id=user,
        product_id=product,
        amount_cents=4_900,
        currency="usd",
        processor_charge_id=charge,
    )
    refund = f"re_{tag}"
    store.record_refunds(
        purchase,
        [
            LedgerEntry(
                processor_refund_id=refund, amount_cents=4_900, currency="usd", source="processor"
            )
        ],
        workflow_id=f"refund-{purchase}",
    )
    store.close_saga(
        workflow_id=f"refund-{purchase}",
        purchase_id=purchase,
        state="COMPLETED",
        revoked=True,
        decisions=[],
        detail={},
    )
    return purchase, charge, refund


def test_the_store_records_a_late_failure_once_for_one_task(store: OasisStore) -> None:
    purchase, charge, refund = refunded_purchase(store)
    snapshot = store.load_purchase(purchase)
    assert snapshot is not None and snapshot.status == "refunded"
    kw: dict[str, Any] = {
        "purchase_id": purchase,
        "charge_id": charge,
        "refund_id": refund,
        "amount_cents": 4_900,
        "currency": "usd",
        "recorded_by": failed_refund_id_for(refund),
        "detail": {"source": "webhook"},
    }
    first = record_late_failure(store, **kw)
    assert (first.newly_recorded, first.refunded_cents, first.purchase_status) == (
        True,
        0,
        "revoked",
    )
    assert (first.saga_workflow_id, first.saga_state) == (f"refund-{purchase}", "COMPLETED")
    again = record_late_failure(store, **kw)  # a retried activity
    assert again.model_copy(update={"newly_recorded": True}) == first and not again.newly_recorded
    snapshot = store.load_purchase(purchase)
    assert snapshot is not None and (snapshot.refunded_cents, snapshot.status) == (0, "revoked")
    events = [e for e in store.purchase_audit(purchase) if e.event == LATE_FAILURE_EVENT]
    assert len(events) == 1 and events[0].detail["refunded_cents_before"] == 4_900
    with pytest.raises(LateFailureRefused, match="handled by refund-failed-"):
        record_late_failure(store, **{**kw, "recorded_by": "refund-failed-someone-else"})
    wrongs: list[tuple[dict[str, Any], str]] = [
        ({"charge_id": "ch_other"}, "not paid with charge"),
        ({"refund_id": "re_unknown"}, "never counted"),
        ({"amount_cents": 100}, "holds refund"),
        ({"purchase_id": 10**6}, "does not exist"),
    ]
    for wrong, why in wrongs:
        with pytest.raises(LateFailureRefused, match=why):
            record_late_failure(store, **{**kw, **wrong})


# --- the task on the time-skipping server -----------------------------------------------------


@pytest.fixture(scope="module")
def processor_domain() -> Iterator[tuple[ProcessorSandbox, processor_app.ProcessorSandbox]]:
    """A processor sandbox of this module's, served over HTTP, with its state at hand."""
    domain = processor_app.ProcessorSandbox(api_key=KEY, state_path=None)
    with serve_app(domain.app()) as url, admin_client(url, KEY) as http:
        yield ProcessorSandbox(url=url, api_key=KEY, http=http), domain


@pytest.fixture(scope="module")
def processor_sandbox(
    processor_domain: tuple[ProcessorSandbox, processor_app.ProcessorSandbox],
) -> ProcessorSandbox:
    """The sandbox the world's worker talks to: this module's."""
    return processor_domain[0]


@pytest.fixture
def fail_at_processor(
    processor_domain: tuple[ProcessorSandbox, processor_app.ProcessorSandbox],
) -> Any:
    """Fail a succeeded refund, as the processor does days later (`refund.failed`)."""
    domain = processor_domain[1]

    def fail(refund_id: str) -> None:
        # What the sandbox's `POST /_sandbox/refunds/{id}/fail` does, without the HTTP hop.
        refund = domain.ledger.refunds[refund_id]
        assert refund["status"] == "succeeded"
        domain.ledger.set_status(refund, "failed", "lost_or_stolen_card")

    return fail


async def record_task_histories(world: SagaWorld, test_name: str) -> None:
    """Keep the closed runs of the test's tasks for the replay test below, each file named
    `<test>-<index>@<workflow id>.json`: the task checks the id it runs under."""
    HISTORIES.mkdir(parents=True, exist_ok=True)
    name = test_name.removeprefix("test_")[:50]
    seen: set[tuple[str, str | None]] = set()
    for index, started in enumerate(world.handles):
        if (started.id, started.result_run_id) in seen:
            continue  # the same run, found again by a second report
        seen.add((started.id, started.result_run_id))
        handle = world.client.get_workflow_handle(started.id, run_id=started.result_run_id)
        description = await handle.describe()
        if description.workflow_type != "FailedRefundTask" or description.close_time is None:
            continue
        history = await handle.fetch_history()
        (HISTORIES / f"{name}-{index}@{handle.id}.json").write_text(history.to_json())


@pytest.fixture
async def world(
    batch_time_env: Any,
    sqlite_store: OasisStore,
    processor_sandbox: ProcessorSandbox,
    ams_sandbox: Any,
    request: pytest.FixtureRequest,
) -> Any:
    """Every workflow and activity over the sandboxes and a migrated SQLite store."""

    async def before_stop(world: SagaWorld) -> None:
        if os.environ.get("REFUND_RECORD_HISTORIES"):
            await record_task_histories(world, request.node.name)

    async with world_on(
        batch_time_env,
        sqlite_store,
        processor_sandbox,
        ams_sandbox,
        request,
        queue_prefix="failed-refund-test",
        client_timeout_s=5,
        workflows=WORKFLOWS,
        before_stop=before_stop,
    ) as world:
        yield world


@dataclass
class Refunded:
    """A purchase a saga refunded to the end (6 progress records revoked, AMS removed)."""

    purchase: SeededPurchase
    saga_id: str
    refund_id: str

    def report(self, **changes: Any) -> FailedRefund:
        fields: dict[str, Any] = {
            "refund_id": self.refund_id,
            "charge_id": self.purchase.charge_id,
            "purchase_id": self.purchase.purchase_id,
            "amount_cents": self.purchase.amount_cents,
            "currency": "usd",
            "saga_workflow_id": self.saga_id,
            "source": "webhook",
            "event_id": "evt_test_failed",
        }
        return FailedRefund(**{**fields, **changes})


async def completed_saga(world: SagaWorld, *, signed: bool = False) -> Refunded:
    """A standard purchase refunded by a saga started as `refund start` starts it, for sam."""
    purchase = world.seed("standard")
    saga_id = workflow_id_for(purchase.purchase_id)
    request = RefundRequest(
        purchase_id=purchase.purchase_id, reason="duplicate", requested_by="sam"
    )
    if signed:
        request = sign_request(SAM, saga_id, request)
    handle = await world.client.start_workflow(
        RefundSaga.run,
        request,
        id=saga_id,
        task_queue=world.task_queue,
        search_attributes=sa.at_start(request),
    )
    world.handles.append(handle)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    approval = ApprovalDecision(approver="bob")
    if signed:
        run_id = handle.result_run_id or ""
        approval = approval.model_copy(
            update={"signature": sign_decision(BOB, saga_id, approval, run_id=run_id)}
        )
    await handle.execute_update(RefundSaga.decide, approval)
    result = await handle.result()
    assert result.state == SagaState.COMPLETED and result.progress_deleted == 6
    (refund_id,) = result.refund.processor_refund_ids
    return Refunded(purchase, saga_id, refund_id)


def task_settings(world: SagaWorld, **changes: Any) -> Settings:
    return world.settings.model_copy(update={"task_queue": world.task_queue, **changes})


async def report(world: SagaWorld, failed: FailedRefund) -> WorkflowHandle[Any, Any]:
    handle = await failed_refunds.start(world.client, task_settings(world), failed)
    world.handles.append(handle)
    return handle


async def reached(
    handle: WorkflowHandle[Any, Any], *states: FailedRefundState
) -> FailedRefundStatus:
    """Poll the task's status (queries do not skip time) until it is in one of `states`."""
    status: FailedRefundStatus = await handle.query(FailedRefundTask.status)
    for _ in range(800):
        if status.state in states:
            return status
        await asyncio.sleep(0.025)
        status = await handle.query(FailedRefundTask.status)
    raise AssertionError(f"task stayed {status.state}: {status.error}")


def money(world: SagaWorld, purchase: SeededPurchase) -> tuple[int, int, str]:
    """The ledger's refunded amount, the processor's, and the purchase's status."""
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None
    charge = world.processor.get_charge(purchase.charge_id)
    return snapshot.refunded_cents, charge["amount_refunded"], snapshot.status


def ledger(world: SagaWorld, purchase: SeededPurchase) -> list[tuple[str, int, str]]:
    with world.store.engine.connect() as db:
        rows = db.execute(
            select(Refund.processor_refund_id, Refund.amount_cents, Refund.status)
            .where(Refund.purchase_id == purchase.purchase_id)
            .order_by(Refund.id)
        ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def trail(world: SagaWorld, purchase: SeededPurchase) -> list[str]:
    return [e.event for e in world.store.purchase_audit(purchase.purchase_id)]


async def open_task(world: SagaWorld, refunded: Refunded, fail: Any) -> WorkflowHandle[Any, Any]:
    fail(refunded.refund_id)
    handle = await report(world, refunded.report())
    await reached(handle, FailedRefundState.OPEN)
    return handle


async def test_reports_the_processor_or_the_store_do_not_confirm_change_nothing(
    world: SagaWorld, fail_at_processor: Any
) -> None:
    refunded = await completed_saga(world)
    other = world.seed("standard")
    purchase = refunded.purchase
    before = (money(world, purchase), ledger(world, purchase), trail(world, purchase))
    assert before[0] == (purchase.amount_cents, purchase.amount_cents, "refunded")

    async def refused(failed: FailedRefund, why: str, **start: Any) -> None:
        if start:
            handle = await world.client.start_workflow(
                FailedRefundTask.run, failed, task_queue=world.task_queue, **start
            )
            world.handles.append(handle)
        else:
            handle = await report(world, failed)
        status = await reached(handle, FailedRefundState.REFUSED)
        assert why in (status.error or ""), status.error
        assert status.check is None and status.decision is None
        assert (await handle.result()).state == FailedRefundState.REFUSED
        attributes = (await handle.describe()).typed_search_attributes
        assert attributes.get(sa.REFUND_STATE) == "OPS_TASK_REFUSED"
        assert attributes.get(sa.PURCHASE_ID) is None  # an unconfirmed report names no purchase
        assert "refund_failed" not in world.notifier.kinds(handle.id)

    await refused(refunded.report(), "succeeded, not failed")
    fail_at_processor(refunded.refund_id)
    await refused(refunded.report(purchase_id=other.purchase_id), "was not paid with charge")
    await refused(refunded.report(charge_id=other.charge_id), "is not of charge")
    await refused(refunded.report(amount_cents=100), "not 100 usd")
    await refused(refunded.report(refund_id="re_unknown1"), "does not confirm")
    await refused(refunded.report(), "runs as refund-failed-", id="refund-failed-forged")
    # Nothing changed for either purchase: the ledger still counts the refund the processor
    # failed, since no report that held was made.
    assert (ledger(world, purchase), trail(world, purchase)) == before[1:]
    assert money(world, purchase) == (purchase.amount_cents, 0, "refunded")
    assert money(world, other) == (0, 0, "active") and ledger(world, other) == []
    assert LATE_FAILURE_EVENT not in trail(world, other)
    # A refused report does not block the real one.
    handle = await report(world, refunded.report())
    await reached(handle, FailedRefundState.OPEN)


async def test_a_failure_after_completion_opens_one_task_and_puts_the_ledger_right(
    world: SagaWorld, fail_at_processor: Any
) -> None:
    refunded = await completed_saga(world)
    purchase = refunded.purchase
    handle = await open_task(world, refunded, fail_at_processor)
    again = await report(world, refunded.report(source="sweep", event_id=None))
    assert again.id == handle.id and again.result_run_id == handle.result_run_id

    assert money(world, purchase) == (0, 0, "revoked")  # the ledger equals the processor again
    assert ledger(world, purchase) == [(refunded.refund_id, purchase.amount_cents, "failed")]
    assert world.notifier.kinds(handle.id) == ["refund_failed"]
    status = await handle.query(FailedRefundTask.status)
    check = status.check
    assert check is not None
    assert (check.saga_workflow_id, check.saga_state, check.saga_requested_by) == (
        refunded.saga_id,
        "COMPLETED",
        "sam",
    )
    assert (check.archived_progress, check.failure_reason) == (6, "lost_or_stolen_card")
    assert status.waiting_for == "ops"
    attributes = (await handle.describe()).typed_search_attributes
    assert attributes.get(sa.REFUND_STATE) == "OPS_TASK_OPEN"
    assert attributes.get(sa.WAITING_FOR) == "ops"
    assert attributes.get(sa.PURCHASE_ID) == str(purchase.purchase_id)
    assert attributes.get(sa.REFUND_AMOUNT_CENTS) == purchase.amount_cents
    # Access stays as the saga left it: no progress, no AMS entitlement.
    assert world.store.access_facts(purchase.user_id, purchase.product_id).progress_count == 0
    assert purchase.ams_member_id and world.ams.entitlements(purchase.ams_member_id) == []
    assert trail(world, purchase).count(LATE_FAILURE_EVENT) == 1

    # close: the note goes into the audit trail, and a report after the decision opens nothing.
    receipt = await failed_refunds.decide(
        world.client, task_settings(world), handle.id, "close", "olivia", "customer paid by cheque"
    )
    assert receipt.state == FailedRefundState.CLOSED and receipt.started_workflow_id is None
    result: FailedRefundStatus = await handle.result()
    assert result.state == FailedRefundState.CLOSED and result.decision is not None
    assert (result.decision.operator, result.decision.note) == ("olivia", "customer paid by cheque")
    (closed,) = [
        e
        for e in world.store.purchase_audit(purchase.purchase_id)
        if e.event == "failed_refund_close"
    ]
    assert closed.actor == "olivia" and closed.detail["note"] == "customer paid by cheque"
    assert closed.detail["signed"] is False
    attributes = (await handle.describe()).typed_search_attributes
    assert attributes.get(sa.REFUND_STATE) == "OPS_TASK_CLOSED"
    assert attributes.get(sa.WAITING_FOR) == "none"
    later = await report(world, refunded.report(event_id="evt_test_again"))
    status = await reached(later, FailedRefundState.REFUSED)
    assert "has dealt with" in (status.error or "")
    assert money(world, purchase) == (0, 0, "revoked")
    assert world.notifier.kinds(handle.id) == ["refund_failed"]


def test_closing_needs_a_note_and_each_choice_its_request() -> None:
    with pytest.raises(ValidationError, match="needs a note"):
        FailedRefundDecision(choice="close", operator="olivia")
    with pytest.raises(ValidationError, match="refund request goes with"):
        FailedRefundDecision(choice="retry", operator="olivia")
    with pytest.raises(ValidationError, match="restore request goes with"):
        FailedRefundDecision(
            choice="close",
            operator="olivia",
            note="n",
            restore_request=RestoreRequest(
                saga_workflow_id="refund-1", operator="olivia", reason="r"
            ),
        )
    with pytest.raises(ValidationError, match="markup"):
        FailedRefundDecision(choice="close", operator="olivia", note="<script>")


async def test_retry_starts_a_new_refund_of_the_failed_amount(
    world: SagaWorld, fail_at_processor: Any
) -> None:
    refunded = await completed_saga(world)
    purchase = refunded.purchase
    handle = await open_task(world, refunded, fail_at_processor)
    settings = task_settings(world)
    # A saga already running for the purchase: the decision is refused, the task stays open.
    blocking = await world.client.start_workflow(
        RefundSaga.run,
        RefundRequest(purchase_id=purchase.purchase_id, reason="again", requested_by="sam"),
        id=refunded.saga_id,
        task_queue=world.task_queue,
    )
    world.handles.append(blocking)
    await world.wait_for(blocking, SagaState.AWAITING_APPROVAL)
    with pytest.raises(Refused, match="already running"):
        await failed_refunds.decide(world.client, settings, handle.id, "retry", "olivia")
    # The task refuses it too, for a caller that does not ask first.
    raw = FailedRefundDecision(
        choice="retry",
        operator="olivia",
        refund_request=RefundRequest(
            purchase_id=purchase.purchase_id,
            amount_cents=purchase.amount_cents,
            currency="usd",
            reason="retry",
            requested_by="olivia",
            revoke_progress=False,
            remove_entitlement=False,
        ),
    )
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(DECIDE_UPDATE, raw)
    assert "already running" in str(refused.value.cause)
    status = await reached(handle, FailedRefundState.OPEN)
    assert status.decision is None and "already running" in status.ignored[-1].reason
    await blocking.execute_update(
        RefundSaga.decide, ApprovalDecision(approver="bob", approve=False)
    )
    assert (await blocking.result()).state == SagaState.REJECTED

    receipt = await failed_refunds.decide(world.client, settings, handle.id, "retry", "olivia")
    assert receipt.started_workflow_id == refunded.saga_id
    closed = await reached(handle, FailedRefundState.CLOSED)
    assert closed.decision is not None and closed.decision.choice == "retry"
    retry = world.client.get_workflow_handle(
        refunded.saga_id, run_id=closed.decision.started_run_id, result_type=SagaStatus
    )
    world.handles.append(retry)
    waiting = await world.wait_for(retry, SagaState.AWAITING_APPROVAL)
    assert waiting.requested_by == "olivia" and waiting.plan is not None
    assert (waiting.plan.amount_cents, waiting.plan.revoke_progress) == (
        purchase.amount_cents,
        False,
    )
    assert waiting.plan.ams_action == "none"
    await retry.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    assert (await retry.result()).state == SagaState.COMPLETED
    # The money went back this time: held at the processor for the charge, and in the ledger.
    assert money(world, purchase) == (purchase.amount_cents, purchase.amount_cents, "revoked")
    (failed, succeeded) = ledger(world, purchase)
    assert failed == (refunded.refund_id, purchase.amount_cents, "failed")
    assert succeeded[1:] == (purchase.amount_cents, "succeeded")
    assert world.store.access_facts(purchase.user_id, purchase.product_id).progress_count == 0
    (decided,) = [
        e
        for e in world.store.purchase_audit(purchase.purchase_id)
        if e.event == "failed_refund_retry"
    ]
    assert decided.actor == "olivia" and decided.detail["started_workflow_id"] == refunded.saga_id
    assert (await handle.result()).state == FailedRefundState.CLOSED


async def archived_on_server_clock(world: SagaWorld, saga_id: str) -> None:
    """Date the saga's snapshot a day before the time-skipping server's clock, which runs ahead
    of the wall clock the store stamps archives with (see tests/test_restore.py)."""
    server_now = await world.env.get_current_time()
    with world.store.engine.begin() as db:
        db.execute(
            update(ProgressArchive)
            .where(ProgressArchive.workflow_id == saga_id)
            .values(archived_at=server_now - timedelta(days=1))
        )


async def test_restore_access_puts_the_progress_back(
    world: SagaWorld, fail_at_processor: Any
) -> None:
    refunded = await completed_saga(world)
    purchase = refunded.purchase
    await archived_on_server_clock(world, refunded.saga_id)
    handle = await open_task(world, refunded, fail_at_processor)
    receipt = await failed_refunds.decide(
        world.client, task_settings(world), handle.id, "restore_access", "olivia"
    )
    restore_id = restore_id_for(refunded.saga_id)
    assert receipt.started_workflow_id == restore_id
    closed = await reached(handle, FailedRefundState.CLOSED)
    assert closed.decision is not None and closed.decision.choice == "restore_access"
    restore = world.client.get_workflow_handle(restore_id, result_type=RestoreStatus)
    world.handles.append(restore)
    for _ in range(400):
        state = (await restore.query(RestoreProgress.restore_status)).state
        if state == RestoreState.AWAITING_APPROVAL:
            break
        await asyncio.sleep(0.025)
    await restore.execute_update(RestoreProgress.decide, ApprovalDecision(approver="bob"))
    result = await restore.result()
    assert (result.state, result.restored) == (RestoreState.COMPLETED, 6)
    assert world.store.access_facts(purchase.user_id, purchase.product_id).progress_count == 6
    # Money: still not back, and the ledger says so. The AMS entitlement is not granted again.
    assert money(world, purchase) == (0, 0, "revoked")
    assert purchase.ams_member_id and world.ams.entitlements(purchase.ams_member_id) == []
    events = trail(world, purchase)
    assert "failed_refund_restore_access" in events and "progress_restored" in events


@pytest.mark.saga_settings(operators=["olivia", "sam"])
async def test_a_decision_by_a_non_operator_or_the_requester_changes_nothing(
    world: SagaWorld, fail_at_processor: Any
) -> None:
    refunded = await completed_saga(world)
    purchase = refunded.purchase
    handle = await open_task(world, refunded, fail_at_processor)
    settings = task_settings(world)
    before = (money(world, purchase), ledger(world, purchase), trail(world, purchase))
    for by, why in [("bob", "not on the operator allowlist"), ("sam", "four-eyes")]:
        with pytest.raises(Refused, match=why):
            await failed_refunds.decide(world.client, settings, handle.id, "close", by, "no")
    wrong_amount = FailedRefundDecision(
        choice="retry",
        operator="olivia",
        refund_request=RefundRequest(
            purchase_id=purchase.purchase_id,
            amount_cents=1,
            currency="usd",
            reason="retry",
            requested_by="olivia",
            revoke_progress=False,
            remove_entitlement=False,
        ),
    )
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(DECIDE_UPDATE, wrong_amount)
    assert "must be of the failed" in str(refused.value.cause)
    status = await reached(handle, FailedRefundState.OPEN)
    assert status.decision is None and status.ignored == []  # refusals never reach history
    assert (money(world, purchase), ledger(world, purchase), trail(world, purchase)) == before
    await failed_refunds.decide(world.client, settings, handle.id, "close", "olivia", "handled")
    assert (await handle.result()).state == FailedRefundState.CLOSED


@SIGNED
async def test_with_signing_on_only_the_operators_signature_for_this_task_counts(
    world: SagaWorld, fail_at_processor: Any, tmp_path: Path
) -> None:
    refunded = await completed_saga(world, signed=True)
    purchase = refunded.purchase
    handle = await open_task(world, refunded, fail_at_processor)
    run_id = handle.result_run_id or ""
    before = (money(world, purchase), ledger(world, purchase), trail(world, purchase))
    close = FailedRefundDecision(choice="close", operator="olivia", note="paid by cheque")

    def signed(key: Any, decision: FailedRefundDecision, run: str = run_id) -> FailedRefundDecision:
        return close.model_copy(
            update={"signature": sign_failed_refund_decision(key, handle.id, decision, run_id=run)}
        )

    forged = {
        "unsigned": (close, "not signed"),
        "alice as olivia": (signed(ALICE, close), "does not match"),
        "another run": (signed(OLIVIA, close, "another-run"), "does not match"),
        "another note": (
            signed(OLIVIA, close.model_copy(update={"note": "other"})),
            "does not match",
        ),
    }
    for name, (decision, why) in forged.items():
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(DECIDE_UPDATE, decision)
        assert why in str(refused.value.cause), name
    assert (await handle.query(FailedRefundTask.status)).decision is None
    assert (money(world, purchase), ledger(world, purchase), trail(world, purchase)) == before

    # Through the console with olivia's key: the decision and the new refund's request signed.
    key_file = tmp_path / "olivia.pem"
    write_private_key(OLIVIA, key_file)
    settings = task_settings(world, signing_key_file=key_file)
    receipt = await failed_refunds.decide(world.client, settings, handle.id, "retry", "olivia")
    closed = await reached(handle, FailedRefundState.CLOSED)
    assert closed.decision is not None and closed.decision.signed
    retry = world.client.get_workflow_handle(
        receipt.started_workflow_id or "",
        run_id=closed.decision.started_run_id,
        result_type=SagaStatus,
    )
    world.handles.append(retry)
    await world.wait_for(retry, SagaState.AWAITING_APPROVAL)  # the saga took the signed start
    approval = ApprovalDecision(approver="bob")
    approval = approval.model_copy(
        update={
            "signature": sign_decision(
                BOB, retry.id, approval, run_id=closed.decision.started_run_id or ""
            )
        }
    )
    await retry.execute_update(RefundSaga.decide, approval)
    assert (await retry.result()).state == SagaState.COMPLETED
    assert money(world, purchase) == (purchase.amount_cents, purchase.amount_cents, "revoked")


# --- lists, on the dev server ---------------------------------------------------------------


@pytest.mark.devserver
async def test_an_open_task_is_listed_until_it_is_closed(live_stack: LiveStack) -> None:
    """The ledger and the processor set up by hand (no saga): a pending refund counted as
    succeeded, then failed at the processor."""
    settings = live_stack.settings
    key = settings.processor_api_key.get_secret_value()
    store = OasisStore.from_url(settings.resolved_database_url)
    with httpx.Client(timeout=10.0) as http:
        purchase = seed_purchase(
            store,
            http,
            processor_url=settings.processor_url,
            ams_url=settings.ams_url,
            processor_api_key=key,
            ams_api_key=settings.ams_api_key.get_secret_value(),
            scenario="oasis_entitled",
        )
    try:
        with admin_client(settings.processor_url, key) as processor:
            processor.post(
                f"/_sandbox/charges/{purchase.charge_id}/refund_behavior",
                json={"refund_behavior": "pending"},
            ).raise_for_status()
            refund = processor.post(
                "/v1/refunds",
                data={"charge": purchase.charge_id, "metadata[workflow_id]": "by-hand"},
            ).json()
            store.record_refunds(
                purchase.purchase_id,
                [
                    LedgerEntry(
                        processor_refund_id=refund["id"],
                        amount_cents=purchase.amount_cents,
                        currency="usd",
                        source="processor",
                    )
                ],
                workflow_id=workflow_id_for(purchase.purchase_id),
            )
            processor.post(
                f"/_sandbox/refunds/{refund['id']}/settle", json={"status": "failed"}
            ).raise_for_status()
        client = await connect(settings)
        failed = FailedRefund(
            refund_id=refund["id"],
            charge_id=purchase.charge_id,
            purchase_id=purchase.purchase_id,
            amount_cents=purchase.amount_cents,
            currency="usd",
            source="sweep",
        )
        handle = await failed_refunds.start(client, settings, failed)
        await reached(handle, FailedRefundState.OPEN)

        async def listed() -> bool:
            return handle.id in {e.id for e in await failed_refunds.list_open(client)}

        for _ in range(100):  # visibility follows the upsert within moments
            if await listed():
                break
            await asyncio.sleep(0.1)
        assert await listed()
        shown = await failed_refunds.status(client, refund["id"])
        assert shown.state == FailedRefundState.OPEN and shown.check is not None
        assert shown.check.refunded_cents == 0 and shown.check.saga_requested_by is None
        await failed_refunds.decide(client, settings, handle.id, "close", "oscar", "by hand")
        for _ in range(100):
            if not await listed():
                break
            await asyncio.sleep(0.1)
        assert not await listed()
        assert (await failed_refunds.status(client, handle.id)).state == FailedRefundState.CLOSED
    finally:
        store.close()


# --- replay ---------------------------------------------------------------------------------


RECORDED = sorted(HISTORIES.glob("*.json"))


def test_there_are_recorded_histories_of_the_task() -> None:
    ends = {
        WorkflowHistory.from_json(p.stem, p.read_text()).events[-1].event_type for p in RECORDED
    }
    assert len(RECORDED) >= 4, (
        "record: REFUND_RECORD_HISTORIES=1 pytest tests/test_failed_refund.py"
    )
    assert ends == {EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED}


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
async def test_a_recorded_task_replays(path: Path) -> None:
    replayer = Replayer(
        workflows=WORKFLOWS,
        data_converter=payload_data_converter,
        workflow_runner=SandboxedWorkflowRunner(),
    )
    workflow_id = path.stem.rsplit("@", 1)[1]
    await replayer.replay_workflow(WorkflowHistory.from_json(workflow_id, path.read_text()))
