"""Processor events end to end on the embedded stack: the processor sandbox sends its webhooks to
the stack's receiver, which wakes, reconciles and opens ops tasks; driven through the `refund`
CLI and the sandbox's API as the processor's dashboard would be."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from console import stack
from refundsaga.store import OasisStore
from tests.fixtures.stack import LiveStack
from tests.test_e2e import charge, refund, refund_json, seed

pytestmark = pytest.mark.devserver


@pytest.fixture
def processor(live_stack: LiveStack) -> Iterator[httpx.Client]:
    key = live_stack.settings.processor_api_key.get_secret_value()
    with httpx.Client(
        base_url=live_stack.settings.processor_url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
        trust_env=False,
    ) as http:
        yield http
        # Whatever a test did to the deliveries, the next one starts with plain ones.
        http.post("/_sandbox/webhooks/faults", json={}).raise_for_status()
        http.post("/_sandbox/webhooks/resume").raise_for_status()


def until(what: Callable[[], Any], *, timeout_s: float = 30, every_s: float = 0.25) -> Any:
    """Poll `what` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {timeout_s}s"
        time.sleep(every_s)


def sagas_of(live: LiveStack, purchase_id: int, *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = refund_json(live, "list", "--purchase", str(purchase_id), *args)
    return rows


def status(live: LiveStack, workflow_id: str) -> dict[str, Any]:
    result: dict[str, Any] = refund_json(live, "status", workflow_id)
    return result


def outside_refund(processor: httpx.Client, charge_id: str, amount: int | None = None) -> str:
    """A refund made in the processor's dashboard: no metadata of ours."""
    data = {"charge": charge_id} | ({} if amount is None else {"amount": str(amount)})
    response = processor.post("/v1/refunds", data=data)
    response.raise_for_status()
    refund_id: str = response.json()["id"]
    return refund_id


def ledger_cents(live: LiveStack, purchase_id: int) -> int:
    store = OasisStore.from_url(live.settings.resolved_database_url)
    try:
        purchase = store.load_purchase(purchase_id)
        assert purchase is not None
        return purchase.refunded_cents
    finally:
        store.close()


def has_access(live: LiveStack, purchase: dict[str, Any]) -> bool:
    facts = refund_json(
        live, "access", "--user", str(purchase["user_id"]), "--product", str(purchase["product_id"])
    )
    return bool(facts["has_access"])


def refunds_of(processor: httpx.Client, charge_id: str) -> list[dict[str, Any]]:
    response = processor.get(f"/v1/charges/{charge_id}/refunds")
    response.raise_for_status()
    refunds: list[dict[str, Any]] = response.json()["data"]
    return refunds


def test_a_refund_made_outside_oasis_is_reconciled_after_one_approval(
    live_stack: LiveStack, processor: httpx.Client
) -> None:
    p = seed(live_stack, "standard")
    pid = p["purchase_id"]
    assert has_access(live_stack, p)

    outside = outside_refund(processor, p["charge_id"])
    started = time.monotonic()
    (saga,) = until(lambda: sagas_of(live_stack, pid, "--source", "webhook"))
    workflow_id = saga["workflow_id"]
    assert workflow_id == f"reconcile-{pid}"
    waiting = until(
        lambda: (s := status(live_stack, workflow_id))["state"] == "AWAITING_APPROVAL" and s
    )
    assert time.monotonic() - started < 15
    assert waiting["plan"]["amount_cents"] == 0  # no money moves
    assert has_access(live_stack, p)  # nothing irreversible before the approval

    approved = refund(live_stack, "approve", workflow_id, "--as", "bob")
    assert approved.returncode == 0, approved.stderr
    until(lambda: status(live_stack, workflow_id)["state"] == "COMPLETED")

    assert not has_access(live_stack, p)
    processor_charge = charge(live_stack, p["charge_id"])
    assert processor_charge["amount_refunded"] == p["amount_cents"]
    assert ledger_cents(live_stack, pid) == processor_charge["amount_refunded"]
    # The dashboard's refund is the only one: the reconciliation moved no money.
    assert [r["id"] for r in refunds_of(processor, p["charge_id"])] == [outside]


def test_with_the_receiver_stopped_the_sweep_finds_it(
    live_stack: LiveStack, processor: httpx.Client
) -> None:
    (receiver,) = [s for s in stack.status(live_stack.settings) if s.name == "webhooks"]
    assert receiver.pid is not None
    os.kill(receiver.pid, signal.SIGTERM)
    until(
        lambda: not [s for s in stack.status(live_stack.settings) if s.name == "webhooks" and s.pid]
    )
    try:
        p = seed(live_stack, "standard")
        outside_refund(processor, p["charge_id"])
        time.sleep(1)
        assert sagas_of(live_stack, p["purchase_id"]) == []  # nobody heard of it
        # What the schedule does every REFUND_SWEEP_EVERY, now.
        swept = refund(live_stack, "schedules", "sweep-now")
        assert swept.returncode == 0, swept.stderr
        (saga,) = until(lambda: sagas_of(live_stack, p["purchase_id"], "--source", "sweep"))
        until(lambda: status(live_stack, saga["workflow_id"])["state"] == "AWAITING_APPROVAL")
        approved = refund(live_stack, "approve", saga["workflow_id"], "--as", "bob")
        assert approved.returncode == 0, approved.stderr
        until(lambda: status(live_stack, saga["workflow_id"])["state"] == "COMPLETED")
        assert not has_access(live_stack, p)
    finally:
        stack.up(live_stack.settings)


def test_duplicated_and_reordered_deliveries_start_one_saga(
    live_stack: LiveStack, processor: httpx.Client
) -> None:
    processor.post(
        "/_sandbox/webhooks/faults",
        json={"duplicate_rate": 1.0, "reorder_rate": 1.0, "reorder_max_s": 1, "seed": 7},
    ).raise_for_status()
    p = seed(live_stack, "standard")
    outside_refund(processor, p["charge_id"])
    processor.post("/_sandbox/webhooks/flush", json={"timeout_s": 30}).raise_for_status()

    deliveries = processor.get("/_sandbox/webhooks/deliveries").json()
    assert any(d["duplicate"] for d in deliveries)
    (saga,) = until(lambda: sagas_of(live_stack, p["purchase_id"], "--source", "webhook"))
    time.sleep(1)  # a late duplicate would have started a second run by now
    assert [s["workflow_id"] for s in sagas_of(live_stack, p["purchase_id"])] == [
        saga["workflow_id"]
    ]


def test_a_forged_delivery_starts_nothing(live_stack: LiveStack) -> None:
    p = seed(live_stack, "standard")
    url = next(s.url for s in stack.status(live_stack.settings) if s.name == "webhooks")
    assert url is not None
    body = (
        '{"id": "evt_forged", "object": "event", "type": "refund.created", "data": {"object": '
        f'{{"id": "re_forged", "object": "refund", "charge": "{p["charge_id"]}", '
        '"amount": 9995, "currency": "usd", "status": "succeeded", "metadata": {}}}}}'
    )
    forged = httpx.post(
        url,
        content=body,
        headers={"Stripe-Signature": f"t={int(time.time())},v1={'0' * 64}"},
        trust_env=False,
    )
    assert forged.status_code == 400
    time.sleep(1)
    assert sagas_of(live_stack, p["purchase_id"]) == []


def test_a_pending_refund_settled_by_webhook_needs_no_polling(
    live_stack: LiveStack, processor: httpx.Client
) -> None:
    p = seed(live_stack, "pending_refund")  # settles at the processor 3 s after the refund
    started = refund_json(
        live_stack, "start", str(p["purchase_id"]), "--reason", "duplicate", "--as", "sam"
    )
    workflow_id = started["workflow_id"]
    assert refund(live_stack, "approve", workflow_id, "--as", "bob").returncode == 0
    done = until(lambda: (s := status(live_stack, workflow_id))["state"] == "COMPLETED" and s)

    (refund_id,) = done["refund"]["processor_refund_ids"]
    log = processor.get("/_sandbox/requests").json()
    reads = [r for r in log if r["method"] == "GET" and r["path"] == f"/v1/refunds/{refund_id}"]
    # One read, after the processor's event woke the saga; no timed polls before it.
    assert len(reads) == 1
    assert ledger_cents(live_stack, p["purchase_id"]) == p["amount_cents"]


def test_a_refund_failed_after_completion_opens_one_ops_task(
    live_stack: LiveStack, processor: httpx.Client
) -> None:
    p = seed(live_stack, "standard")
    started = refund_json(
        live_stack, "start", str(p["purchase_id"]), "--reason", "duplicate", "--as", "sam"
    )
    workflow_id = started["workflow_id"]
    assert refund(live_stack, "approve", workflow_id, "--as", "bob").returncode == 0
    done = until(lambda: (s := status(live_stack, workflow_id))["state"] == "COMPLETED" and s)
    (refund_id,) = done["refund"]["processor_refund_ids"]

    processor.post(f"/_sandbox/refunds/{refund_id}/fail", json={}).raise_for_status()
    task_id = f"refund-failed-{refund_id}"
    until(lambda: [t for t in refund_json(live_stack, "failed", "list") if t["task_id"] == task_id])
    # A second report of the same failure (a retried delivery) finds the same task.
    processor.post("/_sandbox/webhooks/flush", json={"timeout_s": 30}).raise_for_status()
    listed = [r for r in sagas_of(live_stack, p["purchase_id"]) if r["workflow_id"] == task_id]
    assert [r["state"] for r in listed] == ["OPS_TASK_OPEN"]
    shown = until(lambda: (t := refund_json(live_stack, "failed", "show", task_id))["check"] and t)
    assert ledger_cents(live_stack, p["purchase_id"]) == 0  # the ledger follows the processor
    assert shown["state"] == "OPS_TASK_OPEN"

    closed = refund(
        live_stack, "failed", "close", refund_id, "--as", "olivia", "--note", "paid by transfer"
    )
    assert closed.returncode == 0, closed.stderr
    assert refund_json(live_stack, "failed", "show", task_id)["state"] == "OPS_TASK_CLOSED"
    assert [t for t in refund_json(live_stack, "failed", "list") if t["task_id"] == task_id] == []
    # The sweep reports the failure again: the decision stands, no new run hides it.
    assert refund(live_stack, "schedules", "sweep-now").returncode == 0
    time.sleep(3)
    assert refund_json(live_stack, "failed", "show", task_id)["state"] == "OPS_TASK_CLOSED"
