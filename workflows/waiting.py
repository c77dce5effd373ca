"""Waiting for people inside a workflow (saga, batch, restore): the approval wait, and the guard
that keeps a malformed message from wedging a workflow.

Workflow code: deterministic (workflow time and durable timers only).
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


def malformed(message: object, model: type) -> str | None:
    """Why a signal or update argument is not its model, or None.

    The converter validates JSON payloads against the handler's type but hands other encodings
    (binary/plain, binary/null) through as they are; such a message would crash the handler
    and fail every workflow task after it, wedging the workflow for good (the signal stays in
    its history). Handlers record it as ignored instead; validators refuse it.
    """
    if isinstance(message, model):
        return None
    return f"malformed message: expected {model.__name__}, got {type(message).__name__}"


def ignored_malformed(
    kind: str, message: object, model: type, ignore: Callable[[str, str, str], None]
) -> bool:
    """True when `message` is malformed: then `ignore(kind, "unknown", reason)` recorded it."""
    reason = malformed(message, model)
    if reason:
        ignore(kind, "unknown", reason)
    return reason is not None
