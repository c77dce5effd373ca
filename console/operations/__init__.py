"""What support, approvers and ops do to sagas, as functions: the CLI, `starter.py` and the
demo all go through here. Each failure is a `Refused` (exit 2: the caller's input or the saga's
state) or an `OperationError` (exit 1: something else), with a one-line message.

One module per thing operated on (sagas, bulk approvals, batches, restores, schedules); the
status, wait and update calls they share are in `executions`.
"""

from __future__ import annotations

from console.operations.approvals import (
    BULK_FILTER_ATTRIBUTES,
    BulkDecision,
    awaiting_approval_query,
    check_bulk_filter,
    decide_listed,
    is_awaiting_approval,
    select_for_approval,
)
from console.operations.batches import (
    batch_status,
    dry_run_batch,
    list_batches,
    running_saga_ids,
    start_batch,
    wait_batch,
    wait_batch_planned,
)
from console.operations.errors import OperationError, Refused
from console.operations.restores import RESTORE_ENDS, restore_status, start_restore, wait_restore
from console.operations.sagas import (
    confirm_ams,
    decide,
    describe,
    get_status,
    list_query,
    list_sagas,
    resolve,
    resolve_workflow_id,
    start_refund,
    start_refund_planned,
    wait_for_state,
)
from console.operations.schedules import (
    PURGE_EVERY,
    PURGE_SCHEDULE_ID,
    SWEEP_SCHEDULE_ID,
    ensure_purge_schedule,
    ensure_sweep_schedule,
    trigger_sweep,
)
from console.operations.signatures import signing_key
from refundsaga.ids import batch_id_for, restore_id_for, workflow_id_for

__all__ = [
    "BULK_FILTER_ATTRIBUTES",
    "PURGE_EVERY",
    "PURGE_SCHEDULE_ID",
    "RESTORE_ENDS",
    "SWEEP_SCHEDULE_ID",
    "BulkDecision",
    "OperationError",
    "Refused",
    "awaiting_approval_query",
    "batch_id_for",
    "batch_status",
    "check_bulk_filter",
    "confirm_ams",
    "decide",
    "decide_listed",
    "describe",
    "dry_run_batch",
    "ensure_purge_schedule",
    "ensure_sweep_schedule",
    "get_status",
    "is_awaiting_approval",
    "list_batches",
    "list_query",
    "list_sagas",
    "resolve",
    "resolve_workflow_id",
    "restore_id_for",
    "restore_status",
    "running_saga_ids",
    "select_for_approval",
    "signing_key",
    "start_batch",
    "start_refund",
    "start_refund_planned",
    "start_restore",
    "trigger_sweep",
    "wait_batch",
    "wait_batch_planned",
    "wait_for_state",
    "wait_restore",
    "workflow_id_for",
]
