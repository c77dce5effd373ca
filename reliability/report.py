"""The chaos run's report: the figures and the invariants, as JSON and as a table."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from reliability import faults as ext
from reliability.config import ChaosConfig
from reliability.faults import FAULT_KINDS
from reliability.invariants import Invariant
from reliability.records import RunRecord, SagaPlan, SagaRun, SweepFact

__all__ = ["build_report", "format_table", "processor_events_report"]


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 1) if values else 0.0,
        "max": round(max(values, default=0.0), 1),
    }


def processor_events_report(
    *,
    config: ChaosConfig,
    plans: Sequence[SagaPlan],
    runs: Sequence[SagaRun],
    record: RunRecord,
    webhooks: dict[str, Any] | None,
    sweeps: Sequence[SweepFact],
    run_states: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    """The report's part on money back outside OASIS, webhooks and the sweep.

    Args:
        run_states: Runs Temporal lists per kind (`reconciliation`, `ops_task`) and state, e.g.
            a reconciliation or task run refused because its object was settled already.
    """
    kinds: Counter[str] = Counter()
    for plan in plans:
        if plan.money_back == "dispute":
            kinds["lost dispute"] += 1
        elif plan.money_back == "refund":
            kinds["dashboard refund" if plan.full else "partial dashboard refund"] += 1
    # From the money going back to the reconciliation being listed (not the seeded ones).
    latency: dict[str, list[float]] = {}
    for run in runs:
        if run.money_back_id and run.source and run.started_at and run.money_back_at:
            latency.setdefault(run.source, []).append(run.started_at - run.money_back_at)
    outcomes: Counter[str] = Counter()
    for sweep in sweeps:
        outcomes.update(sweep.outcomes)
    return {
        "money_back": dict(sorted(kinds.items())),
        "reconciliations_by_source": dict(
            Counter(
                r.source or "not found" for p, r in zip(plans, runs, strict=True) if p.reconciles
            )
        ),
        "reconciliation_found_after_s": {s: _spread(v) for s, v in sorted(latency.items())},
        "late_failures": record.late_failures,
        "planned_late_failures": sum(1 for p in plans if p.fail_late),
        "ops_tasks_closed": record.tasks_closed,
        "runs_by_state": run_states or {},
        "webhook_faults": config.webhook_faults,
        "webhook_profiles_applied": record.webhook_profiles,
        "webhook_fates_forced": record.forced_fates,
        "webhooks": webhooks or {},
        "receiver_kills": record.receiver_kills,
        "receiver_down_s": round(record.receiver_down_s, 1),
        "sweep_every_s": config.sweep_every_s,
        "sweeps": {
            "runs": len(sweeps),
            "completed": sum(1 for s in sweeps if s.status == "COMPLETED"),
            "outcomes": dict(sorted(outcomes.items())),
        },
    }


def build_report(
    *,
    config: ChaosConfig,
    plans: Sequence[SagaPlan],
    runs: Sequence[SagaRun],
    record: RunRecord,
    faults: dict[str, dict[str, Any]],
    invariants: Sequence[Invariant],
    timings: dict[str, float],
    webhooks: dict[str, Any] | None = None,
    sweeps: Sequence[SweepFact] = (),
    run_states: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    durations = [
        r.ended_at - r.started_at
        for r in runs
        if r.started_at is not None and r.ended_at is not None
    ]
    injected = {
        kind: sum(int(faults[s][kind]) for s in faults) for kind in (*FAULT_KINDS, "delayed")
    }
    return {
        "ok": all(i.ok for i in invariants),
        "n": config.n,
        "seed": config.seed,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "saga_duration_s": {
            "median": round(statistics.median(durations), 1) if durations else 0.0,
            "p95": round(_percentile(durations, 0.95), 1),
            "max": round(max(durations, default=0.0), 1),
        },
        "scenarios": dict(Counter(p.scenario for p in plans)),
        "end_states": dict(Counter(r.end_state or "not ended" for r in runs)),
        "expected_end_states": dict(Counter(p.expected_state for p in plans)),
        "chaos": {
            "worker_kills": record.kills,
            "planned_worker_kills": config.planned_kills,
            "stack_restarts": sum(1 for r in record.restarts if r.restarted),
            "temporal_restarts": record.temporal_restarts,
            "restarts": [asdict(r) for r in record.restarts],
            **ext.report(record.resets, record.prunes, config.planned_resets),
            "ams_outage_s": config.outage_s if record.outage else 0,
            "fault_profiles_applied": record.profiles_applied,
            "faults_cleared_at_s": record.cleared_at_s,
        },
        "faults": {"by_sandbox": faults, "total": injected},
        "processor_events": processor_events_report(
            config=config,
            plans=plans,
            runs=runs,
            record=record,
            webhooks=webhooks,
            sweeps=sweeps,
            run_states=run_states,
        ),
        "people": {
            "decisions": record.decisions,
            "ams_confirmations": record.confirmations,
            "resolutions": record.resolutions,
            "sagas_in_needs_attention": sum(1 for r in runs if r.attention),
            "retried_calls": record.retried_calls,
        },
        "invariants": [i.to_dict() for i in invariants],
    }


def _events_lines(events: dict[str, Any]) -> list[str]:
    """The table's lines on money back outside OASIS, webhooks and the sweep."""
    found = ", ".join(
        f"{source} median {spread['median']}s max {spread['max']}s"
        for source, spread in events["reconciliation_found_after_s"].items()
    )
    hooks = events["webhooks"]
    sweeps = events["sweeps"]
    outcomes = sweeps["outcomes"]
    webhook_line = (
        f"{hooks.get('events', 0)} events, {hooks.get('dropped', 0)} deliveries dropped, "
        f"{hooks.get('duplicated', 0)} duplicated, {hooks.get('held_back', 0)} held back, "
        f"{hooks.get('failed_attempts', 0)} failed attempts retried, "
        f"{hooks.get('undelivered', 0)} events never delivered"
        + (" (log full)" if hooks.get("log_truncated") else "")
    )
    return [
        f"  money back:  {events['money_back']}; reconciliations by "
        f"{events['reconciliations_by_source']} (listed after: {found or '-'})",
        f"  late fails:  {events['late_failures']} of {events['planned_late_failures']} planned, "
        f"{events['ops_tasks_closed']} ops tasks closed; runs by state "
        f"{events['runs_by_state'] or '-'}",
        f"  webhooks:    {webhook_line}; {events['webhook_profiles_applied']} profiles, "
        f"forced on one action's events {events['webhook_fates_forced'] or '-'}, "
        f"receiver killed {events['receiver_kills']}x ({events['receiver_down_s']}s)",
        f"  sweeps:      {sweeps['runs']} every {events['sweep_every_s']:g}s "
        f"({sweeps['completed']} completed): started or found open "
        f"{outcomes.get('reconcile_started', 0)} reconciliations and "
        f"{outcomes.get('failed_task_started', 0)} ops tasks, woke "
        f"{outcomes.get('signalled', 0)} sagas",
    ]


