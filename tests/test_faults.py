"""The chaos harness's resets and key pruning: where a reset goes back to, whom it picks, and
their report (pure; their checks are in test_invariants.py, the run in test_chaos.py)."""

from __future__ import annotations

import random

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import (
    HistoryEvent,
    WorkflowExecutionSignaledEventAttributes,
    WorkflowExecutionUpdateAcceptedEventAttributes,
    WorkflowExecutionUpdateAdmittedEventAttributes,
)
from temporalio.api.update.v1 import Input, Request

from reliability.faults import (
    PRUNE_ADVANCE_S,
    PruneRecord,
    ResetRecord,
    pick_reset_target,
    planned_resets,
    reset_marks,
    reset_point,
    table_line,
)
from reliability.faults import report as faults_report

E = EventType


def event(event_id: int, kind: EventType.ValueType, name: str = "") -> HistoryEvent:
    found = HistoryEvent(event_id=event_id, event_type=kind)
    if kind == E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
        found.workflow_execution_signaled_event_attributes.CopyFrom(
            WorkflowExecutionSignaledEventAttributes(signal_name=name)
        )
    elif kind == E.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
        found.workflow_execution_update_accepted_event_attributes.CopyFrom(
            WorkflowExecutionUpdateAcceptedEventAttributes(
                accepted_request=Request(input=Input(name=name))
            )
        )
    elif kind == E.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ADMITTED:
        found.workflow_execution_update_admitted_event_attributes.CopyFrom(
            WorkflowExecutionUpdateAdmittedEventAttributes(request=Request(input=Input(name=name)))
        )
    return found


def task(first_id: int) -> list[HistoryEvent]:
    """A workflow task: scheduled, started, completed."""
    return [
        event(first_id, E.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED),
        event(first_id + 1, E.EVENT_TYPE_WORKFLOW_TASK_STARTED),
        event(first_id + 2, E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED),
    ]


def waiting_for_approval() -> list[HistoryEvent]:
    """Started, prepare done, the saga waits on its approval timer (ids 1..9)."""
    return [
        event(1, E.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED),
        *task(2),
        event(5, E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED),
        event(6, E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED),
        *task(7),
        event(10, E.EVENT_TYPE_TIMER_STARTED),
    ]


def test_an_accepted_decision_resets_to_the_task_that_accepted_it() -> None:
    # The acceptance is written after its task completed: reset that task, and the update
    # is re-applied to the new run.
    history = [
        *waiting_for_approval(),
        *task(11),
        event(14, E.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED, "decide"),
        event(15, E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED),
    ]
    assert reset_point(history) == 13


def test_a_signalled_decision_resets_to_the_task_before_it() -> None:
    history = [
        *waiting_for_approval(),
        event(11, E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED, "approve"),
        *task(12),
    ]
    assert reset_point(history) == 9


def test_other_messages_are_not_a_decision() -> None:
    history = [
        *waiting_for_approval(),
        event(11, E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED, "cancel_request"),
        *task(12),
        event(15, E.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED, "confirm_ams"),
    ]
    assert reset_point(history) is None
    assert reset_point(waiting_for_approval()) is None


def test_a_run_made_by_a_reset_resets_to_the_same_point() -> None:
    # The new run: the old events up to the reset task, its failure, the re-applied decisions.
    history = [
        *waiting_for_approval(),
        event(11, E.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED),
        event(12, E.EVENT_TYPE_WORKFLOW_TASK_STARTED),
        event(13, E.EVENT_TYPE_WORKFLOW_TASK_FAILED),
        event(14, E.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ADMITTED, "decide"),
        *task(15),
        event(18, E.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED),  # names the admitted one
    ]
    assert reset_point(history) == 9


def test_resets_are_one_in_twenty_at_least_two_unless_told() -> None:
    assert [planned_resets(n, None) for n in (1, 12, 30, 300)] == [2, 2, 2, 15]
    assert planned_resets(300, 0) == 0 and planned_resets(12, 5) == 5


def test_reset_marks_alternate_running_then_ended() -> None:
    marks = reset_marks(random.Random(3), 100.0, 6)
    assert len(marks) == 6 and marks == sorted(marks)
    running = [m for m, ended in marks if not ended]
    ended = [m for m, ended in marks if ended]
    assert len(running) == len(ended) == 3
    assert all(10 <= m <= 50 for m in running) and all(50 <= m <= 95 for m in ended)


def test_the_target_is_of_the_kind_preferred_and_fresh_when_possible() -> None:
    rng = random.Random(1)
    candidates = [(0, True), (1, False), (2, True), (3, False)]
    assert pick_reset_target(rng, candidates, prefer_ended=True, already_reset={0}) == 2
    assert pick_reset_target(rng, candidates, prefer_ended=False, already_reset={1}) == 3
    # Everything preferred was reset already: one of them again rather than another kind.
    again = pick_reset_target(rng, candidates, prefer_ended=False, already_reset={1, 3})
    assert again in (1, 3)
    # Nothing of the kind: strict waits (None), otherwise any approved saga.
    only_running = [(1, False)]
    assert pick_reset_target(rng, only_running, prefer_ended=True, strict=True) is None
    assert pick_reset_target(rng, only_running, prefer_ended=True) == 1
    assert pick_reset_target(rng, [], prefer_ended=False) is None


def _reset(workflow_id: str, new_run: str) -> ResetRecord:
    return ResetRecord(workflow_id, "run-old", new_run, 13, "COMPLETED", 10.0)


def test_the_report_counts_resets_by_state_and_prunes() -> None:
    resets = [_reset("refund-1", "a"), ResetRecord("refund-2", "o", "b", 9, "REFUNDING", 3.0)]
    chaos = faults_report(resets, [PruneRecord(PRUNE_ADVANCE_S, 7, 2, 4.0)], 2)
    assert chaos["resets"] == 2 and chaos["key_prunes"] == 1
    assert chaos["reset_from"] == {"COMPLETED": 1, "REFUNDING": 1}
    assert table_line(chaos).split() == [
        "resets:",
        "2",
        "(from",
        "{'COMPLETED':",
        "1,",
        "'REFUNDING':",
        "1}),",
        "key",
        "prunings",
        "1",
        "(sagas",
        "in",
        "flight",
        "at",
        "each:",
        "7)",
    ]
