"""ProcessorClient against the processor sandbox over real HTTP: money moves exactly once."""

from __future__ import annotations

import socket
import uuid

import pytest
from pydantic import SecretStr

from refundsaga.processor import (
    AmountTooLarge,
    ChargeAlreadyRefunded,
    ChargeNotFound,
    IdempotencyConflict,
    ProcessorAuthError,
    ProcessorClient,
    ProcessorError,
    ProcessorRejected,
    ProcessorUnavailable,
)
from tests.fixtures.sandboxes import ProcessorSandbox


def _key() -> str:
    return f"test-{uuid.uuid4()}"


async def test_full_refund_defaults_to_the_unrefunded_rest(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_sandbox.create_charge(995)

    refund = await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=None, idempotency_key=_key(), metadata={"saga": "s1"}
    )

    assert refund.amount_cents == 995
    assert refund.currency == "usd"
    assert refund.charge_id == charge["id"]
    assert refund.status == "succeeded"
    assert refund.metadata == {"saga": "s1"}
    at_processor = processor_sandbox.get_charge(charge["id"])
    assert at_processor["amount_refunded"] == 995
    assert at_processor["refunded"] is True


async def test_partial_refunds_add_up_and_the_default_takes_the_rest(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_sandbox.create_charge(1000, currency="eur")

    first = await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=300, idempotency_key=_key()
    )
    second = await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=200, idempotency_key=_key()
    )
    seen = await processor_client.get_charge(charge["id"])
    rest = await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=None, idempotency_key=_key()
    )

    assert (first.amount_cents, second.amount_cents, rest.amount_cents) == (300, 200, 500)
    assert seen.amount_refunded_cents == 500
    assert seen.refundable_cents == 500
    assert seen.refunded is False
    assert seen.currency == "eur"
    after = await processor_client.get_charge(charge["id"])
    assert (after.amount_refunded_cents, after.refunded) == (1000, True)


async def test_same_idempotency_key_twice_refunds_once(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_sandbox.create_charge(2000)
    key = _key()

    first = await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=700, idempotency_key=key
    )
    again = await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=700, idempotency_key=key
    )

    assert again == first
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 700
    assert len(await processor_client.list_refunds(charge["id"])) == 1


async def test_reusing_a_key_with_other_parameters_is_a_conflict(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_sandbox.create_charge(2000)
    key = _key()
    await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=700, idempotency_key=key
    )

    with pytest.raises(IdempotencyConflict) as caught:
        await processor_client.create_refund(
            charge_id=charge["id"], amount_cents=800, idempotency_key=key
        )

    assert caught.value.http_status == 400
    assert caught.value.retryable is False
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 700


async def test_fully_refunded_charge_raises_charge_already_refunded(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_sandbox.create_charge(500)
    await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=None, idempotency_key=_key()
    )

    with pytest.raises(ChargeAlreadyRefunded) as caught:
        await processor_client.create_refund(
            charge_id=charge["id"], amount_cents=None, idempotency_key=_key()
        )

    assert caught.value.code == "charge_already_refunded"
    assert caught.value.http_status == 400
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 500


async def test_amount_above_the_rest_raises_amount_too_large(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_sandbox.create_charge(500)
    await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=200, idempotency_key=_key()
    )

    with pytest.raises(AmountTooLarge) as caught:
        await processor_client.create_refund(
            charge_id=charge["id"], amount_cents=301, idempotency_key=_key()
        )

    assert caught.value.code == "amount_too_large"
    assert caught.value.param == "amount"
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 200


