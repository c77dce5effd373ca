"""How the benches report: the saga bench's JSON and table, and a JSON file for every bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.lib.measure import Wave, load_1m, summarize

RESULTS = Path(__file__).resolve().parents[1] / "results"


def build_report(
    waves: list[list[Wave]], config: dict[str, Any], seeding: dict[str, float]
) -> dict[str, Any]:
    """The JSON report: headline medians at the top, every figure as median/min/max below."""
    variants = [w.variant for w in waves[0]]
    # Each repetition's figures, per variant.
    by_rep = [{w.variant: w.figures() for w in rep} for rep in waves]
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for variant in variants:
        per_rep = [rep[variant] for rep in by_rep]
        keys = dict.fromkeys(key for f in per_rep for key in f)
        figures[variant] = {
            key: summarize([f.get(key, float("nan")) for f in per_rep]) for key in keys
        }

    def ratio(key: str, baseline: str) -> dict[str, float]:
        # Per repetition, then the median: each pair ran back to back on one server.
        return summarize([rep["saga"][key] / rep[baseline][key] for rep in by_rep])

    ratios: dict[str, dict[str, float]] = {}
    if "saga" in variants and "baseline" in variants:
        ratios["throughput_ratio"] = ratio("per_s", "baseline")
        ratios["p95_ratio"] = ratio("p95_ms", "baseline")
        ratios["own_cpu_ratio"] = ratio("own_cpu_s_per_wf", "baseline")
    if "saga" in variants and "naive_saga" in variants:
        # The same work the way the samples would write it (bench/naive.py).
        ratios["throughput_ratio_vs_naive"] = ratio("per_s", "naive_saga")
        ratios["p95_ratio_vs_naive"] = ratio("p95_ms", "naive_saga")
        ratios["cpu_ratio_vs_naive"] = ratio("stack_cpu_s_per_wf", "naive_saga")
    if "saga" in variants and "baseline" in variants:
        ratios["cpu_ratio_vs_noop"] = ratio("stack_cpu_s_per_wf", "baseline")
    if "saga" in variants and "baseline_sandboxed" in variants:
        # The same naive shape in the SDK's sandbox, its default: what a team that did not
        # measure would run.
        ratios["throughput_ratio_vs_sandboxed_baseline"] = ratio("per_s", "baseline_sandboxed")

    def med(variant: str, key: str) -> float:
        return figures.get(variant, {}).get(key, {}).get("median", float("nan"))

    def headline(name: str) -> float:
        return ratios.get(name, {}).get("median", float("nan"))

    def actions_by_kind(variant: str) -> dict[str, Any]:
        # One sampled history of the first repetition, and the queries the caller sent.
        wave = next((w for w in waves[0] if w.variant == variant), None)
        if wave is None:
            return {}
        kinds = dict(wave.history.get("actions_by_kind", {}))
        if wave.queries:
            kinds["query_per_wf"] = wave.queries / max(wave.n, 1)
        return kinds

    report: dict[str, Any] = {
        "saga_per_s": med("saga", "per_s"),
        "baseline_per_s": med("baseline", "per_s"),
        "throughput_ratio": ratios.get("throughput_ratio", {}).get("median", float("nan")),
        "saga_p50_ms": med("saga", "p50_ms"),
        "saga_p95_ms": med("saga", "p95_ms"),
        "saga_p99_ms": med("saga", "p99_ms"),
        "baseline_p50_ms": med("baseline", "p50_ms"),
        "baseline_p95_ms": med("baseline", "p95_ms"),
        "baseline_p99_ms": med("baseline", "p99_ms"),
        "p95_ratio": ratios.get("p95_ratio", {}).get("median", float("nan")),
        "throughput_ratio_vs_sandboxed_baseline": ratios.get(
            "throughput_ratio_vs_sandboxed_baseline", {}
        ).get("median", float("nan")),
        "history_events_per_saga": med("saga", "history_events"),
        "workflow_tasks_per_saga": med("saga", "history_workflow_tasks"),
        "saga_worker_cpu_s_per_saga": med("saga", "worker_cpu_s_per_wf"),
        "saga_server_cpu_s_per_saga": med("saga", "server_cpu_s_per_wf"),
        "baseline_worker_cpu_s_per_wf": med("baseline", "worker_cpu_s_per_wf"),
        "baseline_server_cpu_s_per_wf": med("baseline", "server_cpu_s_per_wf"),
        "saga_worker_peak_rss_mb": med("saga", "worker_peak_rss_mb"),
        # Issue 22: against the naive saga doing the same work, and the cost of a refund.
        "naive_saga_per_s": med("naive_saga", "per_s"),
        "naive_saga_p95_ms": med("naive_saga", "p95_ms"),
        "throughput_ratio_vs_naive": headline("throughput_ratio_vs_naive"),
        "p95_ratio_vs_naive": headline("p95_ratio_vs_naive"),
        "cpu_ratio_vs_naive": headline("cpu_ratio_vs_naive"),
        "cpu_ratio_vs_noop": headline("cpu_ratio_vs_noop"),
        "processor_calls_per_refund": med("saga", "processor_calls_per_wf"),
        "actions_per_refund": med("saga", "actions_per_wf"),
        "saga_actions_by_kind": actions_by_kind("saga"),
        "saga_stack_cpu_s_per_saga": med("saga", "stack_cpu_s_per_wf"),
        "naive_saga_processor_calls_per_refund": med("naive_saga", "processor_calls_per_wf"),
        "naive_saga_actions_per_refund": med("naive_saga", "actions_per_wf"),
        "naive_saga_actions_by_kind": actions_by_kind("naive_saga"),
        "history_events_per_naive_saga": med("naive_saga", "history_events"),
        "naive_saga_worker_cpu_s_per_wf": med("naive_saga", "worker_cpu_s_per_wf"),
        "naive_saga_server_cpu_s_per_wf": med("naive_saga", "server_cpu_s_per_wf"),
        "naive_saga_stack_cpu_s_per_wf": med("naive_saga", "stack_cpu_s_per_wf"),
        "baseline_stack_cpu_s_per_wf": med("baseline", "stack_cpu_s_per_wf"),
        # Not a median: every error of every repetition and variant counts.
        "errors": sum(w.errors for rep in waves for w in rep),
    }
    report |= {
        "config": config,
        "seeding": seeding,
        "ratios": ratios,
        "figures": figures,
        "repetitions": [
            [
                {
                    "variant": w.variant,
                    **w.figures(),
                    "wall_s": w.wall_s,
                    "cpu_s": w.cpu_s,
                    "matching": w.matching,
                    "queries": w.queries,
                    "processor_calls": w.processor_calls,
                    "error_samples": w.error_samples,
                    "history": w.history,
                    **({"profile": w.profile} if w.profile else {}),
                }
                for w in rep
            ]
            for rep in waves
        ],
    }
    return report


def jsonable(value: Any) -> Any:
    """NaN (a figure that could not be measured) as null: JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _json(report: dict[str, Any]) -> str:
    return json.dumps(jsonable(report), indent=2, default=str)


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write a report as JSON (NaN as null) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_json(report) + "\n")
    print(f"wrote {path}")


