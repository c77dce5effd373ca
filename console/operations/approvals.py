"""Bulk approval: the sagas waiting for approval that a checked list filter selects, and one
validating decision per selected saga run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from temporalio.client import Client, WorkflowExecution
from temporalio.service import RPCError

from console.operations.errors import OperationError, Refused
from console.operations.executions import send_update
from console.operations.sagas import list_query, list_sagas
from refundsaga import search_attributes as sa
from refundsaga.contracts import ApprovalDecision, SagaState
from workflows.refund_saga import RefundSaga

# What a bulk-approval filter may name: the saga's own search attributes and the start times.
# Anything else (WorkflowType, WorkflowId, ExecutionStatus, TaskQueue, ...) could reach past the
# sagas waiting for approval, so it is refused rather than trusted to the AND around it.
BULK_FILTER_ATTRIBUTES = frozenset({key.name for key in sa.ALL} | {"StartTime", "ExecutionTime"})
_FILTER_WORDS = frozenset({"AND", "OR", "NOT", "IN", "BETWEEN", "IS", "NULL", "STARTS_WITH"})
_FILTER_PUNCTUATION = frozenset("()=!<>,.-+: \t")


def check_bulk_filter(filter_: str) -> None:
    """Refuse a filter that could widen the bulk selection: an unclosed quote, unbalanced
    parentheses outside quoted strings, or an attribute outside `BULK_FILTER_ATTRIBUTES`."""
    if not filter_.strip():
        raise Refused("the filter is empty: give one, e.g. 'RequestedBy=\"sam\"'")
    # Escapes and comments are read differently by different parsers: the saga's values
    # (ids, user names, states) never need them, so none is let through.
    if "\\" in filter_ or "--" in filter_:
        raise Refused("the filter was refused: no backslashes or '--' in it")
    depth = 0
    i = 0
    while i < len(filter_):
        char = filter_[i]
        if char in "\"'":
            end = filter_.find(char, i + 1)
            if end < 0:
                raise Refused("the filter was refused: a quoted string is not closed")
            i = end + 1
            continue
        if char.isalpha() or char == "_":
            end = i
            while end < len(filter_) and (filter_[end].isalnum() or filter_[end] == "_"):
                end += 1
            word = filter_[i:end]
            if word.upper() not in _FILTER_WORDS and word not in BULK_FILTER_ATTRIBUTES:
                allowed = ", ".join(sorted(BULK_FILTER_ATTRIBUTES))
                raise Refused(f"the filter was refused: it may name only {allowed}")
            i = end
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise Refused("the filter was refused: a ')' closes what it did not open")
        elif not (char.isdigit() or char in _FILTER_PUNCTUATION):
            raise Refused(f"the filter was refused: {char!r} is not allowed in it")
        i += 1
    if depth:
        raise Refused("the filter was refused: a '(' is not closed")


def awaiting_approval_query(filter_: str) -> str:
    """Sagas waiting for approval that also match the caller's (checked) list filter."""
    check_bulk_filter(filter_)
    return f"{list_query(state=SagaState.AWAITING_APPROVAL)} AND ({filter_})"


def is_awaiting_approval(execution: WorkflowExecution) -> bool:
    """A listed execution is a saga waiting for approval by its own type and search attribute,
    whatever the filter let through."""
    return (
        execution.workflow_type == RefundSaga.__name__
        and execution.typed_search_attributes.get(sa.REFUND_STATE)
        == SagaState.AWAITING_APPROVAL.value
    )


async def select_for_approval(
    client: Client, filter_: str, *, limit: int
) -> tuple[str, list[WorkflowExecution]]:
    """The sagas a bulk decision goes to, and the query that listed them: `--dry-run` shows
    exactly this selection and `--yes` decides exactly it."""
    query = awaiting_approval_query(filter_)
    listed = await list_sagas(client, query, limit=limit)
    return query, [execution for execution in listed if is_awaiting_approval(execution)]


@dataclass(frozen=True)
class BulkDecision:
    """What one saga of a bulk decision said."""

    workflow_id: str
    outcome: Literal["approved", "rejected", "refused", "failed"]
    message: str
    approvals: int | None = None
    required_approvals: int | None = None


async def decide_listed(
    client: Client,
    listed: Sequence[WorkflowExecution],
    decision_for: Callable[[WorkflowExecution], ApprovalDecision],
    *,
    concurrency: int,
    on_done: Callable[[BulkDecision], None] | None = None,
) -> list[BulkDecision]:
    """One validating `decide` update per listed saga run, at most `concurrency` in flight.

    Each update goes to the run that was listed (so a signed decision, bound to that run, can
    only land there); the saga still refuses what its policy refuses, and a refusal of one
    does not stop the others.
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(execution: WorkflowExecution) -> BulkDecision:
        async with gate:
            decision = decision_for(execution)
            try:
                receipt = await send_update(
                    client, execution.id, RefundSaga.decide, decision, run_id=execution.run_id
                )
            except Refused as e:
                done = BulkDecision(execution.id, "refused", str(e))
            except (OperationError, RPCError) as e:
                done = BulkDecision(execution.id, "failed", str(e))
            else:
                done = BulkDecision(
                    execution.id,
                    "approved" if decision.approve else "rejected",
                    receipt.message,
                    receipt.approvals,
                    receipt.required_approvals,
                )
            if on_done is not None:
                on_done(done)
            return done

    return list(await asyncio.gather(*(one(e) for e in listed)))
