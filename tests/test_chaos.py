"""The chaos harness: its report on a breach, and a small run on its own stack.

The invariants themselves are checked in test_invariants.py.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from reliability.config import ChaosConfig
from reliability.faults import endpoint
from reliability.invariants import check_invariants
from reliability.records import RunRecord, SagaRun
from reliability.report import build_report, format_table
from tests.test_invariants import SCENARIOS, good_facts, make_plan

REPO = Path(__file__).resolve().parents[1]


def test_the_report_says_breached_and_names_the_saga() -> None:
    plan = make_plan("partial")
    facts = dataclasses.replace(good_facts(plan), ledger_refunded_cents=0)
    invariants = check_invariants([(plan, facts)])
    report = build_report(
        config=ChaosConfig(n=1, seed=1),
        plans=[plan],
        runs=[SagaRun(end_state="COMPLETED")],
        record=RunRecord(),
        faults={},
        invariants=invariants,
        timings={"total": 1.0},
    )
    assert report["ok"] is False
    table = format_table(report)
    assert "ledger_matches_processor" in table and "BREACHED (1)" in table
    assert plan.workflow_id in table and table.endswith("INVARIANTS BREACHED")


def test_endpoints_hide_identifiers() -> None:
    assert endpoint("POST", "/v1/refunds") == "POST /v1/refunds"
    assert endpoint("GET", "/v1/charges/ch_1") == "GET /v1/charges/{charge}"
    assert (
        endpoint("DELETE", "/v1/members/M-1/entitlements/CE-1")
        == "DELETE /v1/members/{member}/entitlements/{product}"
    )


@pytest.mark.devserver
def test_a_small_chaos_run_holds_every_invariant(tmp_path: Path) -> None:
    # Small enough for CI: 12 sagas (two per scenario), two worker kills, one Temporal restart,
    # two resets, two key prunings, faults on both sandboxes, no AMS outage (it alone would
    # take minutes).
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "reliability.chaos",
            "--n",
            "12",
            "--seed",
            "7",
            "--outage-s",
            "0",
            "--timeout-s",
            "90",
            "--json",
            "--data-dir",
            str(tmp_path / "chaos"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    report = json.loads(done.stdout)
    assert report["ok"] and all(i["ok"] for i in report["invariants"])
    assert report["end_states"] == report["expected_end_states"]
    assert set(report["scenarios"]) == set(SCENARIOS)
    assert report["chaos"]["worker_kills"] == 2
    assert report["chaos"]["temporal_restarts"] == 1
    # A reset run ends as its original would have, on the same refund: the invariants above
    # hold for it; these say the resets and the key pruning did happen.
    chaos = report["chaos"]
    assert chaos["resets"] == chaos["planned_resets"] == 2
    assert all(r["new_run_id"] != r["old_run_id"] for r in chaos["reset_list"])
    assert chaos["key_prunes"] == 2 and any(p["in_flight"] for p in chaos["prunes"])
    assert sum(report["faults"]["total"][k] for k in ("error", "timeout", "drop", "lost_response"))
