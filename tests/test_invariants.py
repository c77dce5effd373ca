"""The chaos run's invariants, pure: each holds on a correct outcome and reports a broken one."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from reliability.faults import PRUNE_ADVANCE_S, PruneRecord, ResetRecord
from reliability.invariants import (
    SAGA_INVARIANTS,
    check_chaos,
    check_invariants,
    check_resets_and_prunes,
    check_restarts,
    end_state_violations,
    entitlement_violations,
    ledger_violations,
    processor_refund_violations,
    progress_violations,
    restart_violations,
)
from reliability.records import (
    LedgerRow,
    ProcessorRefundFact,
    RestartRecord,
    SagaFacts,
    SagaPlan,
)

# entitlement source, price, progress records seeded
_SOURCES = {
    "standard": ("ams", 9_995, 6),
    "already_refunded": ("ams", 9_995, 3),
    "partial": ("ams", 24_900, 4),
    "manual_ams": ("ams_manual", 59_900, 2),
    "oasis_entitled": ("oasis", 4_900, 5),
    "pending_refund": ("ams", 9_995, 2),
}
SCENARIOS = tuple(_SOURCES)


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
    for scenario in SCENARIOS:
        for reject in (False, True):
            plans.append(make_plan(scenario, reject=reject, index=len(plans)))
    return plans


def breached(outcomes: list[tuple[SagaPlan, SagaFacts]]) -> dict[str, list[str]]:
    return {i.name: i.breaches for i in check_invariants(outcomes) if not i.ok}


def broken(plan: SagaPlan, **changes: Any) -> SagaFacts:
    return dataclasses.replace(good_facts(plan), **changes)


def with_refunds(plan: SagaPlan, *extra: ProcessorRefundFact) -> SagaFacts:
    """The correct facts plus refunds the charge should not hold, all counted in its total."""
    facts = good_facts(plan)
    added = sum(r.amount_cents for r in extra)
    return dataclasses.replace(
        facts,
        processor_refunds=(*facts.processor_refunds, *extra),
        processor_refunded_cents=facts.processor_refunded_cents + added,
    )


PER_SAGA = [
    end_state_violations,
    processor_refund_violations,
    ledger_violations,
    progress_violations,
    entitlement_violations,
]


# -- every invariant on correct outcomes --------------------------------------------------------


@pytest.mark.parametrize("plan", every_plan(), ids=lambda p: f"{p.scenario}-{p.reject}")
@pytest.mark.parametrize("violations", PER_SAGA, ids=lambda f: f.__name__)
def test_a_correct_outcome_violates_nothing(violations: Any, plan: SagaPlan) -> None:
    assert violations(plan, good_facts(plan)) == []


def test_correct_outcomes_of_every_scenario_hold_every_invariant() -> None:
    outcomes = [(plan, good_facts(plan)) for plan in every_plan()]
    invariants = check_invariants(outcomes)
    # The report's names: a rename breaks whoever reads the JSON.
    assert [i.name for i in invariants] == [
        "end_states",
        "processor_refunds",
        "ledger_matches_processor",
        "progress_archived",
        "entitlements",
    ]
    assert [i.name for i in invariants] == [i.name for i in SAGA_INVARIANTS]
    assert all(i.ok and i.checked == len(outcomes) for i in invariants), breached(outcomes)


def test_an_invariant_that_checked_nothing_does_not_hold() -> None:
    assert all(not i.ok and i.checked == 0 for i in check_invariants([]))
    assert not check_restarts([]).ok


# -- each invariant on a broken outcome ---------------------------------------------------------


def test_a_wrong_end_state_is_reported_with_its_error() -> None:
    plan = make_plan()
    assert end_state_violations(
        plan, broken(plan, end_state="NEEDS_ATTENTION", error="AMS down")
    ) == ["refund-1 (standard): ended NEEDS_ATTENTION, expected COMPLETED; error: AMS down"]
    assert end_state_violations(plan, broken(plan, end_state=None)) == [
        "refund-1 (standard): ended not at all, expected COMPLETED"
    ]
    rejected = make_plan(reject=True)
    assert end_state_violations(rejected, broken(rejected, end_state="COMPLETED")) == [
        "refund-1 (standard, rejected): ended COMPLETED, expected REJECTED"
    ]


def test_a_double_refund_of_a_charge_is_reported_as_a_duplicate() -> None:
    plan = make_plan("partial")
    twice = ProcessorRefundFact("re_again", 2_500, "succeeded", plan.workflow_id)
    assert processor_refund_violations(plan, with_refunds(plan, twice)) == [
        "refund-1 (partial): duplicate refund: 2 refunds by the saga: "
        "re_0 2500 succeeded, re_again 2500 succeeded",
        "refund-1 (partial): charge ch_0 amount_refunded 5000, expected 2500",
    ]
    # A second refund still pending holds money back as well: still a duplicate.
    pending = dataclasses.replace(twice, status="pending")
    assert any(
        "duplicate refund" in v
        for v in processor_refund_violations(plan, with_refunds(plan, pending))
    )
    # A failed attempt moved nothing: one refund, no violation.
    failed = dataclasses.replace(twice, status="failed")
    facts = good_facts(plan)
    tried = dataclasses.replace(facts, processor_refunds=(failed, *facts.processor_refunds))
    assert processor_refund_violations(plan, tried) == []


def test_missing_wrong_or_unasked_refunds_are_reported() -> None:
    plan = make_plan()
    assert processor_refund_violations(
        plan, broken(plan, processor_refunds=(), processor_refunded_cents=0)
    ) == [
        "refund-1 (standard): no refund by the saga, expected 9995",
        "refund-1 (standard): charge ch_0 amount_refunded 0, expected 9995",
    ]
    short = ProcessorRefundFact("re_0", 9_000, "succeeded", plan.workflow_id)
    assert processor_refund_violations(
        plan, broken(plan, processor_refunds=(short,), processor_refunded_cents=9_000)
    )[0] == ("refund-1 (standard): refund re_0 9000 succeeded, expected 9995 succeeded")
    rejected = make_plan(reject=True)
    unasked = ProcessorRefundFact("re_x", 9_995, "succeeded", rejected.workflow_id)
    assert processor_refund_violations(rejected, with_refunds(rejected, unasked)) == [
        "refund-1 (standard, rejected): refunds by the saga, none expected: re_x 9995 succeeded",
        "refund-1 (standard, rejected): charge ch_0 amount_refunded 9995, expected 0",
    ]


def test_a_refund_made_elsewhere_must_be_the_seeded_external_one() -> None:
    plan = make_plan("already_refunded")
    # The saga refunded again what was refunded outside OASIS before it started.
    again = ProcessorRefundFact("re_dup", 9_995, "succeeded", plan.workflow_id)
    assert processor_refund_violations(plan, with_refunds(plan, again))[0] == (
        "refund-1 (already_refunded): refunds by the saga, none expected: re_dup 9995 succeeded"
    )
    other = make_plan()
    stray = ProcessorRefundFact("re_stray", 100, "succeeded", None)
    assert processor_refund_violations(other, with_refunds(other, stray)) == [
        "refund-1 (standard): refunds not by the saga: re_stray 100 succeeded, expected 0",
        "refund-1 (standard): charge ch_0 amount_refunded 10095, expected 9995",
    ]


def test_a_ledger_differing_from_the_processor_is_reported() -> None:
    plan = make_plan()
    assert ledger_violations(plan, broken(plan, ledger_rows=())) == [
        "refund-1 (standard): ledger rows [] but the processor holds [('re_0', 9995)]"
    ]
    wrong = (LedgerRow("re_0", 9_000, "succeeded", "processor"),)
    assert ledger_violations(plan, broken(plan, ledger_rows=wrong)) == [
        "refund-1 (standard): ledger rows [('re_0', 9000)] but the processor holds [('re_0', 9995)]"
    ]
    assert ledger_violations(plan, broken(plan, ledger_refunded_cents=0)) == [
        "refund-1 (standard): purchase.refunded_cents 0, expected 9995 (processor: 9995)"
    ]
    assert ledger_violations(plan, broken(plan, purchase_status="active")) == [
        "refund-1 (standard): purchase status active, expected refunded"
    ]
    # A failed row is the ledger's record of an attempt, not money: it is left out.
    failed = LedgerRow("re_f", 9_995, "failed", "processor")
    facts = good_facts(plan)
    assert ledger_violations(plan, broken(plan, ledger_rows=(*facts.ledger_rows, failed))) == []


def test_a_rejected_saga_must_leave_the_ledger_empty() -> None:
    plan = make_plan("already_refunded", reject=True)
    row = LedgerRow("re_ext0", 9_995, "succeeded", "external")
    assert ledger_violations(plan, broken(plan, ledger_rows=(row,))) == [
        "refund-1 (already_refunded, rejected): ledger rows [('re_ext0', 9995)] but the "
        "processor holds [('re_ext0', 9995)] (rejected: the ledger must stay empty)"
    ]
    partial = make_plan("partial")
    assert ledger_violations(partial, broken(partial, purchase_status="refunded")) == [
        "refund-1 (partial): purchase status refunded, expected partially_refunded"
    ]


def test_progress_deleted_without_its_snapshot_is_reported() -> None:
    plan = make_plan()
    assert progress_violations(plan, broken(plan, archived=0)) == [
        "refund-1 (standard): 0 archived / 0 left, expected 6 archived / 0 left of 6 seeded"
    ]
    assert progress_violations(plan, broken(plan, archived=6, progress_left=2)) == [
        "refund-1 (standard): 6 archived / 2 left, expected 6 archived / 0 left of 6 seeded"
    ]
    partial = make_plan("partial")
    assert progress_violations(partial, broken(partial, archived=4, progress_left=0)) == [
        "refund-1 (partial): 4 archived / 0 left, expected 0 archived / 4 left of 4 seeded"
    ]


def test_access_left_where_the_money_went_back_is_reported() -> None:
    plan = make_plan()
    assert entitlement_violations(plan, broken(plan, ams_entitlement="active")) == [
        "refund-1 (standard): AMS entitlement active, expected removed"
    ]
    partial = make_plan("partial")
    assert entitlement_violations(partial, broken(partial, ams_entitlement="removed")) == [
        "refund-1 (partial): AMS entitlement removed, expected active"
    ]
    rejected = make_plan(reject=True)
    assert entitlement_violations(rejected, broken(rejected, ams_entitlement="removed")) == [
        "refund-1 (standard, rejected): AMS entitlement removed, expected active"
    ]


def test_a_manual_ams_task_must_be_left_to_a_person_and_confirmed() -> None:
    plan = make_plan("manual_ams")
    assert entitlement_violations(plan, broken(plan, ams_entitlement="removed")) == [
        "refund-1 (manual_ams): AMS entitlement removed, expected active"
    ]
    assert entitlement_violations(plan, broken(plan, saga_ams_state="skipped")) == [
        "refund-1 (manual_ams): manual AMS task skipped, expected confirmed"
    ]
    oasis = make_plan("oasis_entitled")
    assert entitlement_violations(oasis, broken(oasis, ams_entitlement="active")) == [
        "refund-1 (oasis_entitled): AMS entitlement active, expected None"
    ]


# -- the aggregate: each breach under its invariant, against its saga ---------------------------


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
def test_each_broken_fact_is_reported_under_its_invariant(
    plan: SagaPlan, changes: dict[str, Any], invariant: str
) -> None:
    invariants = check_invariants([(plan, broken(plan, **changes))])
    found = {i.name: i.breaches for i in invariants if not i.ok}
    assert invariant in found, found
    assert all(plan.workflow_id in breach for breach in found[invariant])
    assert all(i.checked == 1 for i in invariants)


# -- the run as a whole -------------------------------------------------------------------------


def test_restarts_must_touch_only_what_was_down() -> None:
    good = RestartRecord("worker", ("worker",), ("worker",), 12.0)
    assert restart_violations(good) == []
    assert check_restarts([good]).ok
    too_much = RestartRecord("temporal", ("temporal",), ("temporal", "processor"), 30.0)
    assert restart_violations(too_much) == [
        "after killing temporal at 30s: down ['temporal'], restarted ['temporal', 'processor']"
    ]
    invariant = check_restarts([good, too_much])
    assert not invariant.ok and invariant.checked == 2
    assert "processor" in invariant.breaches[0]
    crashed = RestartRecord("nothing", ("worker",), ("worker",), 40.0)
    assert check_restarts([crashed]).breaches == [
        "worker went down on its own (found at 40s, the harness had killed nothing)"
    ]
    left_down = RestartRecord("worker", ("worker",), (), 50.0)
    assert restart_violations(left_down) == [
        "after killing worker at 50s: down ['worker'], restarted []"
    ]


def test_a_run_without_chaos_does_not_pass() -> None:
    assert check_chaos(kills=2, planned_kills=2, temporal_restarts=1, faults=9, outage=True).ok
    quiet = check_chaos(kills=0, planned_kills=2, temporal_restarts=0, faults=0, outage=False)
    assert quiet.breaches == [
        "0 worker kills, 2 planned",
        "0 Temporal restarts, 1 planned",
        "no fault was injected",
        "the planned AMS outage did not happen",
    ]
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


def _reset(workflow_id: str, new_run: str) -> ResetRecord:
    return ResetRecord(workflow_id, "run-old", new_run, 13, "COMPLETED", 10.0)


def test_a_run_must_do_its_resets_and_prunes_and_judge_the_new_run() -> None:
    resets = [_reset("refund-1", "run-a"), _reset("refund-2", "run-b")]
    prunes = [PruneRecord(PRUNE_ADVANCE_S, 4, 1, 5.0), PruneRecord(PRUNE_ADVANCE_S, 0, 0, 9.0)]
    ends: dict[str, str | None] = {"refund-1": "run-a", "refund-2": "run-b", "refund-3": "x"}
    good = check_resets_and_prunes(
        resets=resets, planned_resets=2, prunes=prunes, planned_prunes=2, end_runs=ends
    )
    assert good == []

    stale = check_resets_and_prunes(
        resets=resets,
        planned_resets=3,
        prunes=prunes[1:],
        planned_prunes=2,
        end_runs={**ends, "refund-2": "run-old"},
    )
    assert stale == [
        "2 resets, 3 planned",
        "1 key prunings, 2 planned",
        "no key pruning happened while a saga was in flight",
        "refund-2: judged on run run-old, not the run its reset started (run-b)",
    ]
    # Reset twice: judged on the second reset's run.
    twice = [*resets, _reset("refund-1", "run-c")]
    assert check_resets_and_prunes(
        resets=twice, planned_resets=3, prunes=prunes, planned_prunes=2, end_runs=ends
    ) == ["refund-1: judged on run run-a, not the run its reset started (run-c)"]
