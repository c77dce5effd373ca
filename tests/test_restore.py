"""Undo a mistaken revoke: the refusal rules on their own, the store on SQLite and PostgreSQL,
RestoreProgress and the purge on the time-skipping server, and the CLI on the dev server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowUpdateFailedError
from temporalio.common import RawValue

from console.operations import RESTORE_ENDS
from refundsaga.approval import policy_from_settings
from refundsaga.contracts import (
    ApprovalDecision,
    PurgeInput,
    RefundRequest,
    RestoreCheck,
    RestoreRequest,
    RestoreState,
    RestoreStatus,
    SagaState,
)
from refundsaga.restore import expires_at, restore_refusal
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from refundsaga.store.schema import ProgressArchive
from refundsaga.store.store import RestoreRefused
from tests.fixtures.batch import batch_time_env, batch_world, isolated_batch_world
from tests.fixtures.stack import LiveStack
from tests.fixtures.temporal import SagaWorld
from workflows.refund_saga import RefundSaga
from workflows.restore_progress import PurgeExpiredSnapshots, RestoreProgress

__all__ = ["batch_time_env", "batch_world", "isolated_batch_world"]  # fixtures used below

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


# --- the rules, pure ------------------------------------------------------------------------


def check(**changes: Any) -> RestoreCheck:
    fields: dict[str, Any] = {
        "saga_workflow_id": "refund-42",
        "saga_state": "COMPLETED",
        "revoked": True,
        "purchase_id": 42,
        "user_id": 7,
        "product_id": 3,
        "rows": 6,
        "archived_at": NOW - timedelta(days=3),
        "conflicts": 0,
        "retention": timedelta(days=30),
        "policy": policy_from_settings(Settings()),
    }
    return RestoreCheck(**{**fields, **changes})


def test_a_recent_snapshot_of_a_completed_saga_may_be_restored() -> None:
    assert restore_refusal(check(), now=NOW) is None
    assert expires_at(check()) == NOW + timedelta(days=27)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"saga_state": None}, "has not ended"),
        ({"saga_state": "FAILED"}, "ended FAILED"),
        ({"archived_at": None, "rows": 0}, "expired and was purged"),
        ({"archived_at": None, "rows": 0, "revoked": False}, "archived no progress"),
        ({"archived_at": NOW - timedelta(days=30)}, "expired at"),
        ({"rows": 0, "restored_by": "restore-refund-42"}, "restored already by restore-refund-42"),
        ({"conflicts": 2}, "new progress in 2 of the 6"),
    ],
)
def test_a_restore_is_refused_clearly(changes: dict[str, Any], why: str) -> None:
    reason = restore_refusal(check(**changes), now=NOW)
    assert reason is not None and why in reason


# --- the store, on SQLite and PostgreSQL ----------------------------------------------------


def revoked(store: OasisStore, items: int = 4) -> tuple[int, int, int, str]:
    """A purchase whose progress a (pretend) saga revoked: (purchase, user, product, saga id)."""
    tag = uuid.uuid4().hex[:8]
    user = store.create_user(name="R", email=f"r-{tag}@example.org", ams_member_id=None)
    product = store.create_product(code=f"P-{tag}", title="P", entitlement_source="oasis")
    purchase = store.create_purchase(
        user_id=user,
        product_id=product,
        amount_cents=4_900,
        currency="usd",
        processor_charge_id=f"ch_{tag}",
    )
    store.add_progress(user_id=user, product_id=product, items=items)
    saga = f"refund-{purchase}"
    store.revoke_progress(purchase_id=purchase, user_id=user, product_id=product, workflow_id=saga)
    store.close_saga(
        workflow_id=saga,
        purchase_id=purchase,
        state="COMPLETED",
        revoked=True,
        decisions=[],
        detail={},
    )
    return purchase, user, product, saga


def test_the_store_restores_a_snapshot_once_and_says_so(store: OasisStore) -> None:
    purchase, user, product, saga = revoked(store)
    info = store.snapshot_info(saga)
    assert (info.saga_state, info.revoked, info.rows, info.conflicts) == ("COMPLETED", True, 4, 0)
    assert info.archived_at is not None and store.access_facts(user, product).progress_count == 0

    kw: dict[str, Any] = {
        "saga_workflow_id": saga,
        "archived_at": info.archived_at,
        "not_before": info.archived_at - timedelta(days=30),
        "restore_workflow_id": f"restore-{saga}",
        "operator": "olivia",
        "detail": {"approvers": ["bob"]},
    }
    outcome = store.restore_progress(**kw)
    assert (outcome.restored, outcome.purchase_id) == (4, purchase)
    assert store.restore_progress(**kw) == outcome  # a retried activity changes nothing more
    assert store.access_facts(user, product).progress_count == 4
    after = store.snapshot_info(saga)
    assert after.rows == 0 and after.restored_by == f"restore-{saga}"
    (event,) = [e for e in store.audit_trail(workflow_id=saga) if e.event == "progress_restored"]
    assert event.actor == "olivia" and event.detail["restored"] == 4
    assert event.detail["approvers"] == ["bob"]
    with pytest.raises(RestoreRefused, match="no archived progress left"):
        store.restore_progress(**{**kw, "restore_workflow_id": "restore-again"})


def test_the_store_refuses_expired_and_conflicting_restores(store: OasisStore) -> None:
    _, user, product, saga = revoked(store)
    info = store.snapshot_info(saga)
    assert info.archived_at is not None
    kw: dict[str, Any] = {
        "saga_workflow_id": saga,
        "archived_at": info.archived_at,
        "restore_workflow_id": f"restore-{saga}",
        "operator": "olivia",
        "detail": {},
    }
    with pytest.raises(RestoreRefused, match="has expired"):
        store.restore_progress(**kw, not_before=info.archived_at + timedelta(seconds=1))
    store.add_progress(user_id=user, product_id=product, items=2)  # the user started again
    assert store.snapshot_info(saga).conflicts == 2
    with pytest.raises(RestoreRefused, match="new progress in 2 of the 4"):
        store.restore_progress(**kw, not_before=info.archived_at - timedelta(days=1))
    assert store.access_facts(user, product).progress_count == 2  # nothing was overwritten


def test_the_store_purges_expired_snapshots_only(store: OasisStore) -> None:
    _, _, _, old = revoked(store)
    _, _, _, fresh = revoked(store, items=2)
    cutoff = datetime.now(UTC) + timedelta(seconds=1)
    with store.engine.begin() as connection:
        connection.execute(
            update(ProgressArchive)
            .where(ProgressArchive.workflow_id == fresh)
            .values(archived_at=cutoff + timedelta(days=1))
        )
    outcome = store.purge_expired_snapshots(cutoff=cutoff)
    assert (outcome.deleted, outcome.sagas) == (4, 1)
    assert store.archived_progress(workflow_id=old) == 0
    assert store.archived_progress(workflow_id=fresh) == 2
    gone = store.snapshot_info(old)
    assert gone.archived_at is None and gone.revoked  # so a restore says "expired and purged"
    assert store.purge_expired_snapshots(cutoff=cutoff).deleted == 0


# --- RestoreProgress and the purge on the time-skipping server ------------------------------


async def completed_saga(world: SagaWorld) -> tuple[Any, str]:
    """A standard purchase refunded to the end by a saga (6 progress records revoked)."""
    purchase = world.seed("standard")
    handle = await world.client.start_workflow(
        RefundSaga.run,
        RefundRequest(purchase_id=purchase.purchase_id, reason="duplicate", requested_by="sam"),
        id=f"refund-{purchase.purchase_id}",
        task_queue=world.task_queue,
    )
    world.handles.append(handle)
    await world.wait_for(handle, SagaState.AWAITING_APPROVAL)
    await handle.execute_update(RefundSaga.decide, ApprovalDecision(approver="bob"))
    result = await handle.result()
    assert result.state == SagaState.COMPLETED and result.progress_deleted == 6
    return purchase, handle.id


async def start_restore(world: SagaWorld, saga: str, operator: str = "olivia") -> Any:
    handle = await world.client.start_workflow(
        RestoreProgress.run,
        RestoreRequest(saga_workflow_id=saga, operator=operator, reason="revoked by mistake"),
        id=f"restore-{saga}-{uuid.uuid4().hex[:6]}",
        task_queue=world.task_queue,
    )
    world.handles.append(handle)
    return handle


async def archived_ago(world: SagaWorld, saga: str, age: timedelta) -> None:
    """Date the saga's snapshot `age` before the test server's clock.

    The shared time-skipping server runs ahead of the wall clock the store stamps archives
    with (it skips through other tests' timers, sometimes by years), so the tests put the
    snapshot where they want it on the server's clock.
    """
    server_now = await world.env.get_current_time()
    with world.store.engine.begin() as connection:
        connection.execute(
            update(ProgressArchive)
            .where(ProgressArchive.workflow_id == saga)
            .values(archived_at=server_now - age)
        )


async def settled(handle: Any, *states: RestoreState) -> RestoreStatus:
    """Poll the restore's status (queries do not skip time) until it is in one of `states`."""
    status: RestoreStatus = await handle.query(RestoreProgress.restore_status)
    for _ in range(400):
        if status.state in states:
            return status
        await asyncio.sleep(0.025)
        status = await handle.query(RestoreProgress.restore_status)
    raise AssertionError(f"restore stayed {status.state}: {status.error}")


ENDS = tuple(RESTORE_ENDS)


@pytest.mark.saga_settings(operators=["olivia", "carol"])
async def test_a_mistaken_revoke_is_restored_with_four_eyes(batch_world: SagaWorld) -> None:
    world = batch_world
    purchase, saga = await completed_saga(world)
    await archived_ago(world, saga, timedelta(days=1))
    handle = await start_restore(world, saga, operator="carol")  # carol is also an approver
    status = await settled(handle, RestoreState.AWAITING_APPROVAL, *ENDS)
    assert status.state == RestoreState.AWAITING_APPROVAL, status.error
    assert status.check is not None and status.check.rows == 6

    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update(RestoreProgress.decide, ApprovalDecision(approver="carol"))
    assert "four-eyes" in str(info.value.cause) and "this restore" in str(info.value.cause)
    await handle.execute_update(RestoreProgress.decide, ApprovalDecision(approver="alice"))
    result = await settled(handle, *ENDS)
    assert result.state == RestoreState.COMPLETED and result.restored == 6
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.progress_count == 6
    assert snapshot.status == "refunded"  # the money stays refunded: only progress comes back
    trail = [(e.event, e.actor) for e in world.store.audit_trail(workflow_id=saga)]
    assert ("progress_restored", "carol") in trail
    await handle.result()
    restore_trail = [(e.event, e.actor) for e in world.store.audit_trail(workflow_id=handle.id)]
    assert restore_trail == [
        ("restore_requested", "carol"),
        ("approved", "alice"),
        ("restore_ended", "refund-saga"),
    ]

    await archived_ago(world, saga, timedelta(days=1))
    refused = await settled(await start_restore(world, saga, operator="olivia"), *ENDS)
    assert refused.state == RestoreState.REFUSED
    assert "restored already" in (refused.error or "")


async def test_an_expired_snapshot_is_refused_then_purged(batch_world: SagaWorld) -> None:
    world = batch_world
    _, saga = await completed_saga(world)
    await archived_ago(world, saga, timedelta(days=31))
    refused = await (await start_restore(world, saga)).result()
    assert refused.state == RestoreState.REFUSED
    assert "expired at" in (refused.error or "")

    purge = await world.client.start_workflow(
        PurgeExpiredSnapshots.run,
        PurgeInput(retention=timedelta(days=30)),
        id=f"purge-{uuid.uuid4().hex[:6]}",
        task_queue=world.task_queue,
    )
    purged = await purge.result()
    assert purged.deleted >= 6 and world.store.archived_progress(workflow_id=saga) == 0
    gone = await (await start_restore(world, saga)).result()
    assert gone.state == RestoreState.REFUSED
    assert "expired and was purged" in (gone.error or "")


async def test_a_snapshot_expiring_while_waiting_for_approval_is_not_restored(
    isolated_batch_world: SagaWorld,
) -> None:
    # Its own time-skipping server: the shared one can stop skipping after a batch's
    # continue-as-new with children running (sdk-java#1540), and this test needs the skip.
    world = isolated_batch_world
    purchase, saga = await completed_saga(world)
    await archived_ago(world, saga, timedelta(days=30) - timedelta(hours=2))
    result = await (await start_restore(world, saga)).result()  # skips through the 2 hours
    assert result.state == RestoreState.EXPIRED
    assert "expired while waiting" in (result.error or "")
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.progress_count == 0


async def test_new_progress_blocks_a_restore(batch_world: SagaWorld) -> None:
    world = batch_world
    purchase, saga = await completed_saga(world)
    await archived_ago(world, saga, timedelta(days=1))
    world.store.add_progress(user_id=purchase.user_id, product_id=purchase.product_id, items=1)
    refused = await settled(await start_restore(world, saga), *ENDS)
    assert refused.state == RestoreState.REFUSED
    assert "a restore would overwrite it" in (refused.error or "")
    assert world.store.access_facts(purchase.user_id, purchase.product_id).progress_count == 1


# --- the CLI on the dev server ----------------------------------------------------------------


def refund(live: LiveStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "console.cli", *args],
        env=live.env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def refund_json(live: LiveStack, *args: str) -> Any:
    done = refund(live, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.devserver
def test_cli_restores_a_mistaken_revoke_within_the_window_and_refuses_after(
    live_stack: LiveStack,
) -> None:
    (first, second) = refund_json(live_stack, "seed", "--scenario", "standard", "--count", "2")
    for p in (first, second):
        pid = str(p["purchase_id"])
        refund_json(live_stack, "start", pid, "--reason", "revoked by mistake", "--as", "sam")
        refund_json(live_stack, "approve", pid, "--as", "bob")
        done = refund_json(live_stack, "status", pid, "--wait-for", "COMPLETED", "--timeout", "60")
        assert done["progress_deleted"] == 6

    saga = f"refund-{first['purchase_id']}"
    started = refund_json(
        live_stack, "restore-progress", saga, "--operator", "olivia", "--reason", "mistake"
    )
    assert started["state"] == "AWAITING_APPROVAL" and started["check"]["rows"] == 6
    own = refund(live_stack, "approve", f"restore-{saga}", "--as", "olivia")
    assert own.returncode == 2  # olivia asked for it (and is no approver)
    refund_json(live_stack, "approve", f"restore-{saga}", "--as", "bob")
    restored = refund_json(
        live_stack, "restore-status", saga, "--wait-for", "COMPLETED", "--timeout", "60"
    )
    assert restored["restored"] == 6
    access = refund_json(
        live_stack,
        "access",
        "--user",
        str(first["user_id"]),
        "--product",
        str(first["product_id"]),
    )
    assert access["has_access"] and access["reasons"] == ["progress"]
    human = refund(live_stack, "restore-status", f"restore-{saga}")
    assert human.returncode == 0 and "COMPLETED" in human.stdout

    # After the window: the snapshot is older than the retention.
    late = f"refund-{second['purchase_id']}"
    store = OasisStore.from_url(live_stack.settings.resolved_database_url)
    try:
        with store.engine.begin() as connection:
            connection.execute(
                update(ProgressArchive)
                .where(ProgressArchive.workflow_id == late)
                .values(archived_at=datetime.now(UTC) - timedelta(days=31))
            )
    finally:
        store.close()
    expired = refund(live_stack, "restore-progress", late, "--operator", "olivia", "--reason", "x")
    assert expired.returncode == 2
    assert "expired" in expired.stderr and "Traceback" not in expired.stderr

    ensured = refund_json(live_stack, "schedules", "ensure")
    # `refund stack up` created them.
    assert [s["outcome"] for s in ensured["schedules"]] == ["updated", "updated"]
    assert {s["schedule_id"] for s in ensured["schedules"]} == {
        "refund-purge-expired-snapshots",
        "refund-reconciliation-sweep",
    }


async def test_malformed_signals_are_ignored_and_the_restore_still_decides(
    isolated_batch_world: SagaWorld,
) -> None:
    # Its own server: after this test the shared one sometimes stopped skipping time for the
    # next test's 72 hours (seen under load; the cause is in the test server, not the batch).
    world = isolated_batch_world
    purchase, saga = await completed_saga(world)
    await archived_ago(world, saga, timedelta(hours=1))  # recent on the server's clock
    handle = await start_restore(world, saga)
    await settled(handle, RestoreState.AWAITING_APPROVAL)
    for name, payload in (
        ("approve", Payload(metadata={"encoding": b"binary/plain"}, data=b"\x00\xff")),
        ("reject", Payload(metadata={"encoding": b"binary/null"}, data=b"")),
    ):
        await handle.signal(name, RawValue(payload))
    for _ in range(400):
        status: RestoreStatus = await handle.query(RestoreProgress.restore_status)
        if len(status.ignored) == 2:
            break
        await asyncio.sleep(0.025)
    assert [i.reason.startswith("malformed message") for i in status.ignored] == [True, True]
    await handle.execute_update(
        RestoreProgress.decide, ApprovalDecision(approver="bob", approve=False)
    )
    assert (await handle.result()).state == RestoreState.REJECTED
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.progress_count == 0


async def test_a_purge_started_by_hand_keeps_the_snapshots_inside_retention(
    batch_world: SagaWorld,
) -> None:
    world = batch_world
    _, saga = await completed_saga(world)
    await archived_ago(world, saga, timedelta(days=1))  # the worker's retention is 30 days
    purge = await world.client.start_workflow(
        PurgeExpiredSnapshots.run,
        PurgeInput(retention=timedelta(0)),
        id=f"purge-{uuid.uuid4().hex[:6]}",
        task_queue=world.task_queue,
    )
    purged = await purge.result()
    assert world.store.archived_progress(workflow_id=saga) == 6
    assert purged.cutoff <= await world.env.get_current_time() - timedelta(days=29)


async def test_a_restore_asked_by_someone_not_an_operator_restores_nothing(
    batch_world: SagaWorld,
) -> None:
    world = batch_world
    purchase, saga = await completed_saga(world)
    await archived_ago(world, saga, timedelta(days=1))
    handle = await start_restore(world, saga, operator="mallory")
    status = await settled(handle, *ENDS)
    assert status.state == RestoreState.REFUSED
    assert status.error is not None and "operator allowlist" in status.error
    snapshot = world.store.load_purchase(purchase.purchase_id)
    assert snapshot is not None and snapshot.progress_count == 0
