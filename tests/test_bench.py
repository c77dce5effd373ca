"""The bench still runs: one tiny repetition on its own stack, and its report's shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.bench import main
from bench.lib.measure import percentile, summarize
from bench.lib.report import jsonable
from bench.lib.stack import STACK_DYNAMIC_CONFIG, with_overrides

REPO = Path(__file__).resolve().parents[1]
HEADLINE_KEYS = (
    "saga_per_s",
    "baseline_per_s",
    "throughput_ratio",
    "saga_p95_ms",
    "baseline_p95_ms",
    "history_events_per_saga",
    "errors",
)


def test_percentile_and_summary() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert jsonable({"x": [float("nan"), 1.0]}) == {"x": [None, 1.0]}


def test_dynamic_config_overrides_replace_the_stacks_value_of_a_key() -> None:
    stack_value = "system.forceSearchAttributesCacheRefreshOnRead=false"
    assert stack_value in STACK_DYNAMIC_CONFIG
    merged = with_overrides(
        STACK_DYNAMIC_CONFIG,
        [
            "system.enableActivityEagerExecution=true",
            "system.forceSearchAttributesCacheRefreshOnRead=true",
        ],
    )
    assert "system.enableActivityEagerExecution=true" in merged
    assert "system.forceSearchAttributesCacheRefreshOnRead=true" in merged
    assert stack_value not in merged


def test_a_malformed_dynamic_config_value_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--n", "1", "--dynamic-config", "no-equals-sign"])
    assert exit_info.value.code == 2
    assert "'no-equals-sign' is not KEY=JSON" in capsys.readouterr().err


def run_bench(module: str, out: Path, *args: str) -> Any:
    """Run a bench module once and return its JSON report.

    A subprocess: a bench sets REFUND_* variables in its own environment for its stack's
    worker, which must not leak into the other tests' stacks.
    """
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--json-out", str(out)],
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.devserver
def test_bench_runs_once(tmp_path: Path) -> None:
    report = run_bench("bench.bench", tmp_path / "bench.json", "--n", "5", "--reps", "1")
    for key in HEADLINE_KEYS:
        assert key in report, key
    assert report["errors"] == 0
    assert report["saga_per_s"] > 0 and report["baseline_per_s"] > 0
    assert report["history_events_per_saga"] > 0
    assert {"saga", "baseline", "baseline_sandboxed"} <= set(report["figures"])
    assert report["throughput_ratio_vs_sandboxed_baseline"] > 0


@pytest.mark.devserver
def test_batch_bench_runs_once(tmp_path: Path) -> None:
    report = run_bench("bench.batch", tmp_path / "batch.json", "--n", "12")
    assert report["state"] == "COMPLETED" and report["errors"] == 0
    assert report["counts"]["done"] == 12 and report["not_refunded"] == 0
    # Each saga read its charge and refunded it, once.
    assert report["processor"]["by_kind"] == {"GET charges": 12, "POST refunds": 12}
    assert report["batch_per_s"] > 0
    # The sagas: three local activities and no patch marker, lists told only at
    # the pivot and the end; the batch's own runs are counted too.
    sagas = report["saga_history"]
    assert sagas["sampled"] == 12 and sagas["local_activities"] == 3
    assert sagas["event_types"]["upsert_workflow_search_attributes"] == 2
    assert report["batch_events_per_purchase"] > 0


@pytest.mark.devserver
def test_steps_bench_runs_once(tmp_path: Path) -> None:
    report = run_bench(
        "bench.steps",
        tmp_path / "steps.json",
        *("--n", "2", "--rounds", "1", "--http-calls", "3", "--replays", "2"),
    )
    (round_,) = report["rounds"]
    assert set(round_["steps_ms"]) == {
        "prepare",
        "refund",
        "record",
        "revoke",
        "deentitle",
        "verify",
        "close",
    }
    # The activity bodies did real work: each step spent CPU in this process.
    assert all(ms > 0 for ms in round_["steps_ms"].values()), round_["steps_ms"]
    assert round_["http"]["httpx_us"] > 0 and round_["http"]["asyncio_stream_us"] > 0
    assert round_["replay"]["saga_ms"] > 0 and round_["replay"]["baseline_ms"] > 0
