"""The official `stripe` package against the processor sandbox over real HTTP.

If stripe-python can drive the sandbox (shapes, error classes, retry decisions), then the
sandbox is Stripe-like where our exactly-once guarantee depends on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import stripe

from sandboxes.processor import DEFAULT_API_VERSION
from tests.fixtures.sandboxes import ProcessorSandbox

# stripe-python's HTTPXClient posts its encoded form through httpx's deprecated `data=`.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def _client(sandbox: ProcessorSandbox, *, api_key: str | None = None, retries: int = 0) -> Any:
    return stripe.StripeClient(
        api_key or sandbox.api_key,
        base_addresses={"api": sandbox.url},
        http_client=stripe.HTTPXClient(timeout=5, allow_sync_methods=True),
        max_network_retries=retries,
    )


@pytest.fixture
def client(processor_sandbox: ProcessorSandbox) -> Iterator[stripe.StripeClient]:
    """A stripe-python client pointed at the sandbox, with retries off."""
    client = _client(processor_sandbox)
    yield client


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """stripe-python's retries without their half-second sleeps."""
    monkeypatch.setattr(stripe.HTTPXClient, "_sleep_time_seconds", lambda *_: 0.0)


def _refund_posts(sandbox: ProcessorSandbox) -> int:
    return sum(1 for r in sandbox.requests() if (r["method"], r["path"]) == ("POST", "/v1/refunds"))


def test_create_retrieve_and_list_refunds(
    processor_sandbox: ProcessorSandbox, client: stripe.StripeClient
) -> None:
    charge = processor_sandbox.create_charge(1000, payment_intent="pi_contract")
    key = str(uuid.uuid4())

    created = client.v1.refunds.create(
        params={"charge": charge["id"], "amount": 300, "metadata": {"saga": "s-42"}},
        options={"idempotency_key": key},
    )
    replayed = client.v1.refunds.create(
        params={"charge": charge["id"], "amount": 300, "metadata": {"saga": "s-42"}},
        options={"idempotency_key": key},
    )
    for _ in range(4):
        client.v1.refunds.create(params={"charge": charge["id"], "amount": 100})
    fetched = client.v1.refunds.retrieve(created.id)
    page = client.v1.refunds.list(params={"charge": charge["id"], "limit": 2})
    every = list(page.auto_paging_iter())
    held = client.v1.charges.retrieve(charge["id"])

    assert isinstance(created, stripe.Refund)
    assert (created.amount, created.currency, created.status) == (300, "usd", "succeeded")
    assert created.charge == charge["id"] and created.payment_intent == "pi_contract"
    assert created.metadata is not None and created.metadata["saga"] == "s-42"
    assert replayed.id == created.id
    assert replayed.last_response is not None
    assert replayed.last_response.headers["Idempotent-Replayed"] == "true"
    assert fetched.id == created.id and fetched.last_response is not None
    assert fetched.last_response.request_id is not None
    assert fetched.last_response.request_id.startswith("req_")
    assert len(page.data) == 2 and page.has_more
    assert [r.id for r in every][-1] == created.id and len(every) == 5
    assert isinstance(held, stripe.Charge)
    assert (held.amount, held.amount_refunded, held.refunded) == (1000, 700, False)


def test_expand_gives_charge_objects(
    processor_sandbox: ProcessorSandbox, client: stripe.StripeClient
) -> None:
    charge = processor_sandbox.create_charge(500)

    created = client.v1.refunds.create(
        params={"charge": charge["id"], "amount": 50, "expand": ["charge"]}
    )
    fetched = client.v1.refunds.retrieve(created.id, params={"expand": ["charge"]})
    listed = client.v1.refunds.list(params={"charge": charge["id"], "expand": ["data.charge"]})
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.refunds.retrieve(created.id, params={"expand": ["balance_transaction"]})

    for refund in (created, fetched, listed.data[0]):
        assert isinstance(refund.charge, stripe.Charge)
        assert refund.charge.id == charge["id"]
    assert fetched.charge.amount_refunded == 50  # type: ignore[union-attr]
    assert refused.value.http_status == 400
    assert "cannot be expanded (balance_transaction)" in str(refused.value.user_message)


def test_business_errors_raise_invalid_request_with_stripes_codes(
    processor_sandbox: ProcessorSandbox, client: stripe.StripeClient
) -> None:
    charge = processor_sandbox.create_charge(500)

    with pytest.raises(stripe.InvalidRequestError) as too_large:
        client.v1.refunds.create(params={"charge": charge["id"], "amount": 501})
    client.v1.refunds.create(params={"charge": charge["id"]})
    with pytest.raises(stripe.InvalidRequestError) as already:
        client.v1.refunds.create(params={"charge": charge["id"]})
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.charges.retrieve("ch_missing")

    assert (too_large.value.code, too_large.value.param) == ("amount_too_large", "amount")
    assert already.value.code == "charge_already_refunded"
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")


def test_reused_key_with_other_params_raises_idempotency_error(
    processor_sandbox: ProcessorSandbox, client: stripe.StripeClient
) -> None:
    charge = processor_sandbox.create_charge(500)
    key = str(uuid.uuid4())
    client.v1.refunds.create(
        params={"charge": charge["id"], "amount": 100}, options={"idempotency_key": key}
    )

    with pytest.raises(stripe.IdempotencyError):
        client.v1.refunds.create(
            params={"charge": charge["id"], "amount": 200}, options={"idempotency_key": key}
        )
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 100


def test_bad_key_raises_authentication_error(processor_sandbox: ProcessorSandbox) -> None:
    charge = processor_sandbox.create_charge(500)

    with pytest.raises(stripe.AuthenticationError) as refused:
        _client(processor_sandbox, api_key="sk_test_wrong").v1.charges.retrieve(charge["id"])

    assert refused.value.http_status == 401


