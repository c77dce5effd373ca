"""The chaos run's invariants, pure: each holds on a correct outcome and reports a broken one."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from reliability.faults import PRUNE_ADVANCE_S, PruneRecord, ResetRecord
from reliability.invariants import (
    SAGA_INVARIANTS,
    access_violations,
    check_chaos,
    check_invariants,
    check_resets_and_prunes,
    check_restarts,
    end_state_violations,
    entitlement_violations,
    ledger_violations,
    ops_task_violations,
    processor_event_shortfalls,
    processor_refund_violations,
    progress_violations,
    reconciliation_violations,
    restart_violations,
    saga_overlap_violations,
)
from reliability.records import (
    LedgerRow,
    OpsTaskFact,
    ProcessorDisputeFact,
    ProcessorRefundFact,
    RestartRecord,
    SagaExecutionFact,
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


def make_plan(
    scenario: str = "standard",
    *,
    reject: bool = False,
    index: int = 0,
    money_back: str | None = None,
    money_back_cents: int | None = None,
    fail_late: bool = False,
) -> SagaPlan:
    """A plan as the harness makes it; `money_back` makes the money go back outside OASIS (an
    `already_refunded` purchase was refunded before anyone listened: support's saga finds it)."""
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
        partial_cents=2_500 if scenario == "partial" and money_back is None else None,
        reject=reject,
        approvers=("bob", "alice", "carol"),
        entitlement_source=source,
        ams_member_id=member,
        ams_product_code="CODE" if member else None,
        progress_seeded=progress,
        money_back=money_back,
        money_back_cents=(money_back_cents or price) if money_back else 0,
        fail_late=fail_late,
    )


def _run(plan: SagaPlan, run_id: str = "run-1", **changes: Any) -> SagaExecutionFact:
    """The saga's run as Temporal lists it after a correct run."""
    reconciled = None
    if plan.reconciles and not plan.reject:
        reconciled = f"dp_{plan.index}" if plan.money_back == "dispute" else f"re_ext{plan.index}"
    run = SagaExecutionFact(
        workflow_id=plan.workflow_id,
        run_id=run_id,
        status="COMPLETED",
        state=plan.expected_state,
        source="webhook" if plan.reconciles else None,
        started_at=100.0,
        closed_at=160.0,
        reconciled=reconciled,
    )
    return dataclasses.replace(run, **changes)


def good_facts(plan: SagaPlan) -> SagaFacts:
    """What a correct run leaves behind for this plan."""
    refunds: list[ProcessorRefundFact] = []
    if plan.external_cents:
        refunds.append(
            ProcessorRefundFact(f"re_ext{plan.index}", plan.external_cents, "succeeded", None)
        )
    if plan.asked_cents:
        refunds.append(
            ProcessorRefundFact(
                f"re_{plan.index}",
                plan.asked_cents,
                "failed" if plan.fail_late else "succeeded",
                plan.workflow_id,
            )
        )
    disputes = (
        (ProcessorDisputeFact(f"dp_{plan.index}", plan.chargeback_cents, "lost"),)
        if plan.chargeback_cents
        else ()
    )
    rows = (
        ()
        if plan.reject
        else (
            *(
                LedgerRow(
                    r.refund_id,
                    r.amount_cents,
                    r.status,
                    "processor" if r.workflow_id else "external",
                )
                for r in refunds
            ),
            *(LedgerRow(d.dispute_id, d.amount_cents, "succeeded", "chargeback") for d in disputes),
        )
    )
    ams = None
    if plan.entitlement_source == "ams":
        ams = "removed" if plan.revokes else "active"
    elif plan.entitlement_source == "ams_manual":
        ams = "active"
    tasks = (
        (OpsTaskFact(f"refund-failed-re_{plan.index}", "task-1", "COMPLETED", "OPS_TASK_CLOSED"),)
        if plan.fail_late
        else ()
    )
    return SagaFacts(
        end_state=plan.expected_state,
        saga_ams_state="confirmed"
        if plan.entitlement_source == "ams_manual" and plan.revokes
        else None,
        processor_refunds=tuple(refunds),
        processor_refunded_cents=sum(r.amount_cents for r in refunds if r.status == "succeeded"),
        ledger_refunded_cents=plan.ledger_cents,
        purchase_status=plan.purchase_status,
        ledger_rows=rows,
        archived=plan.progress_seeded if plan.revokes else 0,
        progress_left=0 if plan.revokes else plan.progress_seeded,
        ams_entitlement=ams,
        processor_disputes=disputes,
        sagas=(_run(plan),),
        ops_tasks=tasks,
    )


