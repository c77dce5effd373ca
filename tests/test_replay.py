"""Determinism guard: every recorded history must replay on the current workflow code.

The histories in tests/histories/ were recorded from every saga path (`make histories`). A
change to the workflow's command sequence that would break running sagas fails here, in CI,
instead of in production; such a change needs `workflow.patched`.

Each history replays twice: in the SDK's sandbox, which refuses non-deterministic calls along
every recorded path, and on the plain runner the production worker uses (worker.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from refundsaga.temporal import payload_data_converter
from worker import WORKFLOWS
from workflows.refund_saga import RefundSaga

RUNNERS: dict[str, type[WorkflowRunner]] = {
    "sandboxed": SandboxedWorkflowRunner,
    "plain": UnsandboxedWorkflowRunner,
}
HISTORIES = sorted((Path(__file__).parent / "histories").glob("*/*.json"))
VERSIONS = sorted({path.parent.name for path in HISTORIES})


def saga_end(path: Path) -> str | None:
    """The end state a recorded saga closed with (the input of its close_saga activity)."""
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    for event in history.events:
        attrs = event.activity_task_scheduled_event_attributes
        if attrs.activity_type.name == "close_saga":
            return str(json.loads(attrs.input.payloads[0].data)["state"])
        if event.marker_recorded_event_attributes.marker_name == "core_local_activity":
            # From v2 the close is a local activity: its summary names the end state.
            summary = event.user_metadata.summary.data.decode()
            if "close the saga as " in summary:
                return summary.split("close the saga as ")[1].strip('"')
    return None


@pytest.mark.parametrize("version", VERSIONS)
def test_there_are_recorded_histories_of_every_end(version: str) -> None:
    paths = [path for path in HISTORIES if path.parent.name == version]
    ends = {saga_end(path) for path in paths}
    assert len(paths) >= 10
    assert ends >= {"COMPLETED", "REJECTED", "EXPIRED", "FAILED", "CANCELLED"}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("path", HISTORIES, ids=[f"{p.parent.name}/{p.stem}" for p in HISTORIES])
async def test_history_replays(path: Path, runner: str) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(
        workflows=[RefundSaga],
        data_converter=payload_data_converter,
        workflow_runner=RUNNERS[runner](),
    )
    await replayer.replay_workflow(history)


# Batches, restores, and the sagas a batch started (recorded by `make histories`).
OTHER = sorted((Path(__file__).parent / "histories-batch").glob("*/*.json"))


def test_there_are_recorded_batch_and_restore_histories() -> None:
    kinds = {path.name.split("-")[0] for path in OTHER}
    assert kinds >= {"BatchRefund", "RestoreProgress", "RefundSaga"}, kinds
    # Including batch runs that continued as new with children in flight.
    ends = {
        WorkflowHistory.from_json(p.stem, p.read_text()).events[-1].event_type
        for p in OTHER
        if p.name.startswith("BatchRefund")
    }
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW in ends
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED in ends


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("path", OTHER, ids=[f"{p.parent.name}/{p.stem}" for p in OTHER])
async def test_batch_and_restore_history_replays(path: Path, runner: str) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(
        workflows=WORKFLOWS,
        data_converter=payload_data_converter,
        workflow_runner=RUNNERS[runner](),
    )
    await replayer.replay_workflow(history)