async def test_non_positive_amount_is_rejected(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_sandbox.create_charge(500)

    with pytest.raises(ProcessorRejected) as caught:
        await processor_client.create_refund(
            charge_id=charge["id"], amount_cents=0, idempotency_key=_key()
        )

    assert caught.value.code == "parameter_invalid_integer"
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 0


async def test_unknown_charge_raises_charge_not_found(processor_client: ProcessorClient) -> None:
    with pytest.raises(ChargeNotFound) as on_refund:
        await processor_client.create_refund(
            charge_id="ch_doesnotexist", amount_cents=100, idempotency_key=_key()
        )
    with pytest.raises(ChargeNotFound) as on_get:
        await processor_client.get_charge("ch_doesnotexist")

    assert on_refund.value.code == on_get.value.code == "resource_missing"
    assert on_refund.value.http_status == 404


async def test_unknown_refund_is_rejected_not_reported_as_missing_charge(
    processor_client: ProcessorClient,
) -> None:
    with pytest.raises(ProcessorRejected) as caught:
        await processor_client.get_refund("re_doesnotexist")

    assert caught.value.code == "resource_missing"


async def test_wrong_api_key_raises_auth_error_without_leaking_the_key(
    processor_sandbox: ProcessorSandbox,
) -> None:
    secret = "sk_test_wrong_and_secret"
    charge = processor_sandbox.create_charge(500)
    async with ProcessorClient(processor_sandbox.url, SecretStr(secret), timeout_s=2) as client:
        with pytest.raises(ProcessorAuthError) as caught:
            await client.create_refund(
                charge_id=charge["id"], amount_cents=100, idempotency_key=_key()
            )
        assert secret not in repr(client)

    assert caught.value.http_status == 401
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 0


async def test_pending_refund_settles_after_polls(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_sandbox.create_charge(800, refund_behavior="pending", settle_after_polls=2)

    created = await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=800, idempotency_key=_key()
    )
    assert created.status == "pending"
    # A pending refund already holds the money back.
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 800

    first_poll = await processor_client.get_refund(created.id)
    second_poll = await processor_client.get_refund(created.id)

    assert first_poll.status == "pending"
    assert second_poll.status == "succeeded"
    assert processor_sandbox.get_charge(charge["id"])["refunded"] is True


async def test_pending_fail_refund_fails_and_gives_the_amount_back(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_sandbox.create_charge(
        800, refund_behavior="pending_fail", settle_after_polls=1
    )
    created = await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=500, idempotency_key=_key()
    )
    assert processor_sandbox.get_charge(charge["id"])["amount_refunded"] == 500

    settled = await processor_client.get_refund(created.id)

    assert settled.status == "failed"
    assert settled.failure_reason == "lost_or_stolen_card"
    at_processor = await processor_client.get_charge(charge["id"])
    assert (at_processor.amount_refunded_cents, at_processor.refunded) == (0, False)
    # With the money back, the full amount can be refunded again.
    retry = await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=800, idempotency_key=_key()
    )
    assert retry.status == "pending"


async def test_explicit_settle_is_visible_to_the_client(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_sandbox.create_charge(800, refund_behavior="pending", settle_after_polls=100)
    created = await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=None, idempotency_key=_key()
    )

    processor_sandbox.settle(created.id, "failed")

    assert (await processor_client.get_refund(created.id)).status == "failed"
    assert (await processor_client.get_charge(charge["id"])).amount_refunded_cents == 0


