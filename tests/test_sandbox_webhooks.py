"""The processor sandbox sends webhooks as Stripe does, to a receiver verifying them with the
official `stripe.Webhook.construct_event`; events, disputes and lists as Stripe's API has them.

Each test gets its own sandbox and receiver, both over real HTTP, so deliveries never leak
between tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxes.processor import DEFAULT_API_VERSION, create_app
from sandboxes.webhooks import USER_AGENT, signature_header
from tests.fixtures.sandboxes import ProcessorSandbox, admin_client, serve_app

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY = "sk_test_webhooks"
SECRET = "whsec_test_sandbox_webhooks_secret"
# Quick retries so that a test sees the whole schedule in well under a second.
FAST_RETRIES = {"retry_initial_s": 0.05, "retry_max_s": 0.2, "max_attempts": 4, "timeout_s": 5}

# stripe-python's HTTPXClient posts its encoded form through httpx's deprecated `data=`.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


class Receiver:
    """A webhook receiver that verifies each delivery with stripe-python and records it.

    `answers[type]` are statuses to answer verified deliveries of that event type with,
    first to last, before it settles on 200; only deliveries answered 2xx count as received.
    """

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.url = ""
        self.events: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.rejected: list[str] = []
        self.answers: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/healthz", lambda _: JSONResponse({"ok": True})),
                Route("/webhooks", self._receive, methods=["POST"]),
            ]
        )

    async def _receive(self, request: Request) -> Response:
        payload = await request.body()
        try:
            event = stripe.Webhook.construct_event(
                payload, request.headers.get("stripe-signature"), self.secret
            )
        except stripe.SignatureVerificationError as exc:
            with self._lock:
                self.rejected.append(str(exc))
            return Response(status_code=400)
        with self._lock:
            planned = self.answers.get(event.type)
            status = planned.pop(0) if planned else 200
            if status < 300:
                assert event.id == json.loads(payload)["id"]
                self.events.append(json.loads(payload))
                self.headers.append(dict(request.headers))
        return Response(status_code=status)

    def types(self) -> list[str]:
        return [event["type"] for event in self.events]


@contextmanager
def running_receiver(secret: str = SECRET) -> Iterator[Receiver]:
    """A receiver served on a free port; its URL is set once it is up."""
    receiver = Receiver(secret)
    with serve_app(receiver.app()) as url:
        receiver.url = f"{url}/webhooks"
        yield receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A receiver that knows the sandbox's signing secret."""
    with running_receiver() as receiver:
        yield receiver


@pytest.fixture
def sandbox(receiver: Receiver) -> Iterator[ProcessorSandbox]:
    """A fresh processor sandbox sending every event to `receiver`, retrying fast."""
    app = create_app(api_key=KEY, webhook_url=receiver.url, webhook_secret=SECRET)
    with serve_app(app) as url, admin_client(url, KEY) as http:
        sandbox = ProcessorSandbox(url=url, api_key=KEY, http=http)
        _set_webhook_faults(sandbox)
        yield sandbox


def _set_webhook_faults(sandbox: ProcessorSandbox, **faults: Any) -> dict[str, Any]:
    response = sandbox.http.post("/_sandbox/webhooks/faults", json={**FAST_RETRIES, **faults})
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def _flush(sandbox: ProcessorSandbox) -> None:
    response = sandbox.http.post("/_sandbox/webhooks/flush", json={"timeout_s": 20})
    assert response.status_code == 200, response.text
    assert response.json()["pending"] == 0


