"""Telling people from inside a workflow (saga, batch, restore): a few tries, then go on.

Workflow code. A lost notification must never stop or fail a workflow: the status and the
Temporal UI still show what it waits for.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.refund_activities import RefundActivities
    from refundsaga.contracts import Notification

NOTIFY_TIMEOUT = timedelta(seconds=20)
NOTIFY_RETRY = RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=30))


async def send_notification(notification: Notification) -> ActivityError | None:
    """Send it; None when delivered, else why not (the caller records or logs it)."""
    try:
        await workflow.execute_activity_method(
            RefundActivities.notify,
            notification,
            start_to_close_timeout=NOTIFY_TIMEOUT,
            retry_policy=NOTIFY_RETRY,
            summary=f"notify: {notification.kind}",
        )
    except ActivityError as err:
        return err
    return None
