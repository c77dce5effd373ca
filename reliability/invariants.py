"""The chaos run's invariants: pure checks of what was planned against what was found.

Each check reads plain data (`reliability.records`: the plans, the facts collected from the
processor, the store and the AMS, the saga ends, the restarts, resets and prunings) and returns
its violations, one message each that names the saga or the event. The collection is in
`reliability.collect`; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from refundsaga.access import decide_access
from refundsaga.models import EntitlementSource
from reliability.faults import PruneRecord, ResetRecord
from reliability.records import (
    SEEDED_OUTSIDE,
    ProcessorRefundFact,
    RestartRecord,
    SagaFacts,
    SagaPlan,
)

__all__ = [
    "COUNTED_STATUSES",
    "SAGA_INVARIANTS",
    "Invariant",
    "SagaInvariant",
    "access_violations",
    "check_chaos",
    "check_invariants",
    "check_resets_and_prunes",
    "check_restarts",
    "end_state_violations",
    "entitlement_violations",
    "ledger_violations",
    "ops_task_violations",
    "processor_event_shortfalls",
    "processor_refund_violations",
    "progress_violations",
    "reconciliation_violations",
    "restart_violations",
    "saga_label",
    "saga_overlap_violations",
]

# Refunds that hold money back at the processor; failed and canceled ones moved nothing.
COUNTED_STATUSES = ("succeeded", "pending", "requires_action")
# A FailedRefundTask run that found the failure decided already changed nothing: not a task.
REFUSED_TASK = "OPS_TASK_REFUSED"
CLOSED_TASK = "OPS_TASK_CLOSED"


@dataclass
class Invariant:
    """One property of the run; it holds when it was checked at least once and never broke."""

    name: str
    description: str
    checked: int = 0
    breaches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        # A check that looked at nothing proves nothing: it does not count as held.
        return self.checked > 0 and not self.breaches

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def saga_label(plan: SagaPlan) -> str:
    """How a violation names its saga: workflow id, scenario, and what was planned besides."""
    tags = [plan.scenario]
    if plan.reject:
        tags.append("rejected")
    if plan.money_back == "dispute":
        tags.append("dispute lost")
    elif plan.money_back == "refund" and plan.scenario != SEEDED_OUTSIDE:
        tags.append("refunded outside" if plan.full else "partly refunded outside")
    if plan.fail_late:
        tags.append("fails late")
    return f"{plan.workflow_id} ({', '.join(tags)})"


def _money(refunds: Sequence[ProcessorRefundFact]) -> str:
    return ", ".join(f"{r.refund_id} {r.amount_cents} {r.status}" for r in refunds) or "none"


def _counted(facts: SagaFacts) -> list[ProcessorRefundFact]:
    return [r for r in facts.processor_refunds if r.status in COUNTED_STATUSES]


# -- per saga -----------------------------------------------------------------------------------


def end_state_violations(plan: SagaPlan, facts: SagaFacts) -> list[str]:
    """The saga ended COMPLETED, or REJECTED when a rejection was planned."""
    if facts.end_state == plan.expected_state:
        return []
    return [
        f"{saga_label(plan)}: ended {facts.end_state or 'not at all'}, expected "
        f"{plan.expected_state}" + (f"; error: {facts.error}" if facts.error else "")
    ]


def processor_refund_violations(plan: SagaPlan, facts: SagaFacts) -> list[str]:
    """Per charge: one refund by the saga of the asked amount, no duplicate, nothing else; the
    planned dashboard refund or lost dispute; a refund planned to fail late, failed."""
    counted = _counted(facts)
    own = [r for r in counted if r.workflow_id == plan.workflow_id]
    others = [r for r in counted if r.workflow_id != plan.workflow_id]
    problems: list[str] = []
    if plan.fail_late:
        failed = [
            r
            for r in facts.processor_refunds
            if r.workflow_id == plan.workflow_id and r.status == "failed"
        ]
        if own or len(failed) != 1 or failed[0].amount_cents != plan.asked_cents:
            problems.append(
                f"refunds by the saga: {_money([*own, *failed])}, expected one of "
                f"{plan.asked_cents} failed late"
            )
    elif plan.asked_cents == 0 and own:
        problems.append(f"refunds by the saga, none expected: {_money(own)}")
    if plan.asked_cents > 0 and not plan.fail_late:
        if len(own) > 1:
            problems.append(f"duplicate refund: {len(own)} refunds by the saga: {_money(own)}")
        elif not own:
            problems.append(f"no refund by the saga, expected {plan.asked_cents}")
        elif own[0].amount_cents != plan.asked_cents or own[0].status != "succeeded":
            problems.append(f"refund {_money(own)}, expected {plan.asked_cents} succeeded")
    if sum(r.amount_cents for r in others) != plan.external_cents:
        problems.append(
            f"refunds not by the saga: {_money(others)}, expected {plan.external_cents}"
        )
    expected_total = (0 if plan.fail_late else plan.asked_cents) + plan.external_cents
    if facts.processor_refunded_cents != expected_total:
        problems.append(
            f"charge {plan.charge_id} amount_refunded {facts.processor_refunded_cents}, "
            f"expected {expected_total}"
        )
    lost = sum(d.amount_cents for d in facts.processor_disputes if d.status == "lost")
    if lost != plan.chargeback_cents:
        disputes = ", ".join(
            f"{d.dispute_id} {d.amount_cents} {d.status}" for d in facts.processor_disputes
        )
        problems.append(f"disputes {disputes or 'none'}, expected {plan.chargeback_cents} lost")
    return [f"{saga_label(plan)}: {p}" for p in problems]


def ledger_violations(plan: SagaPlan, facts: SagaFacts) -> list[str]:
    """The store's ledger rows, refunded total and purchase status match the processor: its
    refunds row by row, its lost disputes as `chargeback` rows."""
    problems: list[str] = []
    counted = [r for r in facts.ledger_rows if r.status != "failed"]
    rows = {(r.processor_refund_id, r.amount_cents) for r in counted if r.source != "chargeback"}
    held = {(r.refund_id, r.amount_cents) for r in _counted(facts)}
    expected_rows = set() if plan.reject else held
    if rows != expected_rows:
        problems.append(
            f"ledger rows {sorted(rows)} but the processor holds {sorted(held)}"
            + (" (rejected: the ledger must stay empty)" if plan.reject else "")
        )
    chargebacks = {
        (r.processor_refund_id, r.amount_cents) for r in counted if r.source == "chargeback"
    }
    lost = {(d.dispute_id, d.amount_cents) for d in facts.processor_disputes if d.status == "lost"}
    if chargebacks != (set() if plan.reject else lost):
        problems.append(
            f"ledger chargebacks {sorted(chargebacks)} but the processor's lost disputes are "
            f"{sorted(lost)}"
        )
    if facts.ledger_refunded_cents != plan.ledger_cents:
        problems.append(
            f"purchase.refunded_cents {facts.ledger_refunded_cents}, expected "
            f"{plan.ledger_cents} (processor: {facts.processor_refunded_cents})"
        )
    if facts.purchase_status != plan.purchase_status:
        problems.append(f"purchase status {facts.purchase_status}, expected {plan.purchase_status}")
    return [f"{saga_label(plan)}: {p}" for p in problems]


def progress_violations(plan: SagaPlan, facts: SagaFacts) -> list[str]:
    """A revoking saga archived every progress record it deleted; the others touched none."""
    archived, left = (plan.progress_seeded, 0) if plan.revokes else (0, plan.progress_seeded)
    if (facts.archived, facts.progress_left) == (archived, left):
        return []
    return [
        f"{saga_label(plan)}: {facts.archived} archived / {facts.progress_left} left, expected "
        f"{archived} archived / {left} left of {plan.progress_seeded} seeded"
    ]


def entitlement_violations(plan: SagaPlan, facts: SagaFacts) -> list[str]:
    """The AMS entitlement is gone exactly where a full refund completed; manual ones confirmed."""
    violations: list[str] = []
    expected_ams: str | None = None
    if plan.entitlement_source == "ams":
        expected_ams = "removed" if plan.revokes else "active"
    elif plan.entitlement_source == "ams_manual":
        # No integration: the saga must not call the AMS; a person removes it and confirms.
        expected_ams = "active"
    if facts.ams_entitlement != expected_ams:
        violations.append(
            f"{saga_label(plan)}: AMS entitlement {facts.ams_entitlement}, expected {expected_ams}"
        )
    manual = plan.entitlement_source == "ams_manual" and plan.revokes
    if manual and facts.saga_ams_state != "confirmed":
        violations.append(
            f"{saga_label(plan)}: manual AMS task {facts.saga_ams_state}, expected confirmed"
        )
    return violations


def has_access(plan: SagaPlan, facts: SagaFacts) -> bool:
    """OASIS's access rule (`refundsaga.access`) over what the run left.

    Nobody acts on the AMS sandbox for an `ams_manual` product: the operator's confirmation
    stands for the removal they made by hand.
    """
    source = cast(EntitlementSource, plan.entitlement_source)
    entitled = facts.ams_entitlement == "active"
    if source == "ams_manual" and facts.saga_ams_state == "confirmed":
        entitled = False
    return decide_access(
        entitlement_source=source,
        progress_count=facts.progress_left,
        active_purchase=facts.purchase_status in ("active", "partially_refunded"),
        ams_entitled=None if source == "oasis" else entitled,
    ).has_access


def access_violations(plan: SagaPlan, facts: SagaFacts) -> list[str]:
    """Once the saga or reconciliation ended as planned: no access where the money went back
    in full (a refund that failed late included: access comes back only by a decision), access
    kept where only part went back or the refund was rejected."""
    if facts.end_state != plan.expected_state:
        return []  # end_states reports it; access is judged on what was decided
    expected = not plan.revokes
    if has_access(plan, facts) == expected:
        return []
    why = "only part of the money went back" if not plan.full else "the money went back"
    if plan.reject:
        why = "the refund was rejected"
    return [
        f"{saga_label(plan)}: {'has' if not expected else 'lost'} access, though {why} "
        f"({facts.progress_left} progress left, purchase {facts.purchase_status}, AMS "
        f"{facts.ams_entitlement})"
    ]


def saga_overlap_violations(plan: SagaPlan, facts: SagaFacts) -> list[str]:
    """One saga per purchase at a time: the purchase's sagas under other workflow ids (a
    reconciliation beside support's saga) never ran while another did; in this run a purchase
    has one saga, support's or the processor's, so any other is reported too."""
    spans: dict[str, tuple[float, float]] = {}
    for run in facts.sagas:
        start, end = spans.get(run.workflow_id, (run.started_at, run.started_at))
        closed = float("inf") if run.closed_at is None else run.closed_at
        spans[run.workflow_id] = (min(start, run.started_at), max(end, closed))
    problems: list[str] = []
    if plan.workflow_id not in spans:
        problems.append("Temporal lists no run of its saga")
    others = sorted(set(spans) - {plan.workflow_id})
    if others:
        problems.append(f"other sagas of the purchase: {', '.join(others)}")
    ids = sorted(spans)
    for i, first in enumerate(ids):
        for second in ids[i + 1 :]:
            (a0, a1), (b0, b1) = spans[first], spans[second]
            if a0 < b1 and b0 < a1:
                problems.append(f"{first} and {second} ran at the same time")
    return [f"{saga_label(plan)}: {p}" for p in problems]


def reconciliation_violations(plan: SagaPlan, facts: SagaFacts) -> list[str]:
    """Each dashboard refund and lost dispute of the charge was reconciled by exactly one run
    that completed (none when the reconciliation was rejected), and nothing else was reconciled
    (not a refund a saga made)."""
    money_back = {
        r.refund_id
        for r in facts.processor_refunds
        if r.workflow_id is None and r.status == "succeeded"
    } | {d.dispute_id for d in facts.processor_disputes if d.status == "lost"}
    completed: dict[str, list[str]] = {}
    for run in facts.sagas:
        if run.reconciled is not None:
            completed.setdefault(run.reconciled, []).append(f"{run.workflow_id}/{run.run_id}")
    problems: list[str] = []
    for object_id in sorted(money_back):
        runs = completed.get(object_id, [])
        if plan.refunded_at_seeding:
            # Refunded before anyone listened: support's saga records it (branch 4b), and no
            # event or sweep ever reports it.
            if runs:
                problems.append(f"{object_id} was refunded at seeding yet reconciled: {runs}")
            continue
        if not runs and not plan.reject:
            problems.append(f"{object_id} went back outside OASIS and was never reconciled")
        elif len(runs) > 1:
            problems.append(f"{object_id} reconciled {len(runs)} times: {', '.join(runs)}")
    for object_id in sorted(set(completed) - money_back):
        problems.append(
            f"{object_id} was reconciled, but it is no money back outside OASIS: "
            f"{', '.join(completed[object_id])}"
        )
    return [f"{saga_label(plan)}: {p}" for p in problems]


def ops_task_violations(plan: SagaPlan, facts: SagaFacts) -> list[str]:
    """Each refund that failed after its saga completed has exactly one ops task, closed by
    an operator; no other refund has one. Runs that found the failure decided (refused) are
    not tasks: they changed nothing."""
    tasks: dict[str, list[str]] = {}
    for task in facts.ops_tasks:
        if task.state != REFUSED_TASK and task.status != "TERMINATED":
            tasks.setdefault(task.refund_id, []).append(task.state or task.status)
    failed_late = (
        {
            r.refund_id
            for r in facts.processor_refunds
            if r.workflow_id == plan.workflow_id and r.status == "failed"
        }
        if plan.fail_late
        else set()
    )
    problems: list[str] = []
    for refund_id in sorted(failed_late):
        states = tasks.get(refund_id, [])
        if len(states) != 1:
            problems.append(f"refund {refund_id} failed late: {len(states)} ops tasks, expected 1")
        elif states[0] != CLOSED_TASK:
            problems.append(f"refund {refund_id} failed late: its task is {states[0]}, not closed")
    for refund_id in sorted(set(tasks) - failed_late):
        problems.append(f"an ops task for refund {refund_id}, which did not fail late")
    return [f"{saga_label(plan)}: {p}" for p in problems]


@dataclass(frozen=True)
class SagaInvariant:
    name: str
    description: str
    violations: Callable[[SagaPlan, SagaFacts], list[str]]


SAGA_INVARIANTS = (
    SagaInvariant("end_states", "every saga reached its expected end state", end_state_violations),
    SagaInvariant(
        "processor_refunds",
        "per charge, the processor refunded what was asked, no duplicate",
        processor_refund_violations,
    ),
    SagaInvariant(
        "ledger_matches_processor",
        "per charge, the OASIS ledger equals the processor",
        ledger_violations,
    ),
    SagaInvariant(
        "progress_archived",
        "every deleted progress record has its archived snapshot",
        progress_violations,
    ),
    SagaInvariant(
        "entitlements",
        "AMS entitlements removed exactly for the sagas that asked",
        entitlement_violations,
    ),
    SagaInvariant(
        "access_follows_money",
        "no access where the money went back in full; no change where only part did",
        access_violations,
    ),
    SagaInvariant(
        "one_saga_per_purchase",
        "one saga per purchase at a time, support's or the processor's",
        saga_overlap_violations,
    ),
    SagaInvariant(
        "one_reconciliation_per_object",
        "each dashboard refund and lost dispute reconciled by exactly one completed run",
        reconciliation_violations,
    ),
    SagaInvariant(
        "one_ops_task_per_late_failure",
        "each refund failed after completion has exactly one ops task, closed",
        ops_task_violations,
    ),
)


def check_invariants(outcomes: Sequence[tuple[SagaPlan, SagaFacts]]) -> list[Invariant]:
    """Check each saga's end and its traces at the processor, in the store and in the AMS.

    Args:
        outcomes: Each saga's plan with the facts found after the run.

    Returns:
        The per-saga invariants of `SAGA_INVARIANTS`, each with the sagas that broke it.
    """
    invariants = [Invariant(i.name, i.description) for i in SAGA_INVARIANTS]
    for plan, facts in outcomes:
        for invariant, saga_invariant in zip(invariants, SAGA_INVARIANTS, strict=True):
            invariant.checked += 1
            invariant.breaches.extend(saga_invariant.violations(plan, facts))
    return invariants


# -- the run as a whole -------------------------------------------------------------------------


def restart_violations(record: RestartRecord) -> list[str]:
    """Only what the harness killed was down, and `stack.up` restarted exactly that."""
    violations: list[str] = []
    crashed = sorted(set(record.down_before) - {record.killed})
    if crashed:
        violations.append(
            f"{', '.join(crashed)} went down on its own (found at {record.at_s:.0f}s, "
            f"the harness had killed {record.killed})"
        )
    extra = sorted(set(record.restarted) - set(record.down_before))
    missing = sorted(set(record.down_before) - set(record.restarted))
    if extra or missing:
        violations.append(
            f"after killing {record.killed} at {record.at_s:.0f}s: down "
            f"{list(record.down_before)}, restarted {list(record.restarted)}"
        )
    return violations


def check_restarts(restarts: Sequence[RestartRecord]) -> Invariant:
    """Every `stack.up` restarted exactly what was down, and only what the harness killed was."""
    invariant = Invariant(
        "stack_restarts_only_what_is_down",
        "stack.up restarts only what is down; nothing goes down unless killed",
    )
    for record in restarts:
        invariant.checked += 1
        invariant.breaches.extend(restart_violations(record))
    return invariant


def check_resets_and_prunes(
    *,
    resets: Sequence[ResetRecord],
    planned_resets: int,
    prunes: Sequence[PruneRecord],
    planned_prunes: int,
    end_runs: dict[str, str | None],
) -> list[str]:
    """Breaches: resets or prunes that did not happen, and reset sagas judged on an old run.

    Args:
        end_runs: The run id each reset saga was last seen ending in (None: not seen ending).
    """
    breaches: list[str] = []
    if len(resets) != planned_resets:
        breaches.append(f"{len(resets)} resets, {planned_resets} planned")
    if len(prunes) != planned_prunes:
        breaches.append(f"{len(prunes)} key prunings, {planned_prunes} planned")
    if planned_prunes and not any(p.in_flight for p in prunes):
        breaches.append("no key pruning happened while a saga was in flight")
    latest: dict[str, ResetRecord] = {}
    for record in resets:
        latest[record.workflow_id] = record
    for workflow_id, record in sorted(latest.items()):
        ended = end_runs.get(workflow_id)
        if ended is not None and ended != record.new_run_id:
            breaches.append(
                f"{workflow_id}: judged on run {ended}, not the run its reset started "
                f"({record.new_run_id})"
            )
    return breaches


def processor_event_shortfalls(
    *,
    webhooks: dict[str, int] | None,
    receiver_kills: int,
    planned_receiver_kills: int,
    money_back: int,
    planned_money_back: int,
    late_failures: int,
    planned_late_failures: int,
) -> list[str]:
    """Breaches: the processor-event chaos that was planned and did not happen.

    Args:
        webhooks: The delivery counts (`faults.webhook_counts`) when webhook faults were on.
        money_back: Dashboard refunds and lost disputes the harness made.
        late_failures: Refunds the harness failed after their saga completed.
    """
    breaches: list[str] = []
    if webhooks is not None:
        for kind in ("dropped", "duplicated"):
            if not webhooks.get(kind):
                breaches.append(f"no webhook delivery was {kind}")
    if receiver_kills != planned_receiver_kills:
        breaches.append(
            f"{receiver_kills} webhook receiver kills, {planned_receiver_kills} planned"
        )
    if money_back != planned_money_back:
        breaches.append(
            f"{money_back} refunds or disputes outside OASIS, {planned_money_back} planned"
        )
    if late_failures != planned_late_failures:
        breaches.append(f"{late_failures} late refund failures, {planned_late_failures} planned")
    return breaches


def check_chaos(
    *,
    kills: int,
    planned_kills: int,
    temporal_restarts: int,
    faults: int,
    outage: bool,
    errors: Sequence[str] = (),
    missing: Sequence[str] = (),
) -> Invariant:
    """The chaos the run promised happened: a quiet run must not pass for a resilient one.

    Args:
        missing: Breaches found elsewhere, e.g. by `check_resets_and_prunes`.
    """
    invariant = Invariant(
        "chaos_happened", "the planned kills, restarts, resets, key prunings and faults happened"
    )
    invariant.checked = 1
    invariant.breaches.extend(f"chaos schedule: {error}" for error in errors)
    invariant.breaches.extend(missing)
    if kills != planned_kills:
        invariant.breaches.append(f"{kills} worker kills, {planned_kills} planned")
    if temporal_restarts != 1:
        invariant.breaches.append(f"{temporal_restarts} Temporal restarts, 1 planned")
    if faults == 0:
        invariant.breaches.append("no fault was injected")
    if not outage:
        invariant.breaches.append("the planned AMS outage did not happen")
    return invariant
