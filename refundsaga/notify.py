"""Notifications to people (approval requests, reminders, AMS tasks, NEEDS_ATTENTION)."""

from __future__ import annotations

import logging
from typing import Protocol

from refundsaga.contracts import Notification

log = logging.getLogger("refundsaga.notify")


class Notifier(Protocol):
    """Where notifications go: the log by default; a webhook or chat adapter in production."""

    async def send(self, notification: Notification) -> None: ...


class LogNotifier:
    """Writes each notification to the log (identifiers only, so it is safe to ship)."""

    async def send(self, notification: Notification) -> None:
        log.info(
            "notify %s: %s",
            notification.kind,
            notification.text,
            extra={
                "workflow_id": notification.workflow_id,
                "purchase_id": notification.purchase_id,
                "notification": notification.kind,
            },
        )
