"""Determinism guard: every recorded history must replay on the current workflow code.

tests/histories/<version>/ holds the histories `make histories` recorded: `saga/` from every
saga path, `batch-restore/` from batches (including runs that continued as new), restores and
the sagas a batch started. 1.0 is the baseline; a change to a workflow's commands after it gets
`workflow.patched` and a directory of its own beside it, and every directory keeps replaying
(docs/versioning.md). A change that would break running workflows fails here, in CI, instead of
in production.

Each history replays twice: in the SDK's sandbox, which refuses non-deterministic calls along
every recorded path, and on the plain runner the production worker uses (worker.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from refundsaga.contracts import RefundRequest, SagaStatus
from refundsaga.temporal import payload_data_converter
from worker import WORKFLOWS
from workflows.refund_saga import RefundSaga

RUNNERS: dict[str, type[WorkflowRunner]] = {
    "sandboxed": SandboxedWorkflowRunner,
    "plain": UnsandboxedWorkflowRunner,
}
ROOT = Path(__file__).parent / "histories"
SAGAS = sorted(ROOT.glob("*/saga/*.json"))
OTHER = sorted(ROOT.glob("*/batch-restore/*.json"))
VERSIONS = sorted({path.parents[1].name for path in [*SAGAS, *OTHER]})


def named(paths: list[Path]) -> list[str]:
    return [f"{p.parents[1].name}/{p.stem}" for p in paths]


def load(path: Path) -> WorkflowHistory:
    """A recorded history, under the workflow id it ran with (tests/fixtures: history_json);
    an exported one without it replays under its file name."""
    recorded = json.loads(path.read_text())
    return WorkflowHistory.from_json(recorded.pop("workflowId", path.stem), recorded)


def saga_end(path: Path) -> str | None:
    """The end state a recorded saga closed with: close_saga is a local activity whose summary
    names it."""
    for event in load(path).events:
        if event.marker_recorded_event_attributes.marker_name == "core_local_activity":
            summary = event.user_metadata.summary.data.decode()
            if "close the saga as " in summary:
                return summary.split("close the saga as ")[1].strip('"')
    return None


def test_the_1_0_baseline_is_recorded() -> None:
    assert "1.0" in VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_there_are_recorded_histories_of_every_end(version: str) -> None:
    paths = [path for path in SAGAS if path.parents[1].name == version]
    ends = {saga_end(path) for path in paths}
    assert len(paths) >= 10
    assert ends >= {"COMPLETED", "REJECTED", "EXPIRED", "FAILED", "CANCELLED"}


@pytest.mark.parametrize("version", VERSIONS)
def test_there_are_recorded_batch_and_restore_histories(version: str) -> None:
    paths = [path for path in OTHER if path.parents[1].name == version]
    kinds = {path.name.split("-")[0] for path in paths}
    assert kinds >= {"BatchRefund", "RestoreProgress", "RefundSaga"}, kinds
    # Including batch runs that continued as new with children in flight.
    ends = {load(p).events[-1].event_type for p in paths if p.name.startswith("BatchRefund")}
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW in ends
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED in ends


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("path", SAGAS, ids=named(SAGAS))
async def test_history_replays(path: Path, runner: str) -> None:
    replayer = Replayer(
        workflows=[RefundSaga],
        data_converter=payload_data_converter,
        workflow_runner=RUNNERS[runner](),
    )
    await replayer.replay_workflow(load(path))


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("path", OTHER, ids=named(OTHER))
async def test_batch_and_restore_history_replays(path: Path, runner: str) -> None:
    replayer = Replayer(
        workflows=WORKFLOWS,
        data_converter=payload_data_converter,
        workflow_runner=RUNNERS[runner](),
    )
    await replayer.replay_workflow(load(path))


@workflow.defn(name="RefundSaga", sandboxed=False)
class SagaWithAnotherCommand(RefundSaga):
    """The saga with one more command before its first step: what an unpatched change does."""

    @workflow.run
    async def run(self, request: RefundRequest) -> SagaStatus:
        await workflow.sleep(1)
        return await super().run(request)


async def test_a_history_the_code_no_longer_matches_fails_to_replay() -> None:
    completed = next(path for path in SAGAS if saga_end(path) == "COMPLETED")
    replayer = Replayer(
        workflows=[SagaWithAnotherCommand],
        data_converter=payload_data_converter,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )
    with pytest.raises(workflow.NondeterminismError):
        await replayer.replay_workflow(load(completed))
