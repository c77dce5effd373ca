"""ProcessorClient speaks Stripe's documented wire format (checked against a fake transport).

This is the one place a fake is used: it pins the exact request Stripe's API reference
documents and the error JSON it returns, so the client works unchanged against Stripe.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, parse_qsl

import httpx
import pytest
from pydantic import SecretStr

from refundsaga.processor import (
    STRIPE_API_VERSION,
    AmountTooLarge,
    ChargeAlreadyRefunded,
    ChargeNotFound,
    IdempotencyConflict,
    ProcessorAuthError,
    ProcessorClient,
    ProcessorError,
    ProcessorRejected,
    ProcessorRequestSpent,
    ProcessorUnavailable,
)

SECRET = "sk_test_51SecretValueThatMustNotLeak"

# Shaped as in https://docs.stripe.com/api/refunds/object (fields we do not use included).
STRIPE_REFUND = {
    "id": "re_1Nispe2eZvKYlo2Cd31jOCgZ",
    "object": "refund",
    "amount": 500,
    "balance_transaction": "txn_1Nispe2eZvKYlo2CYezqFhEx",
    "charge": "ch_1NirD82eZvKYlo2CIvbtLWuY",
    "created": 1692942318,
    "currency": "usd",
    "destination_details": {"card": {"reference_status": "pending", "type": "refund"}},
    "metadata": {"saga": "refund-42"},
    "payment_intent": "pi_3NirD82eZvKYlo2C1mJPPzsa",
    "reason": "requested_by_customer",
    "receipt_number": None,
    "source_transfer_reversal": None,
    "status": "succeeded",
    "transfer_reversal": None,
}

# Since API version 2022-11-15 a charge no longer embeds its refunds unless expanded.
STRIPE_CHARGE = {
    "id": "ch_1NirD82eZvKYlo2CIvbtLWuY",
    "object": "charge",
    "amount": 1099,
    "amount_captured": 1099,
    "amount_refunded": 500,
    "captured": True,
    "currency": "usd",
    "paid": True,
    "payment_intent": "pi_3NirD82eZvKYlo2C1mJPPzsa",
    "refunded": False,
    "status": "succeeded",
}


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> ProcessorClient:
    return ProcessorClient(
        "https://api.stripe.com",
        SecretStr(SECRET),
        timeout_s=5,
        transport=httpx.MockTransport(handler),
    )


async def test_create_refund_sends_stripes_documented_request() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=STRIPE_REFUND)

    async with _client(handler) as client:
        refund = await client.create_refund(
            charge_id="ch_1NirD82eZvKYlo2CIvbtLWuY",
            amount_cents=500,
            idempotency_key="refund-42-attempt",
            metadata={"saga": "refund-42"},
            reason="requested_by_customer",
        )

    [request] = seen
    assert request.method == "POST"
    assert str(request.url) == "https://api.stripe.com/v1/refunds"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert request.headers["idempotency-key"] == "refund-42-attempt"
    assert parse_qsl(request.content.decode()) == [
        ("charge", "ch_1NirD82eZvKYlo2CIvbtLWuY"),
        ("amount", "500"),
        ("reason", "requested_by_customer"),
        ("metadata[saga]", "refund-42"),
    ]
    assert refund.id == "re_1Nispe2eZvKYlo2Cd31jOCgZ"
    assert (refund.amount_cents, refund.currency, refund.status) == (500, "usd", "succeeded")
    assert refund.charge_id == "ch_1NirD82eZvKYlo2CIvbtLWuY"
    assert refund.failure_reason is None
    assert refund.metadata == {"saga": "refund-42"}


async def test_optional_fields_are_omitted_and_unknown_reasons_not_sent() -> None:
    bodies: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(parse_qs(request.content.decode()))
        return httpx.Response(200, json=STRIPE_REFUND)

    async with _client(handler) as client:
        await client.create_refund(
            charge_id="ch_1", amount_cents=None, idempotency_key="k", reason="course too hard"
        )
        await client.create_refund(
            charge_id="pi_3NirD82eZvKYlo2C1mJPPzsa", amount_cents=100, idempotency_key="k2"
        )

    assert bodies == [
        {"charge": ["ch_1"]},
        {"payment_intent": ["pi_3NirD82eZvKYlo2C1mJPPzsa"], "amount": ["100"]},
    ]


async def test_get_charge_and_refund_parse_stripe_objects() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path.startswith("/v1/charges/"):
            return httpx.Response(200, json=STRIPE_CHARGE)
        return httpx.Response(200, json={**STRIPE_REFUND, "status": "pending"})

    async with _client(handler) as client:
        charge = await client.get_charge("ch_1NirD82eZvKYlo2CIvbtLWuY")
        refund = await client.get_refund("re_1Nispe2eZvKYlo2Cd31jOCgZ")

    assert paths == [
        "/v1/charges/ch_1NirD82eZvKYlo2CIvbtLWuY",
        "/v1/refunds/re_1Nispe2eZvKYlo2Cd31jOCgZ",
    ]
    assert (charge.amount_cents, charge.amount_refunded_cents, charge.refunded) == (
        1099,
        500,
        False,
    )
    assert refund.status == "pending"


async def test_list_refunds_pages_with_starting_after() -> None:
    queries: list[dict[str, str]] = []
    pages = {
        None: ["re_3", "re_2"],
        "re_2": ["re_1"],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        query = dict(request.url.params)
        queries.append(query)
        ids = pages[query.get("starting_after")]
        return httpx.Response(
            200,
            json={
                "object": "list",
                "data": [{**STRIPE_REFUND, "id": rid} for rid in ids],
                "has_more": query.get("starting_after") is None,
                "url": "/v1/refunds",
            },
        )

    async with _client(handler) as client:
        refunds = await client.list_refunds("ch_1NirD82eZvKYlo2CIvbtLWuY")

    assert [r.id for r in refunds] == ["re_3", "re_2", "re_1"]
    assert queries == [
        {"charge": "ch_1NirD82eZvKYlo2CIvbtLWuY", "limit": "100"},
        {"charge": "ch_1NirD82eZvKYlo2CIvbtLWuY", "limit": "100", "starting_after": "re_2"},
    ]


def _stripe_error(**error: Any) -> dict[str, Any]:
    return {"error": {"request_log_url": "https://dashboard.stripe.com/logs/req_x", **error}}


@pytest.mark.parametrize(
    ("status", "body", "expected", "code"),
    [
        (
            400,
            _stripe_error(
                type="invalid_request_error",
                code="charge_already_refunded",
                param="charge",
                message="Charge ch_1 has already been refunded.",
                doc_url="https://stripe.com/docs/error-codes/charge-already-refunded",
            ),
            ChargeAlreadyRefunded,
            "charge_already_refunded",
        ),
        (
            400,
            _stripe_error(
                type="invalid_request_error",
                code="amount_too_large",
                param="amount",
                message="Refund amount ($20.00) is greater than unrefunded amount on charge.",
            ),
            AmountTooLarge,
            "amount_too_large",
        ),
        (
            404,
            _stripe_error(
                type="invalid_request_error",
                code="resource_missing",
                param="charge",
                message="No such charge: 'ch_nope'",
            ),
            ChargeNotFound,
            "resource_missing",
        ),
        (
            401,
            _stripe_error(type="invalid_request_error", message="Invalid API Key provided."),
            ProcessorAuthError,
            None,
        ),
        (
            400,
            _stripe_error(
                type="idempotency_error",
                message="Keys for idempotent requests can only be used with the same parameters"
                " they were first used with.",
            ),
            IdempotencyConflict,
            None,
        ),
        (
            409,
            _stripe_error(
                type="invalid_request_error",
                code="idempotency_key_in_use",
                message="There is currently another in-progress request using this key.",
            ),
            ProcessorUnavailable,
            "idempotency_key_in_use",
        ),
        (
            429,
            _stripe_error(
                type="invalid_request_error", code="rate_limit", message="Too many requests."
            ),
            ProcessorUnavailable,
            "rate_limit",
        ),
        (
            500,
            _stripe_error(type="api_error", message="Something went wrong."),
            ProcessorUnavailable,
            None,
        ),
        (
            402,
            _stripe_error(type="card_error", code="expired_card", message="Card expired."),
            ProcessorRejected,
            "expired_card",
        ),
        (
            400,
            _stripe_error(
                type="invalid_request_error",
                code="parameter_invalid_integer",
                param="amount",
                message="Invalid integer: abc",
            ),
            ProcessorRejected,
            "parameter_invalid_integer",
        ),
    ],
)
async def test_stripe_error_shapes_map_to_the_error_taxonomy(
    status: int, body: dict[str, Any], expected: type[ProcessorError], code: str | None
) -> None:
    async with _client(lambda request: httpx.Response(status, json=body)) as client:
        with pytest.raises(ProcessorError) as caught:
            await client.create_refund(charge_id="ch_1", amount_cents=100, idempotency_key="k")

    assert type(caught.value) is expected
    assert caught.value.code == code
    assert caught.value.http_status == status
    assert caught.value.message == body["error"]["message"]
    assert caught.value.retryable is (expected is ProcessorUnavailable)


async def test_gateway_errors_without_json_are_unavailable() -> None:
    html = httpx.Response(502, text="<html>Bad Gateway</html>")
    async with _client(lambda request: html) as client:
        with pytest.raises(ProcessorUnavailable) as caught:
            await client.get_charge("ch_1")
    assert caught.value.http_status == 502


@pytest.mark.parametrize(
    "exc", [httpx.ReadTimeout("read timed out"), httpx.ConnectError("refused")]
)
async def test_transport_failures_are_unavailable(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    async with _client(handler) as client:
        with pytest.raises(ProcessorUnavailable) as caught:
            await client.create_refund(charge_id="ch_1", amount_cents=1, idempotency_key="k")
    assert caught.value.http_status is None


async def test_unexpected_success_shape_is_a_non_retryable_error() -> None:
    async with _client(lambda request: httpx.Response(200, json={"id": "re_1"})) as client:
        with pytest.raises(ProcessorError) as caught:
            await client.get_refund("re_1")
    assert caught.value.retryable is False


async def test_secret_never_appears_in_errors_or_reprs() -> None:
    body = _stripe_error(type="invalid_request_error", message="Invalid API Key provided.")
    async with _client(lambda request: httpx.Response(401, json=body)) as client:
        with pytest.raises(ProcessorAuthError) as caught:
            await client.get_charge("ch_1")
        assert SECRET not in repr(client)

    for text in (str(caught.value), repr(caught.value), repr(caught.value.__cause__)):
        assert SECRET not in text


def test_errors_survive_pickling() -> None:
    error = AmountTooLarge("too much", code="amount_too_large", http_status=400, param="amount")

    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is AmountTooLarge
    assert (copy.message, copy.code, copy.http_status, copy.param) == (
        "too much",
        "amount_too_large",
        400,
        "amount",
    )
    assert str(copy) == str(error)


async def test_every_request_pins_the_stripe_api_version() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=STRIPE_CHARGE)

    async with _client(handler) as client:
        await client.get_charge("ch_1NirD82eZvKYlo2CIvbtLWuY")
    async with ProcessorClient(
        "https://api.stripe.com",
        SecretStr(SECRET),
        transport=httpx.MockTransport(handler),
        api_version="2024-06-20",
    ) as pinned:
        await pinned.get_charge("ch_1NirD82eZvKYlo2CIvbtLWuY")
    assert [r.headers["stripe-version"] for r in seen] == [STRIPE_API_VERSION, "2024-06-20"]


STRIPE_API_ERROR = {"error": {"type": "api_error", "message": "Something went wrong."}}


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        # Stripe saved a 500 under the key and says the same request will get it again.
        (500, {"Stripe-Should-Retry": "false"}, ProcessorRequestSpent),
        (
            500,
            {"Stripe-Should-Retry": "false", "Idempotent-Replayed": "true"},
            ProcessorRequestSpent,
        ),
        (500, {}, ProcessorUnavailable),
        (500, {"Stripe-Should-Retry": "true"}, ProcessorUnavailable),
        # Should-Retry true turns a 4xx into a retry, false keeps a 409 from being retried.
        (400, {"Stripe-Should-Retry": "true"}, ProcessorUnavailable),
        (409, {"Stripe-Should-Retry": "false"}, ProcessorRejected),
        (409, {}, ProcessorUnavailable),
    ],
)
async def test_stripe_should_retry_is_honoured_both_ways(
    status: int, headers: dict[str, str], expected: type[ProcessorError]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=STRIPE_API_ERROR, headers=headers)

    async with _client(handler) as client:
        with pytest.raises(ProcessorError) as caught:
            await client.create_refund(
                charge_id="ch_1", amount_cents=100, idempotency_key="refund-42/abc/refund"
            )
    assert type(caught.value) is expected
    assert caught.value.retryable == (expected is ProcessorUnavailable)


@pytest.mark.parametrize("code", ["rate_limit", "lock_timeout"])
async def test_a_429_is_retryable_after_the_processors_retry_after(code: str) -> None:
    body = {"error": {"type": "invalid_request_error", "code": code, "message": "Too many"}}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json=body, headers={"Retry-After": "7"})

    async with _client(handler) as client:
        with pytest.raises(ProcessorUnavailable) as caught:
            await client.get_charge("ch_1")
    assert caught.value.retry_after_s == 7.0
    assert caught.value.code == code
