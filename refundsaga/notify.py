"""Notifications to people (approval requests, reminders, AMS tasks, NEEDS_ATTENTION).

The webhook speaks Standard Webhooks (https://www.standardwebhooks.com): a receiver verifies it
with an off-the-shelf library (`standardwebhooks.Webhook(secret).verify(body, headers)`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr
from standardwebhooks import Webhook
from temporalio import activity

from refundsaga.contracts import Notification

if TYPE_CHECKING:
    from refundsaga.settings import Settings

__all__ = [
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "ClosableNotifier",
    "CompositeNotifier",
    "LogNotifier",
    "Notifier",
    "NotifyConfigError",
    "WebhookDeliveryError",
    "WebhookNotifier",
    "notifier_from_settings",
    "validate_notify_settings",
]

log = logging.getLogger("refundsaga.notify")

ID_HEADER = "webhook-id"
"""The same for every retry of one notification, so receivers can drop duplicates."""
TIMESTAMP_HEADER = "webhook-timestamp"
"""Unix seconds when the request was signed; receivers reject old ones (replays)."""
SIGNATURE_HEADER = "webhook-signature"
"""`v1,<base64 HMAC-SHA256 of f"{id}.{timestamp}.{raw body}">`, keyed with the secret's bytes."""


class Notifier(Protocol):
    """Where notifications go: the log by default; a webhook or chat adapter in production."""

    async def send(self, notification: Notification) -> None: ...


class ClosableNotifier(Notifier, Protocol):
    """A notifier the worker owns: closed at shutdown."""

    async def aclose(self) -> None: ...


class NotifyConfigError(ValueError):
    """The notification settings are inconsistent (say which variable to set)."""


class WebhookDeliveryError(RuntimeError):
    """The webhook did not accept a notification after the in-process tries."""


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

    async def aclose(self) -> None:
        """Nothing to close."""


def _final_activity_attempt() -> bool:
    """Whether this runs in the last attempt its activity's retry policy allows."""
    if not activity.in_activity():
        return False
    info = activity.info()
    policy = info.retry_policy
    return policy is not None and 0 < policy.maximum_attempts <= info.attempt


def _delivery_id() -> str:
    # Stable across in-process tries and Temporal's retries of the same activity.
    if activity.in_activity():
        info = activity.info()
        if info.workflow_id:
            return f"{info.workflow_id}/{info.workflow_run_id}/{info.activity_id}"
    return uuid.uuid4().hex


