"""Exactly once on the embedded stack, driven as people would: a reset with the Temporal CLI
after an approval pays no refund twice, and a saga started around the `refund` CLI is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from refundsaga.store import OasisStore
from tests.fixtures.stack import LiveStack
from tests.test_e2e import charge, refund, refund_json, seed

pytestmark = pytest.mark.devserver

TEMPORAL = str(Path(sys.executable).parent / "temporal")


def temporal(live: LiveStack, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [TEMPORAL, *args, "--address", f"127.0.0.1:{live.settings.temporal_port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def events(live: LiveStack, workflow_id: str) -> list[dict[str, Any]]:
    done = temporal(live, "workflow", "show", "--workflow-id", workflow_id, "--output", "json")
    history: dict[str, Any] = json.loads(done.stdout)
    found: list[dict[str, Any]] = history["events"]
    return found


def run_id(live: LiveStack, workflow_id: str) -> str:
    done = temporal(live, "workflow", "describe", "--workflow-id", workflow_id, "--output", "json")
    info: dict[str, Any] = json.loads(done.stdout)["workflowExecutionInfo"]
    return str(info["execution"]["runId"])


def before_the_approval(history: list[dict[str, Any]]) -> int:
    """The last workflow task completed before the approval reached the saga."""
    last_completed = 0
    for event in history:
        kind = event["eventType"]
        # `refund start`'s `planned` update comes with the start: not an approval.
        planned = '"planned"' in json.dumps(event)
        if kind in ("EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED", "WorkflowExecutionSignaled") or (
            ("UPDATE_ACCEPTED" in kind or "UpdateAccepted" in kind) and not planned
        ):
            return last_completed
        if kind in ("EVENT_TYPE_WORKFLOW_TASK_COMPLETED", "WorkflowTaskCompleted"):
            last_completed = int(event["eventId"])
    raise AssertionError("no approval in the history")


def ledger_cents(live: LiveStack, purchase_id: int) -> int:
    store = OasisStore.from_url(live.settings.resolved_database_url)
    try:
        snapshot = store.load_purchase(purchase_id)
        assert snapshot is not None
        return snapshot.refunded_cents
    finally:
        store.close()


@pytest.mark.parametrize("approve_by", ["cli", "signal"])
def test_a_reset_after_the_approval_pays_the_refund_once(
    live_stack: LiveStack, approve_by: str
) -> None:
    p = seed(live_stack, "partial")
    started = refund_json(
        live_stack,
        "start",
        str(p["purchase_id"]),
        "--amount",
        "2500",
        "--reason",
        "r",
        "--as",
        "sam",
    )
    workflow_id = started["workflow_id"]
    if approve_by == "cli":
        refund_json(live_stack, "approve", workflow_id, "--as", "bob")
    else:
        temporal(
            live_stack,
            "workflow",
            "signal",
            "--workflow-id",
            workflow_id,
            "--name",
            "approve",
            "--input",
            json.dumps({"approver": "bob"}),
        )
    done = refund_json(
        live_stack, "status", workflow_id, "--wait-for", "COMPLETED", "--timeout", "60"
    )
    assert done["state"] == "COMPLETED"
    assert charge(live_stack, p["charge_id"])["amount_refunded"] == 2500

    first_run = run_id(live_stack, workflow_id)
    reset_to = before_the_approval(events(live_stack, workflow_id))
    temporal(
        live_stack,
        "workflow",
        "reset",
        "--workflow-id",
        workflow_id,
        "--event-id",
        str(reset_to),
        "--reason",
        "ops pressed Reset",
    )
    again = refund_json(
        live_stack, "status", workflow_id, "--wait-for", "COMPLETED", "--timeout", "60"
    )
    # The reset run re-applied the approval and finished: a new run, the same request.
    assert run_id(live_stack, workflow_id) != first_run
    assert again["state"] == "COMPLETED"

    held = charge(live_stack, p["charge_id"])
    assert [r["amount"] for r in held["refunds"]["data"]] == [2500]
    assert held["amount_refunded"] == 2500
    assert ledger_cents(live_stack, p["purchase_id"]) == 2500
    assert again["request_id"] == done["request_id"]
    assert refund(live_stack, "status", workflow_id).returncode == 0


def test_a_second_saga_started_with_the_temporal_cli_moves_no_money(
    live_stack: LiveStack,
) -> None:
    p = seed(live_stack, "standard")
    first = refund_json(live_stack, "start", str(p["purchase_id"]), "--reason", "r", "--as", "sam")[
        "workflow_id"
    ]
    refund_json(live_stack, "status", first, "--wait-for", "AWAITING_APPROVAL", "--timeout", "60")
    # Around the CLI, under another workflow id: only the store's claim can stop it.
    raw = f"raw-{p['purchase_id']}"
    temporal(
        live_stack,
        "workflow",
        "start",
        "--type",
        "RefundSaga",
        "--task-queue",
        live_stack.settings.task_queue,
        "--workflow-id",
        raw,
        "--input",
        json.dumps({"purchase_id": p["purchase_id"], "reason": "again", "requested_by": "sam"}),
    )
    temporal(live_stack, "workflow", "result", "--workflow-id", raw)
    second = refund_json(live_stack, "status", raw)
    assert second["state"] == "FAILED"
    assert "already has a refund in flight" in second["error"]

    refund_json(live_stack, "approve", first, "--as", "bob")
    done = refund_json(live_stack, "status", first, "--wait-for", "COMPLETED", "--timeout", "60")
    assert done["state"] == "COMPLETED"
    held = charge(live_stack, p["charge_id"])
    assert [r["amount"] for r in held["refunds"]["data"]] == [p["amount_cents"]]
    assert ledger_cents(live_stack, p["purchase_id"]) == p["amount_cents"]
