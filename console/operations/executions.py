"""One workflow execution seen from a client: start it under its fixed id, describe it, read its
status (its result once it has completed, else its query), wait for a state, send it a
validating update. Sagas, batches and restores all go through these."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from console.operations.errors import OperationError, Refused
from refundsaga.contracts import DecisionReceipt


class _HasState(Protocol):
    @property
    def state(self) -> Enum: ...


StatusT = TypeVar("StatusT", bound=_HasState)


@dataclass(frozen=True)
class StatusSource(Generic[StatusT]):
    """Where one kind of workflow keeps its status, and how messages name it.

    Attributes:
        noun: What it is, in "no <noun> <id>".
        result_type: Its status model: the query's answer and, once it completed, its result.
        query: The workflow's status query.
        query_noun: The query's name in "did not answer its <query_noun> query".
        not_found_hint: Appended to "no <noun> <id>".
        worker_hint: Appended when the query is not answered.
    """

    noun: str
    result_type: type[StatusT]
    query: Callable[[Any], StatusT]
    query_noun: str = "status"
    not_found_hint: str = ""
    worker_hint: str = "is a worker running?"


async def start_execution(
    client: Client,
    run: Any,
    arg: Any,
    *,
    workflow_id: str,
    task_queue: str,
    already_running: str,
    **options: Any,
) -> Any:
    """Start a workflow under its fixed id, refused with `already_running` while one runs there.

    A later start may reuse the id once the earlier execution has ended (a second refund of
    the same purchase, a batch run again).
    """
    try:
        return await client.start_workflow(
            run,
            arg,
            id=workflow_id,
            task_queue=task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            **options,
        )
    except WorkflowAlreadyStartedError as err:
        raise Refused(already_running) from err
    except RPCError as err:
        raise OperationError(f"Temporal refused to start {workflow_id}: {err.message}") from err


async def describe_execution(
    client: Client, workflow_id: str, source: StatusSource[Any]
) -> WorkflowExecutionDescription:
    """The execution, refused when there is none with that id."""
    try:
        return await client.get_workflow_handle(workflow_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise Refused(f"no {source.noun} {workflow_id}{source.not_found_hint}") from err
        raise OperationError(f"cannot describe {workflow_id}: {err.message}") from err


async def read_status(client: Client, workflow_id: str, source: StatusSource[StatusT]) -> StatusT:
    """The status: from the result when the execution has completed, else from the query."""
    description = await describe_execution(client, workflow_id, source)
    handle = client.get_workflow_handle(workflow_id, result_type=source.result_type)
    if description.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED:
        result: StatusT = await handle.result()
        return result
    try:
        answer: StatusT = await handle.query(source.query)
        return answer
    except RPCError as err:
        raise OperationError(
            f"{workflow_id} did not answer its {source.query_noun} query ({err.message}); "
            f"{source.worker_hint}"
        ) from err


async def wait_status(
    client: Client,
    workflow_id: str,
    source: StatusSource[StatusT],
    done: Callable[[StatusT], bool],
    *,
    timeout_s: float,
    poll_s: float = 0.5,
    on_poll: Callable[[StatusT], None] = lambda _: None,
    raise_on_timeout: bool = True,
) -> StatusT:
    """Read the status until `done` holds (it may raise to give up), or time runs out.

    Raises:
        OperationError: Time ran out (unless `raise_on_timeout` is False: then the status as
            it is).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        status = await read_status(client, workflow_id, source)
        on_poll(status)
        if done(status):
            return status
        if time.monotonic() >= deadline:
            if not raise_on_timeout:
                return status
            raise OperationError(
                f"{workflow_id} is still {status.state.value} after {timeout_s:g} s"
            )
        await asyncio.sleep(poll_s)


async def send_update(
    client: Client, workflow_id: str, update: Any, message: Any, *, run_id: str | None = None
) -> DecisionReceipt:
    """A validating update: a refusal by its validator is `Refused` with the workflow's reason."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    try:
        receipt: DecisionReceipt = await handle.execute_update(update, message)
        return receipt
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        text = getattr(cause, "message", None) or str(cause or err)
        raise Refused(f"{workflow_id} refused: {text}") from err
    except RPCError as err:
        if "workflow execution already completed" in err.message.lower() or (
            err.status == RPCStatusCode.NOT_FOUND
        ):
            raise Refused(f"{workflow_id} has already ended; nothing to decide") from err
        raise OperationError(f"{workflow_id}: {err.message}") from err
