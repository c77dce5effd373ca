"""The signed webhook notifier, against a real local HTTP receiver."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from pydantic import SecretStr
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from temporalio.common import RetryPolicy
from temporalio.testing import ActivityEnvironment

from activities.refund_activities import RefundActivities
from refundsaga.ams import HttpAmsClient
from refundsaga.approval import policy_from_settings
from refundsaga.contracts import CloseInput, Notification, SagaState
from refundsaga.notify import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    CompositeNotifier,
    LogNotifier,
    NotifyConfigError,
    WebhookDeliveryError,
    WebhookNotifier,
    notifier_from_settings,
)
from refundsaga.processor import ProcessorClient
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from tests.fixtures.sandboxes import serve_app
from tests.fixtures.stack import free_ports

SECRET = "whsec_" + base64.b64encode(b"refundsaga-notify-test-secret-32").decode()


def verify(body: bytes, headers: dict[str, str], secret: str = SECRET) -> bool:
    """What a receiver does, with the Standard Webhooks library and nothing of ours."""
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver that records every request and answers `statuses` first, then 204."""

    url: str
    requests: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


def _receiver_app(receiver: Receiver) -> Starlette:
    async def hook(request: Request) -> Response:
        receiver.requests.append(Received(dict(request.headers), await request.body()))
        return Response(status_code=receiver.statuses.pop(0) if receiver.statuses else 204)

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/hooks/refunds", hook, methods=["POST"]), Route("/healthz", healthz)]
    )


@pytest.fixture(scope="module")
def served_receiver() -> Iterator[Receiver]:
    receiver = Receiver(url="")
    with serve_app(_receiver_app(receiver)) as base_url:
        receiver.url = f"{base_url}/hooks/refunds"
        yield receiver


@pytest.fixture
def receiver(served_receiver: Receiver) -> Receiver:
    served_receiver.requests.clear()
    served_receiver.statuses.clear()
    return served_receiver


def _notification(kind: str = "approval_requested") -> Notification:
    return Notification.model_validate(
        {
            "kind": kind,
            "workflow_id": "refund-42",
            "purchase_id": 42,
            "text": "refund 4900 usd of purchase 42",
            "state": SagaState.AWAITING_APPROVAL,
        }
    )


def _webhook(url: str, *, tries: int = 3) -> WebhookNotifier:
    return WebhookNotifier(url, SecretStr(SECRET), timeout_s=2.0, tries=tries, backoff_s=0.01)


async def test_posts_the_notification_as_signed_json(receiver: Receiver) -> None:
    note = _notification()
    async with _webhook(receiver.url) as webhook:
        await webhook.send(note)

    (got,) = receiver.requests
    assert got.headers["content-type"] == "application/json"
    assert json.loads(got.body) == note.model_dump(mode="json")
    assert verify(got.body, got.headers)
    # The scheme spelled out, independently of any library: v1,base64(HMAC(id.timestamp.body)).
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{got.headers[ID_HEADER]}.{got.headers[TIMESTAMP_HEADER]}.".encode() + got.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert got.headers[SIGNATURE_HEADER] == f"v1,{expected}"
    other = "whsec_" + base64.b64encode(b"another-secret-of-thirty-two-byt").decode()
    assert not verify(got.body, got.headers, other)
    assert not verify(got.body.replace(b"42", b"43"), got.headers)
    # The id and timestamp are signed: a replay with a fresh timestamp or a new id fails.
    assert not verify(
        got.body, {**got.headers, TIMESTAMP_HEADER: str(int(got.headers[TIMESTAMP_HEADER]) + 1)}
    )
    assert not verify(got.body, {**got.headers, ID_HEADER: "another"})


async def test_retries_after_a_500_with_the_same_delivery_id(receiver: Receiver) -> None:
    receiver.statuses = [500]
    async with _webhook(receiver.url) as webhook:
        await webhook.send(_notification())

    first, second = receiver.requests
    assert first.body == second.body
    assert first.headers[ID_HEADER] == second.headers[ID_HEADER]
    for got in (first, second):
        assert verify(got.body, got.headers)


async def test_gives_up_after_its_tries_and_raises_for_temporal(receiver: Receiver) -> None:
    receiver.statuses = [503, 502, 500]
    async with _webhook(receiver.url, tries=3) as webhook:
        with pytest.raises(WebhookDeliveryError, match="HTTP 500"):
            await webhook.send(_notification())
    assert len(receiver.requests) == 3


async def test_a_4xx_is_not_retried_in_process(receiver: Receiver) -> None:
    receiver.statuses = [401]
    async with _webhook(receiver.url) as webhook:
        with pytest.raises(WebhookDeliveryError, match="HTTP 401"):
            await webhook.send(_notification())
    assert len(receiver.requests) == 1


async def test_transport_errors_are_retried_then_raised() -> None:
    (port,) = free_ports(1)  # nothing listens there
    async with _webhook(f"http://127.0.0.1:{port}/hook/t0ken", tries=2) as webhook:
        with pytest.raises(WebhookDeliveryError, match="ConnectError") as raised:
            await webhook.send(_notification())
    # Errors name the host only: webhook URLs often carry a token in the path.
    assert "t0ken" not in str(raised.value)