def outside_plans(start: int = 0) -> list[SagaPlan]:
    """Money back outside OASIS for each kind of product, and refunds failing late."""
    plans: list[SagaPlan] = []
    for scenario in ("standard", "partial", "manual_ams", "oasis_entitled", "pending_refund"):
        price = _SOURCES[scenario][1]
        for money_back, cents in (("refund", None), ("refund", price // 2), ("dispute", None)):
            plans.append(
                make_plan(
                    scenario,
                    index=start + len(plans),
                    money_back=money_back,
                    money_back_cents=cents,
                )
            )
    for scenario in ("standard", "oasis_entitled"):
        plans.append(make_plan(scenario, index=start + len(plans), fail_late=True))
    return plans


def every_plan() -> list[SagaPlan]:
    plans: list[SagaPlan] = []
    for scenario in SCENARIOS:
        for reject in (False, True):
            plans.append(make_plan(scenario, reject=reject, index=len(plans)))
    return [*plans, *outside_plans(len(plans))]


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
    access_violations,
    saga_overlap_violations,
    reconciliation_violations,
    ops_task_violations,
]


def _plan_id(plan: SagaPlan) -> str:
    outside = f"-{plan.money_back}{'' if plan.full else '-part'}" if plan.money_back else ""
    return f"{plan.scenario}-{plan.reject}{outside}{'-late' if plan.fail_late else ''}"


# -- every invariant on correct outcomes --------------------------------------------------------


@pytest.mark.parametrize("plan", every_plan(), ids=_plan_id)
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
        "access_follows_money",
        "one_saga_per_purchase",
        "one_reconciliation_per_object",
        "one_ops_task_per_late_failure",
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


# -- money back outside OASIS, sagas and ops tasks ----------------------------------------------


def test_a_lost_dispute_must_be_in_the_ledger_as_a_chargeback() -> None:
    plan = make_plan(money_back="dispute")
    assert plan.workflow_id == "reconcile-1" and plan.ledger_cents == 9_995
    facts = good_facts(plan)
    assert ledger_violations(plan, facts) == []
    assert ledger_violations(plan, broken(plan, ledger_rows=())) == [
        "reconcile-1 (standard, dispute lost): ledger chargebacks [] but the processor's lost "
        "disputes are [('dp_0', 9995)]"
    ]
    # The chargeback recorded as a refund: the ledger's refunds differ from the processor's.
    as_refund = (LedgerRow("dp_0", 9_995, "succeeded", "external"),)
    assert len(ledger_violations(plan, broken(plan, ledger_rows=as_refund))) == 2
    won = (ProcessorDisputeFact("dp_0", 9_995, "won"),)
    assert processor_refund_violations(plan, broken(plan, processor_disputes=won)) == [
        "reconcile-1 (standard, dispute lost): disputes dp_0 9995 won, expected 9995 lost"
    ]


def test_a_refund_failed_late_counts_nothing_and_leaves_access_taken() -> None:
    plan = make_plan(fail_late=True)
    facts = good_facts(plan)
    assert plan.ledger_cents == 0 and plan.purchase_status == "revoked"
    assert processor_refund_violations(plan, facts) == []
    succeeded = (ProcessorRefundFact("re_0", 9_995, "succeeded", plan.workflow_id),)
    assert processor_refund_violations(
        plan, broken(plan, processor_refunds=succeeded, processor_refunded_cents=9_995)
    ) == [
        "refund-1 (standard, fails late): refunds by the saga: re_0 9995 succeeded, expected "
        "one of 9995 failed late",
        "refund-1 (standard, fails late): charge ch_0 amount_refunded 9995, expected 0",
    ]
    # The ledger still counting the failed refund.
    assert ledger_violations(
        plan,
        broken(
            plan,
            ledger_rows=(LedgerRow("re_0", 9_995, "succeeded", "processor"),),
            ledger_refunded_cents=9_995,
            purchase_status="refunded",
        ),
    ) == [
        "refund-1 (standard, fails late): ledger rows [('re_0', 9995)] but the processor holds []",
        "refund-1 (standard, fails late): purchase.refunded_cents 9995, expected 0 (processor: 0)",
        "refund-1 (standard, fails late): purchase status refunded, expected revoked",
    ]


@pytest.mark.parametrize(
    ("plan", "changes", "expected"),
    [
        (
            make_plan(money_back="refund"),
            {"progress_left": 6, "archived": 0},
            "reconcile-1 (standard, refunded outside): has access, though the money went back "
            "(6 progress left, purchase refunded, AMS removed)",
        ),
        (
            make_plan("oasis_entitled", money_back="dispute"),
            {"purchase_status": "active"},
            "reconcile-1 (oasis_entitled, dispute lost): has access, though the money went back "
            "(0 progress left, purchase active, AMS None)",
        ),
        (
            make_plan("manual_ams", money_back="refund"),
            {"saga_ams_state": "pending"},
            "reconcile-1 (manual_ams, refunded outside): has access, though the money went back "
            "(0 progress left, purchase refunded, AMS active)",
        ),
        (
            make_plan("partial", money_back="refund", money_back_cents=10_000),
            {"ams_entitlement": "removed"},
            "reconcile-1 (partial, partly refunded outside): lost access, though only part of "
            "the money went back (4 progress left, purchase partially_refunded, AMS removed)",
        ),
        (
            make_plan(reject=True),
            {"ams_entitlement": "removed"},
            "refund-1 (standard, rejected): lost access, though the refund was rejected "
            "(6 progress left, purchase active, AMS removed)",
        ),
    ],
)
def test_access_must_follow_the_money(
    plan: SagaPlan, changes: dict[str, Any], expected: str
) -> None:
    assert access_violations(plan, good_facts(plan)) == []
    facts = broken(plan, **changes)
    # Progress left also grants access: take it away to see the entitlement's part alone.
    if "progress_left" not in changes and not plan.revokes:
        facts = dataclasses.replace(facts, progress_left=0)
        expected = expected.replace(f"({plan.progress_seeded} progress", "(0 progress")
    assert access_violations(plan, facts) == [expected]


def test_access_is_judged_once_the_saga_ended_as_planned() -> None:
    plan = make_plan(money_back="refund")
    waiting = broken(plan, end_state=None, progress_left=6, archived=0)
    assert access_violations(plan, waiting) == []
    assert end_state_violations(plan, waiting) != []


def test_two_sagas_of_a_purchase_at_the_same_time_are_reported() -> None:
    plan = make_plan(money_back="refund")
    mine = good_facts(plan).sagas[0]
    support = dataclasses.replace(
        mine, workflow_id="refund-1", source=None, reconciled=None, started_at=150.0
    )
    assert saga_overlap_violations(plan, broken(plan, sagas=(mine, support))) == [
        "reconcile-1 (standard, refunded outside): other sagas of the purchase: refund-1",
        "reconcile-1 (standard, refunded outside): reconcile-1 and refund-1 ran at the same time",
    ]
    # One after the other: not at the same time, yet a saga this run never asked for.
    later = dataclasses.replace(support, started_at=170.0, closed_at=None)
    assert saga_overlap_violations(plan, broken(plan, sagas=(mine, later))) == [
        "reconcile-1 (standard, refunded outside): other sagas of the purchase: refund-1"
    ]
    # A reset's runs follow each other under one workflow id: one saga.
    reset = dataclasses.replace(mine, run_id="run-2", started_at=130.0, closed_at=None)
    old = dataclasses.replace(mine, status="TERMINATED", closed_at=130.0, reconciled=None)
    assert saga_overlap_violations(plan, broken(plan, sagas=(old, reset))) == []
    assert saga_overlap_violations(plan, broken(plan, sagas=())) == [
        "reconcile-1 (standard, refunded outside): Temporal lists no run of its saga"
    ]


def test_money_back_reconciled_twice_or_never_is_reported() -> None:
    plan = make_plan(money_back="refund")
    mine = good_facts(plan).sagas[0]
    again = dataclasses.replace(mine, run_id="run-2", started_at=200.0, closed_at=210.0)
    label = "reconcile-1 (standard, refunded outside)"
    assert reconciliation_violations(plan, broken(plan, sagas=(mine, again))) == [
        f"{label}: re_ext0 reconciled 2 times: reconcile-1/run-1, reconcile-1/run-2"
    ]
    unfinished = dataclasses.replace(mine, status="RUNNING", closed_at=None, reconciled=None)
    assert reconciliation_violations(plan, broken(plan, sagas=(unfinished,))) == [
        f"{label}: re_ext0 went back outside OASIS and was never reconciled"
    ]
    # A saga's own refund taken for money back outside OASIS.
    support = make_plan()
    wrong = _run(support, reconciled="re_0", workflow_id="reconcile-1", source="webhook")
    assert reconciliation_violations(support, broken(support, sagas=(_run(support), wrong))) == [
        "refund-1 (standard): re_0 was reconciled, but it is no money back outside OASIS: "
        "reconcile-1/run-1"
    ]


def test_a_late_failure_needs_exactly_one_closed_ops_task() -> None:
    plan = make_plan(fail_late=True)
    task = good_facts(plan).ops_tasks[0]
    label = "refund-1 (standard, fails late)"
    assert ops_task_violations(plan, broken(plan, ops_tasks=())) == [
        f"{label}: refund re_0 failed late: 0 ops tasks, expected 1"
    ]
    second = dataclasses.replace(task, run_id="task-2")
    assert ops_task_violations(plan, broken(plan, ops_tasks=(task, second))) == [
        f"{label}: refund re_0 failed late: 2 ops tasks, expected 1"
    ]
    # A later report of the same failure, refused because it was decided: not a second task.
    refused = dataclasses.replace(task, run_id="task-2", state="OPS_TASK_REFUSED")
    assert ops_task_violations(plan, broken(plan, ops_tasks=(task, refused))) == []
    still_open = dataclasses.replace(task, status="RUNNING", state="OPS_TASK_OPEN")
    assert ops_task_violations(plan, broken(plan, ops_tasks=(still_open,))) == [
        f"{label}: refund re_0 failed late: its task is OPS_TASK_OPEN, not closed"
    ]
    other = make_plan()
    stray = OpsTaskFact("refund-failed-re_0", "task-1", "RUNNING", "OPS_TASK_OPEN")
    assert ops_task_violations(other, broken(other, ops_tasks=(stray,))) == [
        "refund-1 (standard): an ops task for refund re_0, which did not fail late"
    ]


@pytest.mark.parametrize(
    ("plan", "changes", "invariant"),
    [
        (
            make_plan(money_back="refund"),
            {"progress_left": 6, "archived": 0},
            "access_follows_money",
        ),
        (make_plan(money_back="refund"), {"sagas": ()}, "one_saga_per_purchase"),
        (
            make_plan(money_back="dispute"),
            {"sagas": (_run(make_plan(money_back="dispute"), reconciled=None),)},
            "one_reconciliation_per_object",
        ),
        (make_plan(fail_late=True), {"ops_tasks": ()}, "one_ops_task_per_late_failure"),
        (make_plan(money_back="dispute"), {"ledger_rows": ()}, "ledger_matches_processor"),
    ],
)
def test_each_broken_processor_event_fact_is_reported_under_its_invariant(
    plan: SagaPlan, changes: dict[str, Any], invariant: str
) -> None:
    found = breached([(plan, broken(plan, **changes))])
    assert invariant in found, found
    assert all(plan.workflow_id in breach for breach in found[invariant])


def test_processor_event_chaos_must_happen() -> None:
    happened = processor_event_shortfalls(
        webhooks={"dropped": 3, "duplicated": 2},
        receiver_kills=1,
        planned_receiver_kills=1,
        money_back=3,
        planned_money_back=3,
        late_failures=1,
        planned_late_failures=1,
    )
    assert happened == []
    quiet = processor_event_shortfalls(
        webhooks={"dropped": 0, "duplicated": 0},
        receiver_kills=0,
        planned_receiver_kills=1,
        money_back=1,
        planned_money_back=3,
        late_failures=0,
        planned_late_failures=1,
    )
    assert quiet == [
        "no webhook delivery was dropped",
        "no webhook delivery was duplicated",
        "0 webhook receiver kills, 1 planned",
        "1 refunds or disputes outside OASIS, 3 planned",
        "0 late refund failures, 1 planned",
    ]
    # Webhook faults off: their counts are not asked for.
    off = processor_event_shortfalls(
        webhooks=None,
        receiver_kills=0,
        planned_receiver_kills=0,
        money_back=0,
        planned_money_back=0,
        late_failures=0,
        planned_late_failures=0,
    )
    assert off == []
