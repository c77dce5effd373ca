"""Waiting for people inside a workflow: one loop for every approval (saga, batch, restore).

Workflow code: deterministic (workflow time and durable timers only). The commands it issues
are exactly those of the loops it replaced, so recorded histories replay unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Literal

from temporalio import workflow


async def wait_for_decision(
    decided: Callable[[], bool],
    *,
    deadline: datetime,
    reminder_every: timedelta,
    remind: Callable[[], Awaitable[None]],
    ends_at: datetime | None = None,
) -> Literal["decided", "deadline", "ended"]:
    """Wait until `decided()` is true, reminding every `reminder_every` while it is not.

    Args:
        decided: True once the wait is over (enough approvals, or a rejection).
        deadline: No decision by then: "deadline".
        reminder_every: How often to `remind` while waiting.
        remind: Sends a reminder (an activity); not called at or after the end of the wait.
        ends_at: Another end, checked before the deadline (e.g. a snapshot's expiry): "ended".

    Returns:
        Why the wait ended.
    """
    until = deadline if ends_at is None else min(deadline, ends_at)
    while not decided():
        now = workflow.now()
        if ends_at is not None and now >= ends_at:
            return "ended"
        if now >= deadline:
            return "deadline"
        try:
            await workflow.wait_condition(
                decided,
                timeout=min(until - now, reminder_every),
                timeout_summary="approval reminder",
            )
        except TimeoutError:
            if workflow.now() < until:
                await remind()
    return "decided"