class WebhookNotifier:
    """POSTs each notification as JSON, signed as Standard Webhooks specify.

    Runs inside the `notify` activity, whose Temporal retry policy applies on top: the
    in-process tries are short (by default 3 within about a second plus the request
    timeouts), then it raises so Temporal retries later. 5xx, 408, 429 and transport errors are
    tried again; any other answer is not (retrying cannot fix a wrong secret or URL).

    A notification must never fail a refund, and the workflow does not catch a failed
    `notify`: on the activity's last attempt a delivery failure is logged at ERROR and dropped.
    """

    def __init__(
        self,
        url: str,
        secret: SecretStr | str,
        *,
        timeout_s: float = 5.0,
        tries: int = 3,
        backoff_s: float = 0.25,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if tries < 1:
            raise ValueError("tries must be at least 1")
        self._url = url
        raw = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        self._signer = Webhook(raw)
        self._tries = tries
        self._backoff_s = backoff_s
        # Only scheme and host in logs and errors: webhook URLs often carry a token in the path.
        parts = urlsplit(url)
        self.target = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self._http = httpx.AsyncClient(
            timeout=timeout_s,
            transport=transport,
            headers={"Content-Type": "application/json", "User-Agent": "refundsaga-notify/1"},
        )

    async def __aenter__(self) -> WebhookNotifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def send(self, notification: Notification) -> None:
        try:
            await self._deliver(notification)
        except WebhookDeliveryError as err:
            if not _final_activity_attempt():
                raise
            log.error(
                "notification dropped after the last attempt: %s",
                err,
                extra={
                    "workflow_id": notification.workflow_id,
                    "purchase_id": notification.purchase_id,
                    "notification": notification.kind,
                },
            )

    async def _deliver(self, notification: Notification) -> None:
        body = notification.model_dump_json().encode()
        delivery = _delivery_id()
        failure = ""
        for attempt in range(1, self._tries + 1):
            # A fresh timestamp per try, so a retry after a slow failure is not already stale.
            now = datetime.now(UTC)
            headers = {
                ID_HEADER: delivery,
                TIMESTAMP_HEADER: str(int(now.timestamp())),
                SIGNATURE_HEADER: self._signer.sign(msg_id=delivery, timestamp=now, data=body),
            }
            try:
                response = await self._http.post(self._url, content=body, headers=headers)
            except httpx.TransportError as err:
                failure, retryable = type(err).__name__, True
            else:
                if response.is_success:
                    return
                status = response.status_code
                failure = f"HTTP {status}"
                retryable = status >= 500 or status in (408, 429)
            if not retryable or attempt == self._tries:
                break
            log.warning(
                "webhook %s: %s, trying again",
                self.target,
                failure,
                extra={"workflow_id": notification.workflow_id, "try": attempt},
            )
            await asyncio.sleep(self._backoff_s * 2 ** (attempt - 1))
        raise WebhookDeliveryError(
            f"webhook {self.target} did not accept {notification.kind} for "
            f"{notification.workflow_id}: {failure}"
        )


class CompositeNotifier:
    """Sends to every notifier in order; one failing does not stop the others."""

    def __init__(self, notifiers: Sequence[ClosableNotifier]) -> None:
        self.notifiers = list(notifiers)

    async def send(self, notification: Notification) -> None:
        errors: list[Exception] = []
        for notifier in self.notifiers:
            try:
                await notifier.send(notification)
            except Exception as err:
                errors.append(err)
        if errors:
            # The first is raised so the activity fails and Temporal retries it.
            raise errors[0]

    async def aclose(self) -> None:
        """Close every notifier."""
        for notifier in self.notifiers:
            await notifier.aclose()


def is_webhook_secret(value: str) -> bool:
    """Whether `value` is `whsec_` + base64 of 24-64 bytes, as Standard Webhooks secrets are."""
    if not value.startswith("whsec_"):
        return False
    try:
        raw = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        return False
    return 24 <= len(raw) <= 64


def validate_notify_settings(settings: Settings) -> None:
    """Check the webhook settings; the worker calls this first thing.

    Raises:
        NotifyConfigError: The URL is set without a secret, the secret is not a Standard Webhooks
            secret (`whsec_` and base64), or the URL is not an http(s) URL.
    """
    url = settings.notify_webhook_url
    if not url:
        return
    secret = settings.notify_webhook_secret
    if secret is None or not secret.get_secret_value():
        raise NotifyConfigError(
            "REFUND_NOTIFY_WEBHOOK_SECRET must be set when REFUND_NOTIFY_WEBHOOK_URL is set: "
            "every webhook request is signed with it"
        )
    if not is_webhook_secret(secret.get_secret_value()):
        raise NotifyConfigError(
            "REFUND_NOTIFY_WEBHOOK_SECRET must be a Standard Webhooks secret: whsec_ followed by "
            "base64 of 24 to 64 random bytes (make one with `refund keys webhook-secret`)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotifyConfigError("REFUND_NOTIFY_WEBHOOK_URL must be an http(s) URL")


def notifier_from_settings(settings: Settings) -> ClosableNotifier:
    """The log, plus the signed webhook when `REFUND_NOTIFY_WEBHOOK_URL` is set.

    Raises:
        NotifyConfigError: See `validate_notify_settings`.
    """
    validate_notify_settings(settings)
    url, secret = settings.notify_webhook_url, settings.notify_webhook_secret
    if not url or secret is None:
        return LogNotifier()
    return CompositeNotifier([LogNotifier(), WebhookNotifier(url, secret)])