def format_table(report: dict[str, Any]) -> str:
    """The report for a person: the figures, then one row per invariant."""
    chaos, people = report["chaos"], report["people"]
    faults = report["faults"]["total"]
    lines = [
        f"chaos run: n={report['n']} seed={report['seed']} "
        f"in {report['timings_s'].get('total', 0):.0f}s "
        f"(sagas {report['timings_s'].get('run', 0):.0f}s; saga median "
        f"{report['saga_duration_s']['median']}s, p95 {report['saga_duration_s']['p95']}s)",
        f"  scenarios:   {report['scenarios']}",
        f"  end states:  {report['end_states']} (expected {report['expected_end_states']})",
        f"  chaos:       {chaos['worker_kills']} worker kills, {chaos['stack_restarts']} restarts "
        f"({chaos['temporal_restarts']} of Temporal), AMS outage {chaos['ams_outage_s']:.0f}s, "
        f"{chaos['fault_profiles_applied']} fault profiles",
        ext.table_line(chaos),
        "  faults:      "
        + ", ".join(f"{kind} {count}" for kind, count in faults.items())
        + " | "
        + ", ".join(
            f"{s}: {c['requests']} requests" + (" (log full)" if c["log_truncated"] else "")
            for s, c in report["faults"]["by_sandbox"].items()
        ),
        *_events_lines(report["processor_events"]),
        f"  people:      {people['decisions']} decisions, {people['ams_confirmations']} AMS "
        f"confirmations, {people['resolutions']} retries from NEEDS_ATTENTION "
        f"({people['sagas_in_needs_attention']} sagas), {people['retried_calls']} calls retried",
        "",
    ]
    width = max(len(i["name"]) for i in report["invariants"])
    lines.append(f"  {'invariant':<{width}}  {'checked':>7}  result")
    for inv in report["invariants"]:
        verdict = "held" if inv["ok"] else f"BREACHED ({len(inv['breaches'])})"
        lines.append(f"  {inv['name']:<{width}}  {inv['checked']:>7}  {verdict}")
        for breach in inv["breaches"][:10]:
            lines.append(f"      - {breach}")
        if len(inv["breaches"]) > 10:
            lines.append(f"      ... and {len(inv['breaches']) - 10} more")
    lines.append("")
    lines.append("ALL INVARIANTS HELD" if report["ok"] else "INVARIANTS BREACHED")
    return "\n".join(lines)
