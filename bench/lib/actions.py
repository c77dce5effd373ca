"""Billable Temporal Cloud Actions of one workflow run, counted from its history.

The rules are Temporal's published ones (https://docs.temporal.io/cloud/actions): what a run
would cost on Temporal Cloud, measured on the bench's dev server. Queries are Actions too
("Query received by Worker") but leave no trace in a history: a caller that polls adds its
queries on top (the bench counts them where it sends them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.api.history.v1 import HistoryEvent

# sdk-core's marker names: a local activity's result, and a patch (not billed as an activity).
LOCAL_ACTIVITY_MARKER = "core_local_activity"
# An upsert of only this attribute (what `workflow.patched` writes) is exempt.
CHANGE_VERSION_ATTRIBUTE = "TemporalChangeVersion"

_ONE_EACH = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED: "workflow_started",
    EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED: "activity",
    EventType.EVENT_TYPE_TIMER_STARTED: "timer",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED: "signal",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED: "update",
    # Two Actions per child: the intent, booked here, and the start, booked in the child's own
    # history as its `workflow_started`.
    EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED: "child_workflow_start",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_OPTIONS_UPDATED: "workflow_options_updated",
    EventType.EVENT_TYPE_NEXUS_OPERATION_SCHEDULED: "nexus_operation",
    EventType.EVENT_TYPE_NEXUS_OPERATION_CANCEL_REQUESTED: "nexus_operation",
}


def actions_from_history(history: Any) -> Counter[str]:
    """The billable Actions of one run, by kind; `sum(...values())` is the total.

    `history` is a `WorkflowHistory` (or anything with `.events`) or the events themselves.
    Counted: the start (a signal-with-start's signal is part of its one Action), every activity
    scheduled and every retry of it (the attempt of its started event), one per workflow task
    that recorded local-activity markers plus their retries (the task's metering metadata),
    timers, signals received, accepted updates, child starts, search-attribute upserts (not
    those of `TemporalChangeVersion` alone, nor the attributes given at the start), options
    updates, Nexus operations and resets. Not seen here: queries, rejected updates, activity
    heartbeats and workflow-task heartbeats of long local activities.
    """
    events: Iterable[HistoryEvent] = getattr(history, "events", history)
    actions: Counter[str] = Counter()
    local_activity_tasks: set[int] = set()
    previous: int | None = None
    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED and (
            previous == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
        ):
            # Signal-with-start: one Action for the pair, already counted at the start.
            pass
        elif kind in _ONE_EACH:
            actions[_ONE_EACH[kind]] += 1
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            # Retries leave no events of their own: the started event carries the attempt.
            attempt = event.activity_task_started_event_attributes.attempt
            actions["activity_retry"] += max(0, attempt - 1)
        elif kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            marker = event.marker_recorded_event_attributes
            if marker.marker_name == LOCAL_ACTIVITY_MARKER:
                local_activity_tasks.add(marker.workflow_task_completed_event_id)
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            metering = event.workflow_task_completed_event_attributes.metering_metadata
            actions["local_activity_retry"] += metering.nonfirst_local_activity_execution_attempts
        elif kind == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            fields = (
                event.upsert_workflow_search_attributes_event_attributes.search_attributes
            ).indexed_fields
            if set(fields) - {CHANGE_VERSION_ATTRIBUTE}:
                actions["search_attribute_upsert"] += 1
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED and (
            event.workflow_task_failed_event_attributes.cause
            == WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_RESET_WORKFLOW
        ):
            actions["reset"] += 1
        previous = kind
    if local_activity_tasks:
        actions["local_activity_batch"] = len(local_activity_tasks)
    return +actions  # drop the kinds that stayed at zero