async def test_list_refunds_follows_pagination_newest_first(
    processor_faults: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_faults.create_charge(1000)
    created = [
        await processor_client.create_refund(
            charge_id=charge["id"], amount_cents=100, idempotency_key=_key()
        )
        for _ in range(4)
    ]
    outside = processor_faults.refund_outside(charge["id"], amount=50)
    processor_faults.clear_requests()

    listed = await processor_client.list_refunds(charge["id"], page_size=2)

    assert [r.id for r in listed] == [outside["id"], *reversed([r.id for r in created])]
    assert listed[0].metadata == {"source": "dashboard"}
    pages = [r for r in processor_faults.requests() if r["path"] == "/v1/refunds"]
    assert len(pages) == 3


async def test_refund_outside_shows_at_the_processor(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_sandbox.create_charge(1500)

    processor_sandbox.refund_outside(charge["id"])

    seen = await processor_client.get_charge(charge["id"])
    assert (seen.amount_refunded_cents, seen.refunded) == (1500, True)
    with pytest.raises(ChargeAlreadyRefunded):
        await processor_client.create_refund(
            charge_id=charge["id"], amount_cents=None, idempotency_key=_key()
        )


async def test_refund_by_payment_intent(
    processor_sandbox: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    payment_intent = f"pi_{uuid.uuid4().hex[:24]}"
    charge = processor_sandbox.create_charge(1200, payment_intent=payment_intent)

    refund = await processor_client.create_refund(
        charge_id=payment_intent, amount_cents=400, idempotency_key=_key()
    )

    assert refund.charge_id == charge["id"]
    by_intent = await processor_client.get_charge(payment_intent)
    assert (by_intent.id, by_intent.amount_refunded_cents) == (charge["id"], 400)
    assert [r.id for r in await processor_client.list_refunds(payment_intent)] == [refund.id]
    with pytest.raises(ChargeNotFound):
        await processor_client.get_charge("pi_unknown")


@pytest.mark.parametrize("fault", ["error", "drop"])
async def test_faulted_refund_is_unavailable_and_moves_no_money(
    processor_faults: ProcessorSandbox, processor_client: ProcessorClient, fault: str
) -> None:
    charge = processor_faults.create_charge(900)
    processor_faults.set_faults(**{f"{fault}_rate": 1.0}, paths=["/v1/refunds"])

    with pytest.raises(ProcessorUnavailable) as caught:
        await processor_client.create_refund(
            charge_id=charge["id"], amount_cents=900, idempotency_key=_key()
        )

    assert caught.value.retryable is True
    if fault == "error":
        assert caught.value.http_status in (500, 503)
    else:
        assert caught.value.http_status is None
    assert processor_faults.get_charge(charge["id"])["amount_refunded"] == 0
    refund_calls = [r for r in processor_faults.requests() if r["path"] == "/v1/refunds"]
    assert [r["fault"] for r in refund_calls] == [fault]


async def test_hanging_processor_times_out_as_unavailable(
    processor_faults: ProcessorSandbox,
) -> None:
    charge = processor_faults.create_charge(900)
    processor_faults.set_faults(timeout_rate=1.0, hang_ms=2000, paths=["/v1/refunds"])

    async with ProcessorClient(
        processor_faults.url, SecretStr(processor_faults.api_key), timeout_s=0.5
    ) as client:
        with pytest.raises(ProcessorUnavailable, match="timed out"):
            await client.create_refund(
                charge_id=charge["id"], amount_cents=900, idempotency_key=_key()
            )

    assert processor_faults.get_charge(charge["id"])["amount_refunded"] == 0


async def test_lost_response_then_retry_with_same_key_replays_the_refund(
    processor_faults: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_faults.create_charge(900)
    key = _key()
    processor_faults.set_faults(lost_response_rate=1.0, paths=["/v1/refunds"])

    with pytest.raises(ProcessorUnavailable):
        await processor_client.create_refund(
            charge_id=charge["id"], amount_cents=600, idempotency_key=key
        )
    # The processor did refund: only the answer was lost.
    assert processor_faults.get_charge(charge["id"])["amount_refunded"] == 600

    processor_faults.clear_faults()
    retried = await processor_client.create_refund(
        charge_id=charge["id"], amount_cents=600, idempotency_key=key
    )

    assert retried.amount_cents == 600
    assert processor_faults.get_charge(charge["id"])["amount_refunded"] == 600
    assert [r.id for r in await processor_client.list_refunds(charge["id"])] == [retried.id]


async def test_retrying_through_flaky_processor_refunds_exactly_once(
    processor_faults: ProcessorSandbox, processor_client: ProcessorClient
) -> None:
    charge = processor_faults.create_charge(900)
    key = _key()
    processor_faults.set_faults(
        error_rate=0.3, drop_rate=0.2, lost_response_rate=0.3, seed=11, paths=["/v1/refunds"]
    )

    refund = None
    for _ in range(50):
        try:
            refund = await processor_client.create_refund(
                charge_id=charge["id"], amount_cents=250, idempotency_key=key
            )
            break
        except ProcessorError as exc:
            assert exc.retryable

    assert refund is not None
    assert processor_faults.get_charge(charge["id"])["amount_refunded"] == 250
    faults = {r["fault"] for r in processor_faults.requests()}
    assert len(faults - {None}) >= 2, "the seed should exercise several fault kinds"


async def test_unreachable_processor_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now, so the connection is refused.
    async with ProcessorClient(f"http://127.0.0.1:{port}", SecretStr("sk"), timeout_s=1) as client:
        with pytest.raises(ProcessorUnavailable):
            await client.get_charge("ch_any")
