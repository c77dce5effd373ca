"""Bulk approval decides only what it lists: the filter is checked before it is sent, and each
listed execution is checked again before a decision goes to it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from temporalio.api.workflow.v1 import WorkflowExecutionInfo
from temporalio.client import WorkflowExecution
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.converter import DataConverter

from console import operations as ops
from refundsaga import search_attributes as sa


@pytest.mark.parametrize(
    "filter_",
    [
        'RefundAmountCents < 10000) OR (ExecutionStatus="Running"',
        'RequestedBy="sam") OR (WorkflowType="BatchRefund"',
        'WorkflowType="BatchRefund"',
        'WorkflowId="refund-batch-1"',
        'ExecutionStatus="Running"',
        'TaskQueue="refund"',
        'RequestedBy="sam" OR NoSuchAttribute=1',
        '(RequestedBy="sam"',
        'RequestedBy="sam',
        "RequestedBy='sam",
        'RequestedBy="x\\" OR ExecutionStatus="Running"',
        'RequestedBy="sam" -- comment',
        'RequestedBy="sam"; DELETE',
        "  ",
    ],
)
def test_a_filter_that_could_widen_the_selection_is_refused(filter_: str) -> None:
    with pytest.raises(ops.Refused):
        ops.awaiting_approval_query(filter_)


@pytest.mark.parametrize(
    "filter_",
    [
        'RequestedBy="sam"',
        'RequestedBy="sam" AND RefundAmountCents < 10000',
        'PurchaseId IN ("41", "42")',
        # Parentheses and forbidden names inside a quoted value are only text.
        "RequestedBy = \"a) OR (ExecutionStatus='Running'\"",
        "NOT (RefundAmountCents >= 5000 OR WaitingFor = 'approval')",
        'StartTime > "2026-01-01T00:00:00Z" AND RefundAmountCents BETWEEN 100 AND 900',
    ],
)
def test_a_filter_within_the_saga_scope_is_wrapped(filter_: str) -> None:
    query = ops.awaiting_approval_query(filter_)
    assert query.startswith('WorkflowType="RefundSaga" AND RefundState="AWAITING_APPROVAL" AND (')
    assert query.endswith(f"({filter_})")


def listed(workflow_type: str, state: str | None) -> WorkflowExecution:
    info = WorkflowExecutionInfo()
    info.type.name = workflow_type
    info.execution.workflow_id = f"{workflow_type}-{state}"
    info.start_time.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))
    execution = WorkflowExecution._from_raw_info(info, "default", DataConverter.default)
    pairs = [] if state is None else [SearchAttributePair(sa.REFUND_STATE, state)]
    object.__setattr__(execution, "typed_search_attributes", TypedSearchAttributes(pairs))
    return execution


@pytest.mark.parametrize(
    ("workflow_type", "state", "decided"),
    [
        ("RefundSaga", "AWAITING_APPROVAL", True),
        ("RefundSaga", "REFUNDING", False),
        ("RefundSaga", None, False),
        ("BatchRefund", "AWAITING_APPROVAL", False),
        ("RestoreProgress", None, False),
    ],
)
def test_only_a_saga_awaiting_approval_is_decided(
    workflow_type: str, state: str | None, decided: bool
) -> None:
    assert ops.is_awaiting_approval(listed(workflow_type, state)) is decided
