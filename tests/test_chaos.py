"""The chaos harness: its invariant checker on broken outcomes, and a small run on its own stack."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reliability.chaos import (
    ChaosConfig,
    LedgerRow,
    ProcessorRefundFact,
    RestartRecord,
    RunRecord,
    SagaFacts,
    SagaPlan,
    SagaRun,
    build_report,
    check_chaos,
    check_invariants,
    check_restarts,
    endpoint,
    format_table,
)

REPO = Path(__file__).resolve().parents[1]

_SOURCES = {
    "standard": ("ams", 9_995, 6),
    "already_refunded": ("ams", 9_995, 3),
    "partial": ("ams", 24_900, 4),
    "manual_ams": ("ams_manual", 59_900, 2),
    "oasis_entitled": ("oasis", 4_900, 5),
    "pending_refund": ("ams", 9_995, 2),
}


def make_plan(scenario: str = "standard", *, reject: bool = False, index: int = 0) -> SagaPlan:
    source, price, progress = _SOURCES[scenario]
    member = None if source == "oasis" else f"M-{index}"
    return SagaPlan(
        index=index,
        scenario=scenario,
        purchase_id=index + 1,
        user_id=index + 1,
        product_id=1,
        charge_id=f"ch_{index}",
        purchase_cents=price,
        partial_cents=2_500 if scenario == "partial" else None,
        reject=reject,
        approvers=("bob", "alice", "carol"),
        entitlement_source=source,
        ams_member_id=member,
        ams_product_code="CODE" if member else None,
        progress_seeded=progress,
    )


def good_facts(plan: SagaPlan) -> SagaFacts:
    """What a correct run leaves behind for this plan."""
    refunds: list[ProcessorRefundFact] = []
    if plan.external_cents:
        refunds.append(
            ProcessorRefundFact(f"re_ext{plan.index}", plan.external_cents, "succeeded", None)
        )
    if plan.asked_cents:
        refunds.append(
            ProcessorRefundFact(f"re_{plan.index}", plan.asked_cents, "succeeded", plan.workflow_id)
        )
    rows = (
        ()
        if plan.reject
        else tuple(
            LedgerRow(
                r.refund_id,
                r.amount_cents,
                "succeeded",
                "processor" if r.workflow_id else "external",
            )
            for r in refunds
        )
    )
    ams = None
    if plan.entitlement_source == "ams":
        ams = "removed" if plan.revokes else "active"
    elif plan.entitlement_source == "ams_manual":
        ams = "active"
    status = "active" if plan.reject else ("refunded" if plan.full else "partially_refunded")
    return SagaFacts(
        end_state=plan.expected_state,
        saga_ams_state="confirmed" if plan.entitlement_source == "ams_manual" else None,
        processor_refunds=tuple(refunds),
        processor_refunded_cents=sum(r.amount_cents for r in refunds),
        ledger_refunded_cents=plan.ledger_cents,
        purchase_status=status,
        ledger_rows=rows,
        archived=plan.progress_seeded if plan.revokes else 0,
        progress_left=0 if plan.revokes else plan.progress_seeded,
        ams_entitlement=ams,
    )


def every_plan() -> list[SagaPlan]:
    plans: list[SagaPlan] = []
    for scenario in _SOURCES:
        for reject in (False, True):
            plans.append(make_plan(scenario, reject=reject, index=len(plans)))
    return plans


def breached(outcomes: list[tuple[SagaPlan, SagaFacts]]) -> dict[str, list[str]]:
    return {i.name: i.breaches for i in check_invariants(outcomes) if not i.ok}


def test_correct_outcomes_of_every_scenario_hold_every_invariant() -> None:
    outcomes = [(plan, good_facts(plan)) for plan in every_plan()]
    invariants = check_invariants(outcomes)
    assert [i.name for i in invariants] == [
        "end_states",
        "processor_refunds",
        "ledger_matches_processor",
        "progress_archived",
        "entitlements",
    ]
    assert all(i.ok and i.checked == len(outcomes) for i in invariants), breached(outcomes)


def test_a_duplicated_refund_is_reported_against_its_saga() -> None:
    plans = every_plan()
    outcomes = [(plan, good_facts(plan)) for plan in plans]
    partial = next(i for i, p in enumerate(plans) if p.scenario == "partial" and not p.reject)
    plan, facts = outcomes[partial]
    twice = ProcessorRefundFact("re_again", 2_500, "succeeded", plan.workflow_id)
    outcomes[partial] = (
        plan,
        dataclasses.replace(
            facts,
            processor_refunds=(*facts.processor_refunds, twice),
            processor_refunded_cents=5_000,
        ),
    )
    found = breached(outcomes)
    assert set(found) == {"processor_refunds", "ledger_matches_processor"}
    assert any(
        plan.workflow_id in b and "duplicate refund: 2 refunds" in b
        for b in found["processor_refunds"]
    )
    # The ledger recorded one refund, the processor holds two: that is a breach there too.
    assert all(plan.workflow_id in b for b in found["ledger_matches_processor"])


def _broken(plan: SagaPlan, **changes: Any) -> dict[str, list[str]]:
    return breached([(plan, dataclasses.replace(good_facts(plan), **changes))])


@pytest.mark.parametrize(
    ("plan", "changes", "invariant"),
    [
        (make_plan(), {"end_state": "NEEDS_ATTENTION"}, "end_states"),
        (make_plan(), {"end_state": None}, "end_states"),
        (make_plan(reject=True), {"end_state": "COMPLETED"}, "end_states"),
        (
            make_plan(reject=True),
            {
                "processor_refunds": (ProcessorRefundFact("re_x", 9_995, "succeeded", "refund-1"),),
                "processor_refunded_cents": 9_995,
            },
            "processor_refunds",
        ),
        (
            make_plan(),
            {"processor_refunds": (), "processor_refunded_cents": 0},
            "processor_refunds",
        ),
        (make_plan(), {"ledger_rows": ()}, "ledger_matches_processor"),
        (make_plan(), {"ledger_refunded_cents": 0}, "ledger_matches_processor"),
        (make_plan(), {"purchase_status": "active"}, "ledger_matches_processor"),
        (
            make_plan("already_refunded", reject=True),
            {"ledger_rows": (LedgerRow("re_ext0", 9_995, "succeeded", "external"),)},
            "ledger_matches_processor",
        ),
        (make_plan(), {"archived": 0}, "progress_archived"),
        (make_plan(), {"archived": 5}, "progress_archived"),
        (make_plan("partial"), {"archived": 4, "progress_left": 0}, "progress_archived"),
        (make_plan(), {"ams_entitlement": "active"}, "entitlements"),
        (make_plan("partial"), {"ams_entitlement": "removed"}, "entitlements"),
        (make_plan("manual_ams"), {"ams_entitlement": "removed"}, "entitlements"),
        (make_plan("manual_ams"), {"saga_ams_state": "skipped"}, "entitlements"),
    ],
)
def test_each_broken_fact_is_reported(
    plan: SagaPlan, changes: dict[str, Any], invariant: str
) -> None:
    found = _broken(plan, **changes)
    assert invariant in found, found
    assert all(plan.workflow_id in breach for breach in found[invariant])


def test_restarts_must_touch_only_what_was_down() -> None:
    good = RestartRecord("worker", ("worker",), ("worker",), 12.0)
    assert check_restarts([good]).ok
    too_much = RestartRecord("temporal", ("temporal",), ("temporal", "processor"), 30.0)
    invariant = check_restarts([good, too_much])
    assert not invariant.ok and invariant.checked == 2
    assert "processor" in invariant.breaches[0]
    crashed = RestartRecord("nothing", ("worker",), ("worker",), 40.0)
    assert check_restarts([crashed]).breaches == [
        "worker went down on its own (found at 40s, the harness had killed nothing)"
    ]
    assert not check_restarts([]).ok  # checked nothing: proves nothing


def test_a_run_without_chaos_does_not_pass() -> None:
    assert check_chaos(kills=2, planned_kills=2, temporal_restarts=1, faults=9, outage=True).ok
    quiet = check_chaos(kills=0, planned_kills=2, temporal_restarts=0, faults=0, outage=False)
    assert len(quiet.breaches) == 4
    failed = check_chaos(
        kills=2, planned_kills=2, temporal_restarts=1, faults=9, outage=True, errors=["boom"]
    )
    assert failed.breaches == ["chaos schedule: boom"]
    unreset = check_chaos(
        kills=2,
        planned_kills=2,
        temporal_restarts=1,
        faults=9,
        outage=True,
        missing=["0 resets, 2 planned"],
    )
    assert unreset.breaches == ["0 resets, 2 planned"]


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
    assert set(report["scenarios"]) == set(_SOURCES)
    assert report["chaos"]["worker_kills"] == 2
    assert report["chaos"]["temporal_restarts"] == 1
    # A reset run ends as its original would have, on the same refund: the invariants above
    # hold for it; these say the resets and the key pruning did happen.
    chaos = report["chaos"]
    assert chaos["resets"] == chaos["planned_resets"] == 2
    assert all(r["new_run_id"] != r["old_run_id"] for r in chaos["reset_list"])
    assert chaos["key_prunes"] == 2 and any(p["in_flight"] for p in chaos["prunes"])
    assert sum(report["faults"]["total"][k] for k in ("error", "timeout", "drop", "lost_response"))
