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
from reliability.records import RunRecord, SagaPlan, SagaRun

__all__ = ["build_report", "format_table"]


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def build_report(
    *,
    config: ChaosConfig,
    plans: Sequence[SagaPlan],
    runs: Sequence[SagaRun],
    record: RunRecord,
    faults: dict[str, dict[str, Any]],
    invariants: Sequence[Invariant],
    timings: dict[str, float],
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
        "people": {
            "decisions": record.decisions,
            "ams_confirmations": record.confirmations,
            "resolutions": record.resolutions,
            "sagas_in_needs_attention": sum(1 for r in runs if r.attention),
            "retried_calls": record.retried_calls,
        },
        "invariants": [i.to_dict() for i in invariants],
    }


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