def write_report(result: dict[str, Any], *, load_before: float, json_out: Path) -> int:
    """Stamp the load before and after, print the report as JSON, write it; the exit code
    (1 when the run saw errors)."""
    result["load_1m_before"] = load_before
    result["load_1m_after"] = load_1m()
    print(_json(result))
    write_json(result, json_out)
    return 0 if result["errors"] == 0 else 1


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    """The figures as a table: median [min .. max] over the repetitions, per variant."""
    figures: dict[str, dict[str, dict[str, float]]] = report["figures"]
    variants = list(figures)
    rows = [
        ("per_s", "completed / s", 2),
        ("p50_ms", "latency p50 (ms)", 0),
        ("p95_ms", "latency p95 (ms)", 0),
        ("p99_ms", "latency p99 (ms)", 0),
        ("history_events", "history events / wf", 0),
        ("history_workflow_tasks", "workflow tasks / wf", 0),
        ("history_activities", "activities / wf", 0),
        ("history_local_activities", "markers / wf (local act., patch)", 0),
        ("history_actions", "billable actions / wf (hist.)", 1),
        ("queries_per_wf", "queries / wf (polling)", 1),
        ("actions_per_wf", "billable actions / wf (all)", 1),
        ("processor_calls_per_wf", "processor calls / refund", 2),
        ("worker_cpu_s_per_wf", "worker CPU s / wf", 4),
        ("server_cpu_s_per_wf", "server CPU s / wf", 4),
        ("sandboxes_cpu_s_per_wf", "sandboxes CPU s / wf", 4),
        ("client_cpu_s_per_wf", "bench client CPU s / wf", 4),
        ("stack_cpu_s_per_wf", "stack CPU s / wf (w+s+sbx)", 4),
        ("own_cpu_s_per_wf", "with the bench client", 4),
        ("foreign_cpu_s_per_wf", "other processes CPU s / wf", 4),
        ("worker_peak_rss_mb", "worker peak RSS (MiB)", 0),
        ("sync_match_share", "polled tasks sync-matched", 2),
        ("backlog_writes_per_wf", "server backlog writes / wf", 1),
        ("errors", "errors", 0),
    ]
    width = 34
    print(f"{'figure':<28}" + "".join(f"{v:>{width}}" for v in variants))
    for key, label, digits in rows:
        cells = []
        for variant in variants:
            f = figures[variant].get(key)
            if f is None:
                cells.append(f"{'-':>{width}}")
                continue
            text = (
                f"{_fmt(f['median'], digits)} "
                f"[{_fmt(f['min'], digits)} .. {_fmt(f['max'], digits)}]"
            )
            cells.append(f"{text:>{width}}")
        print(f"{label:<28}" + "".join(cells))
    # Names longer than the column still get a space before their figure.
    for name, r in report["ratios"].items():
        label = f"{name} "
        print(f"{label:<28}{_fmt(r['median'], 2)} [{_fmt(r['min'], 2)} .. {_fmt(r['max'], 2)}]")
    print(f"errors (all repetitions)    {report['errors']}")