@pytest.mark.parametrize("kind", ["rate_limit", "lock_timeout"])
def test_429_raises_rate_limit_error(
    processor_faults: ProcessorSandbox, client: stripe.StripeClient, kind: str
) -> None:
    charge = processor_faults.create_charge(500)
    processor_faults.set_faults(**{f"{kind}_rate": 1.0}, retry_after_s=3, paths=["/v1/refunds"])

    with pytest.raises(stripe.RateLimitError) as limited:
        client.v1.refunds.create(params={"charge": charge["id"]})

    assert limited.value.http_status == 429
    # stripe-python leaves `code` unset on RateLimitError; the body still carries it.
    body: Any = limited.value.json_body
    assert body["error"]["code"] == kind
    assert limited.value.headers is not None and limited.value.headers["Retry-After"] == "3"
    assert processor_faults.get_charge(charge["id"])["amount_refunded"] == 0


def test_limiter_429_raises_rate_limit_error(
    processor_faults: ProcessorSandbox, client: stripe.StripeClient
) -> None:
    charge = processor_faults.create_charge(500)
    processor_faults.set_faults(rate_limit_per_s=2)

    with pytest.raises(stripe.RateLimitError):
        for _ in range(10):
            client.v1.charges.retrieve(charge["id"])


def test_plain_500_raises_api_error_and_is_retried(
    processor_faults: ProcessorSandbox, no_backoff: None
) -> None:
    charge = processor_faults.create_charge(500)
    processor_faults.set_faults(error_rate=1.0, paths=["/v1/refunds"])

    with pytest.raises(stripe.APIError) as failed:
        _client(processor_faults, retries=2).v1.refunds.create(params={"charge": charge["id"]})

    assert failed.value.http_status in (500, 503)
    assert failed.value.headers is not None
    assert failed.value.headers["Stripe-Should-Retry"] == "true"
    assert _refund_posts(processor_faults) == 3  # the first try and two retries


@pytest.mark.parametrize(("kind", "refunded"), [("saved_error", 0), ("executed_saved_error", 200)])
def test_saved_500_is_not_retried_by_stripe_python(
    processor_faults: ProcessorSandbox, no_backoff: None, kind: str, refunded: int
) -> None:
    charge = processor_faults.create_charge(500)
    key = str(uuid.uuid4())
    processor_faults.set_faults(**{f"{kind}_rate": 1.0}, paths=["/v1/refunds"])
    client = _client(processor_faults, retries=2)

    with pytest.raises(stripe.APIError) as failed:
        client.v1.refunds.create(
            params={"charge": charge["id"], "amount": 200}, options={"idempotency_key": key}
        )
    processor_faults.clear_faults()
    with pytest.raises(stripe.APIError) as replayed:
        client.v1.refunds.create(
            params={"charge": charge["id"], "amount": 200}, options={"idempotency_key": key}
        )

    assert failed.value.http_status == replayed.value.http_status == 500
    assert failed.value.headers is not None and replayed.value.headers is not None
    assert failed.value.headers["Stripe-Should-Retry"] == "false"
    assert replayed.value.headers["Idempotent-Replayed"] == "true"
    assert _refund_posts(processor_faults) == 2  # once each: Stripe-Should-Retry: false holds
    assert processor_faults.get_charge(charge["id"])["amount_refunded"] == refunded


def test_429_is_retried_because_stripe_says_so(
    processor_faults: ProcessorSandbox, no_backoff: None
) -> None:
    charge = processor_faults.create_charge(500)
    processor_faults.set_faults(rate_limit_rate=1.0, paths=["/v1/refunds"])

    with pytest.raises(stripe.RateLimitError):
        _client(processor_faults, retries=2).v1.refunds.create(params={"charge": charge["id"]})

    assert _refund_posts(processor_faults) == 3


def test_stripe_version_sent_by_the_sdk_is_echoed(
    processor_faults: ProcessorSandbox, client: stripe.StripeClient
) -> None:
    charge = processor_faults.create_charge(500)
    pinned = _client(processor_faults)
    pinned_version = "2024-06-20"

    current = client.v1.charges.retrieve(charge["id"])
    older = pinned.v1.charges.retrieve(charge["id"], options={"stripe_version": pinned_version})
    log = processor_faults.requests()

    assert current.last_response is not None and older.last_response is not None
    assert current.last_response.headers["Stripe-Version"] == stripe.api_version
    assert stripe.api_version != DEFAULT_API_VERSION
    assert older.last_response.headers["Stripe-Version"] == pinned_version
    assert [r["stripe_version"] for r in log] == [stripe.api_version, pinned_version]
    assert [r["request_id"] for r in log] == [
        current.last_response.request_id,
        older.last_response.request_id,
    ]


async def test_async_create_and_retrieve(
    processor_sandbox: ProcessorSandbox, client: stripe.StripeClient
) -> None:
    charge = processor_sandbox.create_charge(500, refund_behavior="pending", settle_after_polls=1)

    created = await client.v1.refunds.create_async(
        params={"charge": charge["id"], "amount": 120, "metadata": {"saga": "async"}},
        options={"idempotency_key": str(uuid.uuid4())},
    )
    settled = await client.v1.refunds.retrieve_async(created.id)
    with pytest.raises(stripe.InvalidRequestError) as too_large:
        await client.v1.refunds.create_async(params={"charge": charge["id"], "amount": 999})

    assert created.status == "pending"
    assert (settled.id, settled.status) == (created.id, "succeeded")
    assert too_large.value.code == "amount_too_large"