def _deliveries(sandbox: ProcessorSandbox, **filters: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = sandbox.http.get(
        "/_sandbox/webhooks/deliveries", params=filters
    ).json()
    return result


def _refund(sandbox: ProcessorSandbox, charge_id: str, **params: Any) -> httpx.Response:
    headers = {"Idempotency-Key": params.pop("key")} if "key" in params else {}
    return sandbox.http.post("/v1/refunds", data={"charge": charge_id, **params}, headers=headers)


def _of_type(receiver: Receiver, event_type: str) -> list[dict[str, Any]]:
    return [event for event in receiver.events if event["type"] == event_type]


# --- what each change emits -----------------------------------------------------------------


def test_a_refund_emits_refund_created_and_charge_refunded(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    charge = sandbox.create_charge(1000, payment_intent="pi_wh_1")
    key = str(uuid.uuid4())

    response = _refund(sandbox, charge["id"], amount="400", key=key, **{"metadata[saga]": "s-1"})
    _flush(sandbox)

    refund = response.json()
    assert receiver.types() == ["refund.created", "charge.refunded"]
    created, refunded = receiver.events
    assert created["data"] == {"object": refund}
    assert refunded["data"]["object"]["id"] == charge["id"]
    assert refunded["data"]["object"]["amount_refunded"] == 400
    assert refunded["data"]["object"]["refunds"]["data"] == [refund]
    for event in receiver.events:
        assert event["id"].startswith("evt_")
        assert (event["object"], event["api_version"], event["livemode"]) == (
            "event",
            DEFAULT_API_VERSION,
            False,
        )
        assert event["pending_webhooks"] == 1
        assert event["request"] == {"id": response.headers["request-id"], "idempotency_key": key}
        assert abs(event["created"] - time.time()) < 60
    assert {h["user-agent"] for h in receiver.headers} == {USER_AGENT}
    assert {h["content-type"] for h in receiver.headers} == {"application/json"}
    stored = sandbox.http.get(f"/v1/events/{created['id']}").json()
    assert stored == {**created, "pending_webhooks": 0}
    attempts = _deliveries(sandbox, event=created["id"])
    assert [(a["attempt"], a["status"], a["delivered"]) for a in attempts] == [(1, 200, True)]


def test_an_idempotent_replay_emits_nothing_more(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    charge = sandbox.create_charge(1000)

    first = _refund(sandbox, charge["id"], amount="100", key="replay-key")
    again = _refund(sandbox, charge["id"], amount="100", key="replay-key")
    _flush(sandbox)

    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert receiver.types() == ["refund.created", "charge.refunded"]


def test_without_faults_one_endpoint_gets_events_in_order(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    charge = sandbox.create_charge(1000)

    for _ in range(5):
        _refund(sandbox, charge["id"], amount="10")
    _flush(sandbox)

    listed = sandbox.http.get("/v1/events", params={"limit": 100}).json()["data"]
    assert [e["id"] for e in receiver.events] == [e["id"] for e in reversed(listed)]


def test_a_refund_made_before_anyone_listened_is_dated_back_and_silent(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    charge = sandbox.create_charge(500)
    month = 30 * 86_400
    response = sandbox.http.post(
        f"/_sandbox/charges/{charge['id']}/refund_outside", json={"ago_s": month}
    )
    response.raise_for_status()
    refund = response.json()
    _flush(sandbox)

    assert receiver.events == []
    assert refund["status"] == "succeeded"
    assert sandbox.get_charge(charge["id"])["amount_refunded"] == 500
    assert refund["created"] <= time.time() - month + 60


@pytest.mark.parametrize("how", ["api", "dashboard"])
def test_a_refund_made_outside_oasis_emits_the_same_events(
    sandbox: ProcessorSandbox, receiver: Receiver, how: str
) -> None:
    charge = sandbox.create_charge(700)

    if how == "api":
        refund = _refund(sandbox, charge["id"]).json()
    else:
        refund = sandbox.refund_outside(charge["id"])
    _flush(sandbox)

    assert receiver.types() == ["refund.created", "charge.refunded"]
    created = receiver.events[0]["data"]["object"]
    assert created == refund
    assert created["metadata"] == ({} if how == "api" else {"source": "dashboard"})
    assert receiver.events[1]["data"]["object"]["refunded"] is True
    assert receiver.events[0]["request"]["idempotency_key"] is None
    assert receiver.events[0]["request"]["id"].startswith("req_")


@pytest.mark.parametrize("settled_by", ["admin", "polling"])
def test_a_pending_refund_settling_emits_updated_then_charge_refunded(
    sandbox: ProcessorSandbox, receiver: Receiver, settled_by: str
) -> None:
    charge = sandbox.create_charge(500, refund_behavior="pending", settle_after_polls=1)

    refund = _refund(sandbox, charge["id"]).json()
    _flush(sandbox)
    assert receiver.types() == ["refund.created"]
    assert receiver.events[0]["data"]["object"]["status"] == "pending"
    if settled_by == "admin":
        sandbox.settle(refund["id"], "succeeded")
    else:
        sandbox.http.get(f"/v1/refunds/{refund['id']}").raise_for_status()
    _flush(sandbox)

    assert receiver.types() == ["refund.created", "refund.updated", "charge.refunded"]
    updated = receiver.events[1]
    assert updated["data"]["object"]["status"] == "succeeded"
    assert updated["data"]["previous_attributes"] == {"status": "pending"}
    assert updated["request"] == {"id": None, "idempotency_key": None}


def test_a_pending_refund_settles_by_itself_after_settle_after_s(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    charge = sandbox.create_charge(
        500, refund_behavior="pending", settle_after_polls=99, settle_after_s=0.2
    )
    refund = _refund(sandbox, charge["id"]).json()
    assert refund["status"] == "pending"
    deadline = time.monotonic() + 10
    while len(receiver.events) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    _flush(sandbox)

    # Nobody read the refund: it settled on the processor's own schedule, and said so.
    assert receiver.types() == ["refund.created", "refund.updated", "charge.refunded"]
    assert not [r for r in sandbox.requests() if r["method"] == "GET" and refund["id"] in r["path"]]


def test_a_pending_refund_that_fails_emits_updated_and_failed(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    charge = sandbox.create_charge(500, refund_behavior="pending", settle_after_polls=99)
    refund = _refund(sandbox, charge["id"]).json()

    sandbox.settle(refund["id"], "failed")
    _flush(sandbox)

    assert receiver.types() == ["refund.created", "refund.updated", "refund.failed"]
    failed = receiver.events[2]["data"]["object"]
    assert (failed["status"], failed["failure_reason"]) == ("failed", "lost_or_stolen_card")
    assert receiver.events[1]["data"]["previous_attributes"] == {
        "status": "pending",
        "failure_reason": None,
    }


def test_an_immediately_failed_refund_emits_created_and_failed(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    charge = sandbox.create_charge(500, refund_behavior="fail")

    refund = _refund(sandbox, charge["id"]).json()
    _flush(sandbox)

    assert refund["status"] == "failed"
    assert receiver.types() == ["refund.created", "refund.failed"]
    assert receiver.events[1]["data"]["object"] == refund


def test_a_succeeded_refund_failing_later_gives_the_money_back_and_emits(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    charge = sandbox.create_charge(900)
    refund = _refund(sandbox, charge["id"]).json()
    sandbox.advance_clock(3 * 86_400)

    failed = sandbox.http.post(
        f"/_sandbox/refunds/{refund['id']}/fail",
        json={"failure_reason": "expired_or_canceled_card"},
    )
    _flush(sandbox)

    assert failed.status_code == 200
    assert (failed.json()["status"], failed.json()["failure_reason"]) == (
        "failed",
        "expired_or_canceled_card",
    )
    assert sandbox.get_charge(charge["id"])["amount_refunded"] == 0
    assert receiver.types()[2:] == ["refund.updated", "refund.failed"]
    updated, late = receiver.events[2:]
    assert updated["data"]["previous_attributes"] == {"status": "succeeded", "failure_reason": None}
    assert late["data"]["object"] == failed.json()
    # The sandbox clock stamps the event; the signature (verified above) used real time.
    assert late["created"] >= refund["created"] + 3 * 86_400
    again = sandbox.http.post(f"/_sandbox/refunds/{refund['id']}/fail", json={})
    assert again.status_code == 200
    _flush(sandbox)
    assert len(receiver.events) == 4


def test_only_succeeded_refunds_can_fail_later(sandbox: ProcessorSandbox) -> None:
    charge = sandbox.create_charge(500, refund_behavior="pending", settle_after_polls=99)
    refund = _refund(sandbox, charge["id"]).json()

    pending = sandbox.http.post(f"/_sandbox/refunds/{refund['id']}/fail", json={})
    bad_reason = sandbox.http.post(
        f"/_sandbox/refunds/{refund['id']}/fail", json={"failure_reason": "bored"}
    )
    missing = sandbox.http.post("/_sandbox/refunds/re_missing/fail", json={})

    assert (pending.status_code, pending.json()["error"]["code"]) == (409, "refund_not_succeeded")
    assert bad_reason.status_code == 400
    assert missing.status_code == 404


def test_a_lost_dispute_withdraws_the_funds_and_emits(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    charge = sandbox.create_charge(1200, payment_intent="pi_dispute")

    opened = sandbox.http.post(
        f"/_sandbox/charges/{charge['id']}/dispute", json={"reason": "fraudulent"}
    ).json()
    blocked = _refund(sandbox, charge["id"])
    closed = sandbox.http.post(f"/_sandbox/disputes/{opened['id']}/close", json={"status": "lost"})
    _flush(sandbox)

    assert opened["id"].startswith("dp_")
    assert (opened["object"], opened["status"], opened["amount"]) == (
        "dispute",
        "needs_response",
        1200,
    )
    assert (opened["charge"], opened["payment_intent"]) == (charge["id"], "pi_dispute")
    assert (blocked.status_code, blocked.json()["error"]["code"]) == (400, "charge_disputed")
    assert sandbox.get_charge(charge["id"])["disputed"] is True
    assert receiver.types() == [
        "charge.dispute.created",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
    ]
    lost = closed.json()
    assert lost["status"] == "lost"
    [withdrawal] = lost["balance_transactions"]
    assert (withdrawal["amount"], withdrawal["currency"]) == (-1200, "usd")
    assert receiver.events[1]["data"]["object"] == lost
    assert receiver.events[2]["data"]["object"] == lost
    assert sandbox.http.get(f"/v1/disputes/{opened['id']}").json() == lost


def test_a_won_dispute_only_closes(sandbox: ProcessorSandbox, receiver: Receiver) -> None:
    charge = sandbox.create_charge(800)
    opened = sandbox.http.post(
        f"/_sandbox/charges/{charge['id']}/dispute", json={"amount": 300}
    ).json()

    won = sandbox.http.post(f"/_sandbox/disputes/{opened['id']}/close", json={"status": "won"})
    same = sandbox.http.post(f"/_sandbox/disputes/{opened['id']}/close", json={"status": "won"})
    other = sandbox.http.post(f"/_sandbox/disputes/{opened['id']}/close", json={"status": "lost"})
    twice = sandbox.http.post(f"/_sandbox/charges/{charge['id']}/dispute", json={})
    _flush(sandbox)

    assert (won.json()["status"], won.json()["balance_transactions"]) == ("won", [])
    assert same.status_code == 200
    assert other.status_code == 409
    assert twice.status_code == 409
    assert receiver.types() == ["charge.dispute.created", "charge.dispute.closed"]
    assert _refund(sandbox, charge["id"]).status_code == 200


def test_dispute_admin_input_is_validated(sandbox: ProcessorSandbox) -> None:
    charge = sandbox.create_charge(100)

    assert sandbox.http.post("/_sandbox/charges/ch_missing/dispute", json={}).status_code == 404
    for body in ({"amount": 0}, {"amount": 101}, {"reason": "bored"}):
        response = sandbox.http.post(f"/_sandbox/charges/{charge['id']}/dispute", json=body)
        assert response.status_code == 400, body
    assert (
        sandbox.http.post("/_sandbox/disputes/dp_missing/close", json={"status": "lost"})
    ).status_code == 404


# --- delivery: signatures, retries, faults --------------------------------------------------


def test_the_signature_is_the_one_stripe_python_checks() -> None:
    body = json.dumps({"id": "evt_1", "object": "event", "type": "refund.created"})
    now = int(time.time())

    header = signature_header(SECRET, body, now)

    assert header == stripe.WebhookSignature.generate_signature_header(body, SECRET, now)
    assert stripe.WebhookSignature.verify_header(body, header, SECRET, tolerance=300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(body + " ", header, SECRET, tolerance=300)


def test_a_receiver_with_another_secret_rejects_every_delivery() -> None:
    with (
        running_receiver("whsec_someone_else") as forged,
        serve_app(create_app(api_key=KEY)) as url,
        admin_client(url, KEY) as http,
    ):
        sandbox = ProcessorSandbox(url=url, api_key=KEY, http=http)
        _set_webhook_faults(sandbox, max_attempts=2)
        http.post("/v1/webhook_endpoints", data={"url": forged.url, "enabled_events[]": "*"})
        charge = sandbox.create_charge(100)

        _refund(sandbox, charge["id"])
        _flush(sandbox)

        attempts = _deliveries(sandbox)
    assert forged.events == []
    assert len(forged.rejected) == 4
    assert all("No signatures found matching" in reason for reason in forged.rejected)
    assert sorted((a["type"], a["attempt"], a["status"]) for a in attempts) == [
        ("charge.refunded", 1, 400),
        ("charge.refunded", 2, 400),
        ("refund.created", 1, 400),
        ("refund.created", 2, 400),
    ]


def test_a_failing_receiver_gets_retries_then_the_event(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    receiver.answers = {"refund.created": [500, 503]}
    charge = sandbox.create_charge(100, refund_behavior="fail")

    _refund(sandbox, charge["id"])
    _flush(sandbox)

    assert sorted(receiver.types()) == ["refund.created", "refund.failed"]
    attempts = _deliveries(sandbox, type="refund.created")
    assert [(a["attempt"], a["status"], a["delivered"]) for a in attempts] == [
        (1, 500, False),
        (2, 503, False),
        (3, 200, True),
    ]
    assert [a["ts"] for a in attempts] == sorted(a["ts"] for a in attempts)
    assert attempts[2]["ts"] - attempts[0]["ts"] >= 0.05 + 0.1 - 0.01


def test_an_unreachable_receiver_is_retried_until_the_attempts_run_out(
    sandbox: ProcessorSandbox,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/webhooks"
    endpoint = sandbox.http.post(
        "/v1/webhook_endpoints", data={"url": dead_url, "enabled_events[]": "refund.created"}
    ).json()
    charge = sandbox.create_charge(100)

    _refund(sandbox, charge["id"])
    _flush(sandbox)

    attempts = _deliveries(sandbox, endpoint=endpoint["id"])
    assert [a["attempt"] for a in attempts] == [1, 2, 3, 4]
    assert {(a["status"], a["error"]) for a in attempts} == {(None, "ConnectError")}
    event = sandbox.http.get(f"/v1/events/{attempts[0]['event']}").json()
    assert event["pending_webhooks"] == 1  # the receiver got it, the dead endpoint never did


def test_dropped_deliveries_never_arrive_but_the_events_exist(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    _set_webhook_faults(sandbox, drop_rate=1.0)
    charge = sandbox.create_charge(100)

    _refund(sandbox, charge["id"])
    _flush(sandbox)

    assert receiver.events == []
    attempts = _deliveries(sandbox)
    assert [(a["dropped"], a["attempt"], a["status"]) for a in attempts] == [(True, 0, None)] * 2
    listed = sandbox.http.get("/v1/events").json()["data"]
    assert [e["type"] for e in listed] == ["charge.refunded", "refund.created"]


def test_duplicated_deliveries_arrive_twice(sandbox: ProcessorSandbox, receiver: Receiver) -> None:
    _set_webhook_faults(sandbox, duplicate_rate=1.0)
    charge = sandbox.create_charge(100)

    _refund(sandbox, charge["id"])
    _flush(sandbox)

    ids = [e["id"] for e in receiver.events]
    assert len(ids) == 4 and len(set(ids)) == 2
    assert all(ids.count(event_id) == 2 for event_id in ids)
    assert sorted(a["duplicate"] for a in _deliveries(sandbox)) == [False, False, True, True]


def test_reordered_deliveries_let_later_events_overtake(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    _set_webhook_faults(sandbox, reorder_rate=1.0, reorder_max_s=1.0, seed=7)
    charge = sandbox.create_charge(1000)

    for _ in range(4):
        _refund(sandbox, charge["id"], amount="10")
    _flush(sandbox)

    attempts = _deliveries(sandbox)
    held = {a["event"]: a["held_s"] for a in attempts}
    emitted = [e["id"] for e in reversed(sandbox.http.get("/v1/events").json()["data"])]
    arrived = [e["id"] for e in receiver.events]
    assert sorted(arrived) == sorted(emitted)
    # Wherever an earlier event was held clearly longer than a later one, it arrived after.
    overtaken = [
        (early, late)
        for i, early in enumerate(emitted)
        for late in emitted[i + 1 :]
        if held[early] - held[late] > 0.2
    ]
    assert overtaken, held
    for early, late in overtaken:
        assert arrived.index(late) < arrived.index(early)


def test_delivery_faults_repeat_for_a_seed(sandbox: ProcessorSandbox) -> None:
    def run() -> list[tuple[str, bool, bool]]:
        _set_webhook_faults(sandbox, drop_rate=0.3, duplicate_rate=0.3, seed=4)
        sandbox.http.delete("/_sandbox/webhooks/deliveries")
        charge = sandbox.create_charge(1000)
        for _ in range(5):
            _refund(sandbox, charge["id"], amount="10")
        _flush(sandbox)
        # One endpoint, no retries: the worker records deliveries in event order.
        return [(a["type"], a["dropped"], a["duplicate"]) for a in _deliveries(sandbox)]

    first, second = run(), run()

    assert first == second
    assert any(dropped for _, dropped, _ in first)
    assert any(duplicate for _, _, duplicate in first)
    assert not all(dropped for _, dropped, _ in first)


def test_pause_holds_deliveries_until_resume(sandbox: ProcessorSandbox, receiver: Receiver) -> None:
    assert sandbox.http.post("/_sandbox/webhooks/pause").json() == {"paused": True, "pending": 0}
    charge = sandbox.create_charge(100)

    _refund(sandbox, charge["id"])
    time.sleep(0.3)
    paused_flush = sandbox.http.post("/_sandbox/webhooks/flush", json={})
    status = sandbox.http.get("/_sandbox/webhooks/status").json()
    received_while_paused = list(receiver.events)
    sandbox.http.post("/_sandbox/webhooks/resume").raise_for_status()
    _flush(sandbox)

    assert received_while_paused == []
    assert (paused_flush.status_code, paused_flush.json()["error"]["code"]) == (
        409,
        "webhooks_paused",
    )
    assert status == {"paused": True, "pending": 2}
    assert receiver.types() == ["refund.created", "charge.refunded"]
    assert [a["attempt"] for a in _deliveries(sandbox)] == [1, 1]


def test_webhook_fault_settings_are_validated(sandbox: ProcessorSandbox) -> None:
    for body in ({"drop_rate": 2}, {"colour": 1}, {"max_attempts": 0}, {"seed": "x"}):
        response = sandbox.http.post("/_sandbox/webhooks/faults", json=body)
        assert response.status_code == 400, body
    shown = sandbox.http.get("/_sandbox/webhooks/faults").json()
    assert shown["max_attempts"] == FAST_RETRIES["max_attempts"]
    assert sandbox.http.post("/_sandbox/webhooks/faults", json={}).json()["max_attempts"] == 8
    assert httpx.get(f"{sandbox.url}/_sandbox/webhooks/deliveries").status_code == 401


# --- webhook endpoints API --------------------------------------------------------------------


def test_endpoints_are_managed_like_stripes(sandbox: ProcessorSandbox, receiver: Receiver) -> None:
    client: Any = stripe.StripeClient(
        KEY,
        base_addresses={"api": sandbox.url},
        http_client=stripe.HTTPXClient(timeout=5, allow_sync_methods=True),
        max_network_retries=0,
    )
    with running_receiver("known once created") as second:
        created = client.v1.webhook_endpoints.create(
            params={"url": second.url, "enabled_events": ["refund.failed"]}
        )
        second.secret = created.secret
        listed = client.v1.webhook_endpoints.list()
        charge = sandbox.create_charge(100, refund_behavior="fail")
        _refund(sandbox, charge["id"])
        _flush(sandbox)
        client.v1.webhook_endpoints.delete(created.id)
        _refund(sandbox, sandbox.create_charge(100, refund_behavior="fail")["id"])
        _flush(sandbox)

    assert created.id.startswith("we_") and created.secret.startswith("whsec_")
    assert (created.object, created.status, created.enabled_events) == (
        "webhook_endpoint",
        "enabled",
        ["refund.failed"],
    )
    assert listed.data[0].id == created.id
    assert all("secret" not in e for e in listed.data)
    assert second.types() == ["refund.failed"]
    assert receiver.types() == ["refund.created", "refund.failed"] * 2
    missing = sandbox.http.get(f"/v1/webhook_endpoints/{created.id}")
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"enabled_events[]": "*"}, "parameter_missing"),
        ({"url": "http://x.test/hook"}, "parameter_missing"),
        ({"url": "ftp://x.test", "enabled_events[]": "*"}, "url_invalid"),
        ({"url": "http://x.test", "enabled_events[]": "Not An Event"}, "parameter_invalid"),
        ({"url": "http://x.test", "enabled_events[]": "*", "color": "red"}, "parameter_unknown"),
    ],
)
def test_endpoint_creation_is_validated(
    sandbox: ProcessorSandbox, params: dict[str, str], code: str
) -> None:
    response = sandbox.http.post("/v1/webhook_endpoints", data=params)

    assert (response.status_code, response.json()["error"]["code"]) == (400, code)


def test_the_startup_endpoint_survives_restart_and_reset(tmp_path: Path) -> None:
    state = tmp_path / "processor.json"
    url = "http://127.0.0.1:9/webhooks"

    def endpoints() -> list[dict[str, Any]]:
        app = create_app(api_key=KEY, state_path=state, webhook_url=url, webhook_secret=SECRET)
        with serve_app(app) as base, admin_client(base, KEY) as http:
            result: list[dict[str, Any]] = http.get("/v1/webhook_endpoints").json()["data"]
            http.post("/_sandbox/reset").raise_for_status()
            after_reset = http.get("/v1/webhook_endpoints").json()["data"]
        assert [e["url"] for e in after_reset] == [url]
        return result

    first, second = endpoints(), endpoints()

    assert [(e["url"], e["enabled_events"]) for e in first] == [(url, ["*"])]
    assert len(second) == 1
    assert "secret" not in first[0]
    saved = json.loads(state.read_text())["webhook_endpoints"]
    assert [e["secret"] for e in saved.values()] == [SECRET]


def test_main_registers_the_endpoint_from_the_environment(
    receiver: Receiver, tmp_path: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "SANDBOX_API_KEY": KEY,
        "SANDBOX_WEBHOOK_URL": receiver.url,
        "SANDBOX_WEBHOOK_SECRET": SECRET,
    }
    cmd = [sys.executable, "-m", "sandboxes.processor", "--port", str(port)]
    log = tmp_path / "sandbox.log"
    base = f"http://127.0.0.1:{port}"
    with (
        log.open("wb") as stderr,
        subprocess.Popen(
            [*cmd, "--log-level", "warning"], cwd=REPO_ROOT, env=env, stderr=stderr
        ) as process,
        admin_client(base, KEY) as http,
    ):
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    assert process.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, "sandbox did not start"
                    time.sleep(0.05)
            listed = http.get("/v1/webhook_endpoints").json()["data"]
            charge = http.post("/_sandbox/charges", json={"amount": 100}).json()
            http.post("/v1/refunds", data={"charge": charge["id"]}).raise_for_status()
            http.post("/_sandbox/webhooks/flush", json={}).raise_for_status()
        finally:
            process.terminate()

    assert [(e["url"], e["enabled_events"]) for e in listed] == [(receiver.url, ["*"])]
    assert receiver.types() == ["refund.created", "charge.refunded"]


def test_main_wants_url_and_secret_together() -> None:
    env = {**os.environ, "SANDBOX_API_KEY": KEY}
    env.pop("SANDBOX_WEBHOOK_SECRET", None)
    env.pop("SANDBOX_WEBHOOK_URL", None)

    result = subprocess.run(
        [sys.executable, "-m", "sandboxes.processor", "--webhook-url", "http://x.test/h"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "go together" in result.stderr


def test_reset_forgets_events_deliveries_and_settings(
    sandbox: ProcessorSandbox, receiver: Receiver
) -> None:
    _set_webhook_faults(sandbox, drop_rate=1.0)
    sandbox.http.post("/_sandbox/webhooks/pause")
    _refund(sandbox, sandbox.create_charge(100)["id"])

    sandbox.http.post("/_sandbox/reset").raise_for_status()
    _refund(sandbox, sandbox.create_charge(100)["id"])
    _flush(sandbox)

    assert sandbox.http.get("/_sandbox/webhooks/faults").json()["drop_rate"] == 0
    assert [e["type"] for e in sandbox.http.get("/v1/events").json()["data"]] == [
        "charge.refunded",
        "refund.created",
    ]
    assert receiver.types() == ["refund.created", "charge.refunded"]


# --- lists: events, refunds, disputes ---------------------------------------------------------


def test_events_filter_by_type_and_page(sandbox: ProcessorSandbox) -> None:
    charge = sandbox.create_charge(1000)
    for _ in range(3):
        _refund(sandbox, charge["id"], amount="10")
    failing = sandbox.create_charge(100, refund_behavior="fail")
    _refund(sandbox, failing["id"])

    def types(**params: Any) -> list[str]:
        return [e["type"] for e in sandbox.http.get("/v1/events", params=params).json()["data"]]

    assert types(type="refund.created") == ["refund.created"] * 4
    assert types(type="refund.*") == ["refund.failed", *["refund.created"] * 4]
    assert types(**{"types[]": ["refund.failed", "charge.refunded"]}) == [
        "refund.failed",
        *["charge.refunded"] * 3,
    ]
    both = sandbox.http.get("/v1/events", params={"type": "x.y", "types[0]": "x.y"})
    assert both.status_code == 400
    first = sandbox.http.get("/v1/events", params={"limit": 3}).json()
    rest = sandbox.http.get(
        "/v1/events", params={"limit": 100, "starting_after": first["data"][-1]["id"]}
    ).json()
    assert (len(first["data"]), first["has_more"]) == (3, True)
    assert (len(rest["data"]), rest["has_more"]) == (5, False)
    assert sandbox.http.get("/v1/events/evt_missing").status_code == 404


def test_stripe_python_pages_through_events_with_a_created_filter(
    sandbox: ProcessorSandbox,
) -> None:
    client: Any = stripe.StripeClient(
        KEY,
        base_addresses={"api": sandbox.url},
        http_client=stripe.HTTPXClient(timeout=5, allow_sync_methods=True),
        max_network_retries=0,
    )
    charge = sandbox.create_charge(1000)
    _refund(sandbox, charge["id"], amount="10")
    later = sandbox.advance_clock(3600)["now"]
    for _ in range(3):
        _refund(sandbox, charge["id"], amount="10")

    recent = client.v1.events.list(params={"created": {"gte": later}, "limit": 2})
    seen = list(recent.auto_paging_iter())

    assert len(seen) == 6
    assert all(event.created >= later for event in seen)


def test_refunds_list_filters_by_created_and_pages(sandbox: ProcessorSandbox) -> None:
    charge = sandbox.create_charge(1000)
    old = [_refund(sandbox, charge["id"], amount="10").json()["id"] for _ in range(2)]
    later = sandbox.advance_clock(600)["now"]
    new = [_refund(sandbox, charge["id"], amount="10").json()["id"] for _ in range(3)]

    def ids(**params: Any) -> tuple[list[str], bool]:
        body = sandbox.http.get("/v1/refunds", params=params).json()
        return [r["id"] for r in body["data"]], body["has_more"]

    assert ids(**{"created[gte]": later}) == (new[::-1], False)
    assert ids(**{"created[gt]": later - 1, "limit": 2}) == (new[:0:-1], True)
    assert ids(**{"created[gt]": later + 3600}) == ([], False)
    assert ids(**{"created[lt]": later}) == (old[::-1], False)
    assert ids(limit=2, starting_after=new[1]) == ([new[0], old[1]], True)
    assert ids(limit=2, ending_before=old[1]) == ([new[1], new[0]], True)
    bad = sandbox.http.get("/v1/refunds", params={"created[gte]": "soon"})
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "parameter_invalid_integer")
    unknown = sandbox.http.get("/v1/refunds", params={"created[after]": "1"})
    assert unknown.status_code == 400


def test_disputes_list_filters_and_pages(sandbox: ProcessorSandbox) -> None:
    charges = [sandbox.create_charge(100) for _ in range(3)]
    first = sandbox.http.post(f"/_sandbox/charges/{charges[0]['id']}/dispute", json={}).json()
    later = sandbox.advance_clock(600)["now"]
    rest = [
        sandbox.http.post(f"/_sandbox/charges/{c['id']}/dispute", json={}).json()
        for c in charges[1:]
    ]

    def ids(**params: Any) -> tuple[list[str], bool]:
        body = sandbox.http.get("/v1/disputes", params=params).json()
        assert body["url"] == "/v1/disputes"
        return [d["id"] for d in body["data"]], body["has_more"]

    assert ids() == ([rest[1]["id"], rest[0]["id"], first["id"]], False)
    assert ids(**{"created[gte]": later}) == ([rest[1]["id"], rest[0]["id"]], False)
    assert ids(limit=1) == ([rest[1]["id"]], True)
    assert ids(limit=1, starting_after=rest[0]["id"]) == ([first["id"]], False)
    assert ids(charge=charges[1]["id"]) == ([rest[0]["id"]], False)
    assert sandbox.http.get("/v1/disputes/dp_missing").status_code == 404
