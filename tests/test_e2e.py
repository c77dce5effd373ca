"""End to end on the embedded stack: the real dev server, sandboxes, store and worker
processes, driven through the `refund` CLI and `starter.py` as people would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from console import stack
from refundsaga.store import OasisStore
from tests.fixtures.stack import LiveStack

pytestmark = pytest.mark.devserver

REPO = Path(__file__).resolve().parents[1]
REFUND = [sys.executable, "-m", "console.cli"]


def refund(
    live: LiveStack, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REFUND, *args],
        env=env or live.env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def refund_json(live: LiveStack, *args: str) -> Any:
    done = refund(live, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def seed(live: LiveStack, scenario: str) -> dict[str, Any]:
    (purchase,) = refund_json(live, "seed", "--scenario", scenario)
    return purchase


def charge(live: LiveStack, charge_id: str) -> dict[str, Any]:
    response = httpx.get(
        f"{live.settings.processor_url}/v1/charges/{charge_id}",
        headers={"Authorization": f"Bearer {live.settings.processor_api_key.get_secret_value()}"},
    )
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def sandbox(live: LiveStack, method: str, path: str, body: Any = None) -> Any:
    key = live.settings.processor_api_key.get_secret_value()
    response = httpx.request(
        method,
        f"{live.settings.processor_url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
    )
    response.raise_for_status()
    return response.json()


def test_seed_matches_the_processor_and_the_ams(live_stack: LiveStack) -> None:
    purchases = refund_json(live_stack, "seed")
    assert {p["scenario"] for p in purchases} == {
        "standard",
        "already_refunded",
        "partial",
        "manual_ams",
        "oasis_entitled",
        "pending_refund",
    }
    for p in purchases:
        held = charge(live_stack, p["charge_id"])
        assert (held["amount"], held["currency"]) == (p["amount_cents"], p["currency"])
        assert held["refunded"] == (p["scenario"] == "already_refunded")
        if p["ams_member_id"]:
            member = httpx.get(
                f"{live_stack.settings.ams_url}/_sandbox/members/{p['ams_member_id']}",
                headers={
                    "Authorization": f"Bearer {live_stack.settings.ams_api_key.get_secret_value()}"
                },
            ).json()
            codes = [e["product_code"] for e in member["entitlements"] if e["status"] == "active"]
            assert codes == [p["ams_product_code"]]
        else:
            assert p["scenario"] == "oasis_entitled" and p["ams_product_code"] is None


def test_cli_refund_end_to_end_with_every_refusal(live_stack: LiveStack) -> None:
    p = seed(live_stack, "standard")
    pid = str(p["purchase_id"])

    # Invalid input: refused, exit 2, nothing started.
    bad = refund(live_stack, "start", pid, "--reason", "x", "--as", "sam", "--amount", "0")
    assert bad.returncode == 2 and "amount_cents" in bad.stderr
    assert refund_json(live_stack, "list", "--purchase", pid) == []
    email = refund(live_stack, "start", pid, "--reason", "for a@b.org", "--as", "sam")
    assert email.returncode == 2 and "email" in email.stderr

    started = refund_json(live_stack, "start", pid, "--reason", "duplicate", "--as", "sam")
    workflow_id = started["workflow_id"]
    assert started["state"] == "AWAITING_APPROVAL"
    again = refund(live_stack, "start", pid, "--reason", "duplicate", "--as", "sam")
    assert again.returncode == 2 and "already running" in again.stderr

    own = refund(live_stack, "approve", workflow_id, "--as", "sam")
    assert own.returncode == 2  # sam is not an approver (and requested it)
    pending = refund_json(live_stack, "pending", "--approver", "bob")
    assert workflow_id in [s["workflow_id"] for s in pending]
    listed = refund_json(live_stack, "list", "--state", "AWAITING_APPROVAL", "--purchase", pid)
    assert [r["workflow_id"] for r in listed] == [workflow_id]
    assert [r["source"] for r in listed] == ["support"]
    by_support = refund_json(live_stack, "list", "--source", "support", "--purchase", pid)
    assert [r["workflow_id"] for r in by_support] == [workflow_id]
    assert refund_json(live_stack, "list", "--source", "webhook", "--purchase", pid) == []

    approved = refund_json(live_stack, "approve", pid, "--as", "bob")
    assert approved["approvals"] == 1
    done = refund_json(
        live_stack, "status", workflow_id, "--wait-for", "COMPLETED", "--timeout", "60"
    )
    assert done["state"] == "COMPLETED"
    assert done["refund"]["amount_cents"] == p["amount_cents"]
    assert charge(live_stack, p["charge_id"])["amount_refunded"] == p["amount_cents"]
    access = refund_json(
        live_stack, "access", "--user", str(p["user_id"]), "--product", str(p["product_id"])
    )
    assert access == {**access, "has_access": False, "reasons": []}

    late = refund(live_stack, "reject", workflow_id, "--as", "carol")
    assert late.returncode == 2 and "\n" not in late.stderr.strip()
    unknown = refund(live_stack, "status", "refund-does-not-exist")
    assert unknown.returncode == 2 and "no refund saga" in unknown.stderr
    human = refund(live_stack, "status", workflow_id)
    assert human.returncode == 0 and "timeline" in human.stdout and "bob" in human.stdout


def test_temporal_down_is_one_line_and_exit_1(live_stack: LiveStack) -> None:
    env = {**live_stack.env, "REFUND_TEMPORAL_ADDRESS": "127.0.0.1:1"}
    done = refund(live_stack, "status", "refund-1", env=env)
    assert done.returncode == 1
    assert "cannot reach Temporal" in done.stderr and "Traceback" not in done.stderr


def test_starter_csv_dry_run_and_start(live_stack: LiveStack, tmp_path: Path) -> None:
    a = seed(live_stack, "partial")
    b = seed(live_stack, "oasis_entitled")
    rows = tmp_path / "refunds.csv"
    rows.write_text(
        "purchase_id,amount,reason\n"
        f"{a['purchase_id']},1000,goodwill\n"
        f"{b['purchase_id']},,event cancelled\n"
        "abc,10,bad id\n"
        f"{a['purchase_id']},5,twice\n"
        f"{b['purchase_id'] + 100000},12.5,fractional\n"
    )
    cmd = [sys.executable, "starter.py", "--csv", str(rows), "--as", "sam", "--json"]
    dry = subprocess.run(
        [*cmd, "--dry-run"],
        env=live_stack.env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    summary = json.loads(dry.stdout)
    assert dry.returncode == 2
    assert summary["valid"] == 2 and summary["started"] == []
    assert sorted(r["row"] for r in summary["refused"]) == [4, 5, 6]
    assert refund_json(live_stack, "list", "--purchase", str(a["purchase_id"])) == []

    real = subprocess.run(
        cmd, env=live_stack.env, capture_output=True, text=True, cwd=REPO, timeout=60
    )
    summary = json.loads(real.stdout)
    assert sorted(summary["started"]) == sorted(
        [f"refund-{a['purchase_id']}", f"refund-{b['purchase_id']}"]
    )
    rerun = subprocess.run(
        cmd, env=live_stack.env, capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert len(json.loads(rerun.stdout)["already_running"]) == 2


def test_worker_killed_mid_refund_restarts_and_refunds_exactly_once(
    live_stack: LiveStack,
) -> None:
    p = seed(live_stack, "standard")
    # The processor answers refunds slowly, so the worker dies with the request in flight.
    sandbox(live_stack, "POST", "/_sandbox/faults", {"latency_ms": 1500, "paths": ["/v1/refunds"]})
    try:
        started = refund_json(
            live_stack, "start", str(p["purchase_id"]), "--reason", "crash test", "--as", "sam"
        )
        workflow_id = started["workflow_id"]
        sandbox(live_stack, "DELETE", "/_sandbox/requests")
        refund_json(live_stack, "approve", workflow_id, "--as", "carol")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            log = sandbox(live_stack, "GET", "/_sandbox/requests")
            if any(r["method"] == "POST" and r["path"] == "/v1/refunds" for r in log):
                break
            status = refund_json(live_stack, "status", workflow_id)
            if status["state"] == "REFUNDING":
                time.sleep(0.3)  # the POST is on its way
                break
            time.sleep(0.05)
        worker = next(c for c in stack.status(live_stack.settings) if c.name == "worker")
        assert worker.pid
        os.killpg(worker.pid, signal.SIGKILL)
        time.sleep(0.5)
    finally:
        sandbox(live_stack, "POST", "/_sandbox/faults", {})
    stack.up(live_stack.settings)  # restarts the dead worker
    done = refund_json(
        live_stack, "status", workflow_id, "--wait-for", "COMPLETED", "--timeout", "90"
    )
    assert done["state"] == "COMPLETED"
    held = charge(live_stack, p["charge_id"])
    assert held["amount_refunded"] == p["amount_cents"]
    assert len(held["refunds"]["data"]) == 1
    store = OasisStore.from_url(live_stack.settings.resolved_database_url)
    try:
        snapshot = store.load_purchase(p["purchase_id"])
        assert snapshot is not None and snapshot.refunded_cents == p["amount_cents"]
    finally:
        store.close()


def test_approve_by_query_approves_what_matches_and_reports_refusals(
    live_stack: LiveStack,
) -> None:
    ours = [seed(live_stack, "standard") for _ in range(3)]
    ids = [str(p["purchase_id"]) for p in ours]
    for pid, requester in zip(ids, ("sam", "sam", "bob"), strict=True):
        started = refund_json(live_stack, "start", pid, "--reason", "bulk", "--as", requester)
        refund_json(live_stack, "status", started["workflow_id"], "--wait-for", "AWAITING_APPROVAL")
    mine = "PurchaseId IN (" + ", ".join(f'"{pid}"' for pid in ids) + ")"

    deadline = time.monotonic() + 30
    while True:  # visibility follows the saga's upsert a moment later
        dry = refund_json(live_stack, "approve", "--query", mine, "--as", "bob", "--dry-run")
        if len(dry["matched"]) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(dry["matched"]) == sorted(f"refund-{pid}" for pid in ids)

    # Not on a terminal and no --yes: nothing is sent.
    unconfirmed = refund(live_stack, "approve", "--query", mine, "--as", "bob")
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    assert refund(live_stack, "approve", "--as", "bob").returncode == 2  # neither saga nor query
    bad = refund(live_stack, "approve", "--query", "NoSuchAttribute = 1", "--as", "bob", "--yes")
    assert bad.returncode == 2 and "filter" in bad.stderr
    for pid in ids:
        assert refund_json(live_stack, "status", f"refund-{pid}")["state"] == "AWAITING_APPROVAL"

    # bob approves all three: his own request is refused (four-eyes), the other two go on.
    done = refund(live_stack, "approve", "--query", mine, "--as", "bob", "--yes", "--json")
    assert done.returncode == 2, done.stderr
    report = json.loads(done.stdout)
    assert report["counts"] == {"approved": 2, "refused": 1}
    refused = [r for r in report["results"] if r["outcome"] == "refused"]
    assert [r["workflow_id"] for r in refused] == [f"refund-{ids[2]}"]
    for p in ours[:2]:
        final = refund_json(
            live_stack, "status", f"refund-{p['purchase_id']}", "--wait-for", "COMPLETED"
        )
        assert [a["approver"] for a in final["approvals"]] == ["bob"]
        held = charge(live_stack, p["charge_id"])
        assert held["amount_refunded"] == held["amount"]
    waiting = refund_json(live_stack, "status", f"refund-{ids[2]}")
    assert waiting["state"] == "AWAITING_APPROVAL" and waiting["approvals"] == []
    assert charge(live_stack, ours[2]["charge_id"])["amount_refunded"] == 0
