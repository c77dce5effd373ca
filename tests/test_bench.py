"""The bench still runs: one tiny repetition on its own stack, its report's shape, and the
billable Actions it counts from histories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

from bench.batch import processor_bound
from bench.bench import main
from bench.lib.actions import actions_from_history
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
    "naive_saga_per_s",
    "throughput_ratio_vs_naive",
    "p95_ratio_vs_naive",
    "cpu_ratio_vs_naive",
    "cpu_ratio_vs_noop",
    "processor_calls_per_refund",
    "actions_per_refund",
)
BATCH_KEYS = ("batch_purchases_per_s", "processor_bound_s", "batch_s", "bound_ratio")


def _event(kind: str, **attributes: Any) -> HistoryEvent:
    event = HistoryEvent(event_type=EventType.Value(f"EVENT_TYPE_{kind}"))
    for name, value in attributes.items():
        getattr(event, name).CopyFrom(value)
    return event


def _marker(name: str, task: int) -> HistoryEvent:
    event = _event("MARKER_RECORDED")
    event.marker_recorded_event_attributes.marker_name = name
    event.marker_recorded_event_attributes.workflow_task_completed_event_id = task
    return event


def _upsert(*names: str) -> HistoryEvent:
    event = _event("UPSERT_WORKFLOW_SEARCH_ATTRIBUTES")
    fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes
    for name in names:
        fields.indexed_fields[name].CopyFrom(Payload(data=b'"x"'))
    return event


def _task_completed(local_retries: int = 0) -> HistoryEvent:
    event = _event("WORKFLOW_TASK_COMPLETED")
    metering = event.workflow_task_completed_event_attributes.metering_metadata
    metering.nonfirst_local_activity_execution_attempts = local_retries
    return event


def _activity_started(attempt: int) -> HistoryEvent:
    event = _event("ACTIVITY_TASK_STARTED")
    event.activity_task_started_event_attributes.attempt = attempt
    return event


def test_actions_follow_temporal_clouds_published_rules() -> None:
    history = [
        _event("WORKFLOW_EXECUTION_STARTED"),
        # Signal-with-start: one Action for the pair.
        _event("WORKFLOW_EXECUTION_SIGNALED"),
        _event("WORKFLOW_TASK_SCHEDULED"),
        _event("WORKFLOW_TASK_STARTED"),
        _task_completed(local_retries=1),  # event 5
        # Two local activities in one workflow task: one Action, plus the retry above.
        _marker("core_local_activity", 5),
        _marker("core_local_activity", 5),
        # A patch is no activity, and its TemporalChangeVersion upsert is exempt.
        _marker("core_patch", 5),
        _upsert("TemporalChangeVersion"),
        _upsert("RefundState", "WaitingFor"),  # several attributes, one command: one Action
        _event("ACTIVITY_TASK_SCHEDULED"),
        _activity_started(attempt=3),  # two retries
        _event("ACTIVITY_TASK_COMPLETED"),
        _event("WORKFLOW_TASK_SCHEDULED"),
        _event("WORKFLOW_TASK_STARTED"),
        _task_completed(),  # event 16
        _marker("core_local_activity", 16),
        _event("TIMER_STARTED"),
        _event("TIMER_FIRED"),
        _event("WORKFLOW_EXECUTION_SIGNALED"),
        _event("WORKFLOW_EXECUTION_UPDATE_ACCEPTED"),
        _event("WORKFLOW_EXECUTION_UPDATE_COMPLETED"),
        _event("START_CHILD_WORKFLOW_EXECUTION_INITIATED"),
        _event("CHILD_WORKFLOW_EXECUTION_STARTED"),
        _event("WORKFLOW_EXECUTION_COMPLETED"),
    ]
    actions = actions_from_history(history)
    assert actions == {
        "workflow_started": 1,
        "local_activity_batch": 2,
        "local_activity_retry": 1,
        "search_attribute_upsert": 1,
        "activity": 1,
        "activity_retry": 2,
        "timer": 1,
        "signal": 1,
        "update": 1,
        "child_workflow_start": 1,
    }
    assert sum(actions.values()) == 12


def test_a_plain_start_and_a_later_signal_are_two_actions() -> None:
    history = [
        _event("WORKFLOW_EXECUTION_STARTED"),
        _event("WORKFLOW_TASK_SCHEDULED"),
        _event("WORKFLOW_EXECUTION_SIGNALED"),
    ]
    assert actions_from_history(history) == {"workflow_started": 1, "signal": 1}


def test_processor_bound_time() -> None:
    # 10,000 buyers, two calls each, at 20 calls/s.
    assert processor_bound(20_000, 20.0) == 1_000.0
    assert processor_bound(20_000, None) is None


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
    assert report["config"]["processor_calls_per_s"] == 0
    assert report["saga_per_s"] > 0 and report["baseline_per_s"] > 0
    assert report["naive_saga_per_s"] > 0 and report["throughput_ratio_vs_naive"] > 0
    assert report["cpu_ratio_vs_naive"] > 0 and report["cpu_ratio_vs_noop"] > 0
    assert report["history_events_per_saga"] > 0
    assert set(report["figures"]) == {"saga", "naive_saga", "baseline"}
    # The happy path reads the charge and refunds it, the naive saga as the saga.
    assert report["processor_calls_per_refund"] == 2
    assert report["naive_saga_processor_calls_per_refund"] == 2
    saga_actions = report["saga_actions_by_kind"]
    assert report["actions_per_refund"] == sum(saga_actions.values())
    assert saga_actions["workflow_started"] == 1 and saga_actions["local_activity_batch"] >= 1
    # The naive saga: seven activities, an upsert each, and the caller's queries on top.
    naive = report["naive_saga_actions_by_kind"]
    assert naive["activity"] == 7 and naive["search_attribute_upsert"] == 7
    assert "local_activity_batch" not in naive and naive["query_per_wf"] >= 1
    assert report["naive_saga_actions_per_refund"] == pytest.approx(sum(naive.values()))


def test_the_processor_limit_is_not_negative(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--processor-calls-per-s", "-1"])
    assert exit_info.value.code == 2
    assert "--processor-calls-per-s must be 0 (no limit) or more" in capsys.readouterr().err


@pytest.mark.devserver
def test_batch_bench_runs_once(tmp_path: Path) -> None:
    report = run_bench("bench.batch", tmp_path / "batch.json", "--n", "12")
    assert report["state"] == "COMPLETED" and report["errors"] == 0
    assert report["counts"]["done"] == 12 and report["not_refunded"] == 0
    # Each saga read its charge and refunded it, once.
    assert report["processor"]["by_kind"] == {"GET charges": 12, "POST refunds": 12}
    assert report["batch_per_s"] > 0
    for key in BATCH_KEYS:
        assert report[key] > 0, key
    # 24 calls at the default 20 calls/s.
    assert report["processor"]["limit_per_s"] == 20
    assert report["processor_bound_s"] == pytest.approx(24 / 20)
    assert report["bound_ratio"] == pytest.approx(report["batch_s"] / report["processor_bound_s"])
    assert report["batch_purchases_per_s"] == pytest.approx(12 / report["batch_s"])
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