async def test_the_last_activity_attempt_logs_and_drops(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500] * 6
    env = ActivityEnvironment()
    policy = RetryPolicy(maximum_attempts=3)
    note = _notification("needs_attention")
    async with _webhook(receiver.url, tries=2) as webhook:
        env.info = dataclasses.replace(env.info, attempt=1, retry_policy=policy)
        with pytest.raises(WebhookDeliveryError):
            await env.run(webhook.send, note)  # Temporal retries this one
        env.info = dataclasses.replace(env.info, attempt=3)
        with caplog.at_level(logging.ERROR, logger="refundsaga.notify"):
            await env.run(webhook.send, note)  # a lost notification must not fail the saga
    assert "notification dropped after the last attempt" in caplog.text
    deliveries = {r.headers[ID_HEADER] for r in receiver.requests}
    assert len(receiver.requests) == 4 and len(deliveries) == 1


def test_the_notification_carries_no_personal_data_fields() -> None:
    # Identifiers and a short text only: no names, emails, member or user details.
    assert set(Notification.model_fields) == {"kind", "workflow_id", "purchase_id", "text", "state"}
    body = json.loads(_notification().model_dump_json())
    assert set(body) == set(Notification.model_fields)


async def test_the_log_is_written_even_when_the_webhook_fails(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [400]
    webhook = _webhook(receiver.url)
    notifier = CompositeNotifier([LogNotifier(), webhook])
    with (
        caplog.at_level(logging.INFO, logger="refundsaga.notify"),
        pytest.raises(WebhookDeliveryError),
    ):
        await notifier.send(_notification())
    await notifier.aclose()
    (record,) = [r for r in caplog.records if r.getMessage().startswith("notify ")]
    assert vars(record)["workflow_id"] == "refund-42"


async def test_notifier_from_settings() -> None:
    assert isinstance(notifier_from_settings(Settings(notify_webhook_url=None)), LogNotifier)
    with pytest.raises(NotifyConfigError, match="REFUND_NOTIFY_WEBHOOK_SECRET"):
        notifier_from_settings(Settings(notify_webhook_url="https://hooks.example.org/refunds"))
    with pytest.raises(NotifyConfigError, match="http"):
        notifier_from_settings(
            Settings(
                notify_webhook_url="ftp://example.org", notify_webhook_secret=SecretStr(SECRET)
            )
        )
    for weak in ("s", "whsec_short", "whsec_not*base64*at*all*but*long*enough*!!"):
        with pytest.raises(NotifyConfigError, match="Standard Webhooks secret"):
            notifier_from_settings(
                Settings(
                    notify_webhook_url="https://hooks.example.org/refunds",
                    notify_webhook_secret=SecretStr(weak),
                )
            )
    both = notifier_from_settings(
        Settings(
            notify_webhook_url="https://hooks.example.org/refunds",
            notify_webhook_secret=SecretStr(SECRET),
        )
    )
    assert isinstance(both, CompositeNotifier)
    assert [type(n) for n in both.notifiers] == [LogNotifier, WebhookNotifier]
    await both.aclose()


class FlakyNotifier:
    """Fails the first `failures` sends like an unreachable webhook, then records them."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[Notification] = []

    async def send(self, notification: Notification) -> None:
        if self.failures:
            self.failures -= 1
            raise WebhookDeliveryError("hooks.example.org answered 503")
        self.sent.append(notification)


async def test_the_end_is_notified_when_the_first_webhook_try_fails(
    sqlite_store: OasisStore,
) -> None:
    notifier = FlakyNotifier(failures=1)
    settings = Settings()
    async with (
        ProcessorClient("http://127.0.0.1:9", SecretStr("unused")) as processor,
        HttpAmsClient("http://127.0.0.1:9", SecretStr("unused")) as ams,
    ):
        activities = RefundActivities(
            store=sqlite_store,
            processor=processor,
            ams=ams,
            notifier=notifier,
            policy=policy_from_settings(settings),
        )
        close = CloseInput(
            workflow_id="refund-7", purchase_id=7, state=SagaState.REJECTED, revoked=False
        )
        env = ActivityEnvironment()
        env.info = dataclasses.replace(env.info, attempt=1, retry_policy=RetryPolicy())
        with pytest.raises(WebhookDeliveryError):
            await env.run(activities.close_saga, close)  # the end is recorded, the hook fails
        env.info = dataclasses.replace(env.info, attempt=2)
        await env.run(activities.close_saga, close)  # Temporal's retry
        env.info = dataclasses.replace(env.info, attempt=1)
        await env.run(activities.close_saga, close)  # a re-run of a finished close
    assert [(n.kind, n.workflow_id) for n in notifier.sent] == [("saga_ended", "refund-7")]
    ends = [e for e in sqlite_store.audit_trail(workflow_id="refund-7") if e.event == "saga_ended"]
    assert len(ends) == 1


async def test_refund_keys_webhook_secret_makes_a_secret_the_worker_accepts(
    receiver: Receiver,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "console.cli", "keys", "webhook-secret", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    secret = json.loads(done.stdout)["secret"]
    settings = Settings(notify_webhook_url=receiver.url, notify_webhook_secret=SecretStr(secret))
    notifier = notifier_from_settings(settings)  # refuses a secret it cannot use
    assert isinstance(notifier, CompositeNotifier)
    await notifier.send(_notification())
    await notifier.aclose()
    (got,) = receiver.requests
    assert verify(got.body, got.headers, secret)
