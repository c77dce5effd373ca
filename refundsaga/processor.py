"""Async client for a Stripe-compatible refunds API: the processor sandbox or Stripe itself.

Requests are form-encoded the way Stripe expects (`metadata[key]=value`), answers are
parsed from Stripe's JSON shapes, and failures become a small error taxonomy
(`refundsaga.processor_errors`) in which only `ProcessorUnavailable` is worth retrying (with the
same idempotency key).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Literal, ParamSpec, TypeVar

import httpx
from pydantic import Field, SecretStr, ValidationError

from refundsaga.api_client import JsonApiClient, json_object, segment
from refundsaga.models import Record
from refundsaga.processor_errors import (
    AmountTooLarge,
    ChargeAlreadyRefunded,
    ChargeNotFound,
    IdempotencyConflict,
    ProcessorAuthError,
    ProcessorError,
    ProcessorRejected,
    ProcessorRequestSpent,
    ProcessorUnavailable,
    error_from,
)

# The errors live in processor_errors; they stay importable from here, beside the client.
__all__ = [
    "LIST_PAGE_SIZE",
    "STRIPE_API_VERSION",
    "STRIPE_REFUND_REASONS",
    "AmountTooLarge",
    "ChargeAlreadyRefunded",
    "ChargeNotFound",
    "IdempotencyConflict",
    "ProcessorAuthError",
    "ProcessorCharge",
    "ProcessorClient",
    "ProcessorDispute",
    "ProcessorError",
    "ProcessorPage",
    "ProcessorRefund",
    "ProcessorRejected",
    "ProcessorRequestSpent",
    "ProcessorUnavailable",
    "RefundStatus",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
_P = ParamSpec("_P")
_Item = TypeVar("_Item")

RefundStatus = Literal["succeeded", "pending", "failed", "canceled", "requires_action"]
STRIPE_REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
"""The only values Stripe accepts for a refund's `reason`; anything else is not sent."""

LIST_PAGE_SIZE = 100
STRIPE_API_VERSION = "2026-10-28.endive"
"""The Stripe API version every request is pinned to (`Stripe-Version`), so response shapes do
not follow the account's default; the version of the `stripe` package the contract tests run."""
_PAYMENT_INTENT_PREFIX = "pi_"


class ProcessorRefund(Record):
    """A refund as the processor reports it."""

    id: str
    amount_cents: int
    currency: str
    charge_id: str
    status: RefundStatus
    failure_reason: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    # Unix seconds; 0 when the answer did not say (older sandboxes' shapes).
    created: int = 0
    # The PaymentIntent the charge belongs to, when the answer names one.
    payment_intent_id: str | None = None


class ProcessorDispute(Record):
    """A dispute (chargeback) as the processor reports it; `lost` means the money went back."""

    id: str
    amount_cents: int
    currency: str
    charge_id: str
    status: str
    reason: str | None = None
    created: int = 0
    payment_intent_id: str | None = None


class ProcessorPage(Record, Generic[_Item]):
    """One page of a list, newest first, and whether older items follow (`starting_after`)."""

    items: list[_Item]
    has_more: bool


class ProcessorCharge(Record):
    """A charge as the processor reports it: what was paid and what went back."""

    id: str
    amount_cents: int
    currency: str
    amount_refunded_cents: int
    refunded: bool

    @property
    def refundable_cents(self) -> int:
        """What the processor would still let us refund."""
        return max(self.amount_cents - self.amount_refunded_cents, 0)


class ProcessorClient(JsonApiClient):
    """Client for Stripe's refunds API, or anything that speaks it (the processor sandbox).

    Owns one `httpx.AsyncClient`; close it with `aclose()` or use `async with`.

    Args:
        base_url: E.g. `https://api.stripe.com` or `http://127.0.0.1:8301`.
        api_key: Secret key sent as a Bearer token; never logged nor put in errors.
        timeout_s: Connect, read, write and pool timeout for each request.
        transport: Optional httpx transport (tests).
    """

    unavailable = ProcessorUnavailable
    logger = logger

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        api_version: str = STRIPE_API_VERSION,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s=timeout_s, transport=transport)
        self._http.headers["Stripe-Version"] = api_version

    async def get_charge(self, charge_id: str) -> ProcessorCharge:
        """Fetch a charge; a `pi_...` id fetches the PaymentIntent's latest charge.

        Raises:
            ChargeNotFound: The processor has no such charge.
            ProcessorError: Any other failure (see the subclasses).
        """
        if charge_id.startswith(_PAYMENT_INTENT_PREFIX):
            page = await self._request(
                "GET", "/v1/charges", params={"payment_intent": charge_id, "limit": "1"}
            )
            data = page.get("data")
            if not isinstance(data, list) or not data:
                raise ChargeNotFound(
                    f"No charge for PaymentIntent '{charge_id}'",
                    code="resource_missing",
                    http_status=404,
                )
            body = data[0]
        else:
            body = await self._request("GET", f"/v1/charges/{segment(charge_id)}")
        return _parse(_charge, body)

    async def create_refund(
        self,
        *,
        charge_id: str,
        amount_cents: int | None,
        idempotency_key: str,
        metadata: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> ProcessorRefund:
        """Refund (part of) a charge, safely retryable under the same `idempotency_key`.

        Args:
            charge_id: `ch_...`, or a `pi_...` PaymentIntent id (sent as `payment_intent`).
            amount_cents: Amount in minor units; None refunds whatever is left.
            idempotency_key: Sent as `Idempotency-Key`; reuse it for retries of this refund.
            metadata: Sent as `metadata[key]=value`.
            reason: Sent only if it is one of Stripe's reasons (`duplicate`,
                `fraudulent`, `requested_by_customer`).

        Raises:
            ChargeAlreadyRefunded: Nothing is left to refund.
            AmountTooLarge: `amount_cents` exceeds what is left.
            ChargeNotFound: Unknown charge.
            IdempotencyConflict: The key was used before with other parameters.
            ProcessorUnavailable: Transient failure; retry with the same key.
            ProcessorError: Any other failure.
        """
        if not idempotency_key:
            raise ValueError("create_refund needs an idempotency key")
        target = "payment_intent" if charge_id.startswith(_PAYMENT_INTENT_PREFIX) else "charge"
        form: dict[str, str] = {target: charge_id}
        if amount_cents is not None:
            form["amount"] = str(amount_cents)
        if reason in STRIPE_REFUND_REASONS:
            form["reason"] = reason
        for key, value in (metadata or {}).items():
            form[f"metadata[{key}]"] = value
        body = await self._request(
            "POST", "/v1/refunds", data=form, idempotency_key=idempotency_key
        )
        fallback = charge_id if target == "charge" else None
        return _parse(_refund, body, fallback_charge_id=fallback)

    async def get_refund(self, refund_id: str) -> ProcessorRefund:
        """Fetch a refund, e.g. to follow a pending one until it settles.

        Raises:
            ProcessorRejected: No such refund (`code == "resource_missing"`).
            ProcessorError: Any other failure.
        """
        body = await self._request(
            "GET", f"/v1/refunds/{segment(refund_id)}", not_found=ProcessorRejected
        )
        return _parse(_refund, body, fallback_charge_id=None)

    async def list_refunds(
        self, charge_id: str, *, page_size: int = LIST_PAGE_SIZE
    ) -> list[ProcessorRefund]:
        """Every refund of a charge (or of a `pi_...` PaymentIntent), newest first.

        Follows `has_more` with `starting_after`, so refunds made outside this client
        (e.g. in the processor's dashboard) are included.

        Args:
            charge_id: `ch_...` or `pi_...`.
            page_size: Stripe's `limit`, 1 to 100.
        """
        target = "payment_intent" if charge_id.startswith(_PAYMENT_INTENT_PREFIX) else "charge"
        fallback = charge_id if target == "charge" else None
        refunds: list[ProcessorRefund] = []
        params = {target: charge_id, "limit": str(page_size)}
        while True:
            page = await self._request("GET", "/v1/refunds", params=params)
            data = page.get("data")
            if not isinstance(data, list):
                raise ProcessorError("Refund list without data", http_status=200)
            for item in data:
                refunds.append(_parse(_refund, item, fallback_charge_id=fallback))
            if not page.get("has_more") or not data:
                return refunds
            params["starting_after"] = refunds[-1].id

    async def get_dispute(self, dispute_id: str) -> ProcessorDispute:
        """Fetch a dispute, e.g. to check that a reported chargeback was really lost.

        Raises:
            ProcessorRejected: No such dispute (`code == "resource_missing"`).
        """
        body = await self._request(
            "GET", f"/v1/disputes/{segment(dispute_id)}", not_found=ProcessorRejected
        )
        return _parse(_dispute, body)

    async def refunds_since(
        self, created_gte: int, *, starting_after: str | None = None, limit: int = LIST_PAGE_SIZE
    ) -> ProcessorPage[ProcessorRefund]:
        """One page of the account's refunds created at or after `created_gte`, newest first."""
        page = await self._page("/v1/refunds", created_gte, starting_after, limit)
        return ProcessorPage[ProcessorRefund](
            items=[_parse(_refund, item, fallback_charge_id=None) for item in page[0]],
            has_more=page[1],
        )

    async def disputes_since(
        self, created_gte: int, *, starting_after: str | None = None, limit: int = LIST_PAGE_SIZE
    ) -> ProcessorPage[ProcessorDispute]:
        """One page of the account's disputes created at or after `created_gte`, newest first."""
        page = await self._page("/v1/disputes", created_gte, starting_after, limit)
        return ProcessorPage[ProcessorDispute](
            items=[_parse(_dispute, item) for item in page[0]], has_more=page[1]
        )

    async def events_since(
        self,
        created_gte: int,
        types: Sequence[str],
        *,
        starting_after: str | None = None,
        limit: int = LIST_PAGE_SIZE,
    ) -> ProcessorPage[dict[str, Any]]:
        """One page of the account's events of `types` (at most 20) created at or after
        `created_gte`, newest first, as the processor sent them (Stripe keeps 30 days)."""
        # Indexed, as stripe-python sends arrays.
        extra = {f"types[{n}]": event_type for n, event_type in enumerate(types)}
        page = await self._page("/v1/events", created_gte, starting_after, limit, extra)
        return ProcessorPage[dict[str, Any]](
            items=[item for item in page[0] if isinstance(item, dict)], has_more=page[1]
        )

    async def _page(
        self,
        path: str,
        created_gte: int,
        starting_after: str | None,
        limit: int,
        extra: Mapping[str, str] | None = None,
    ) -> tuple[list[Any], bool]:
        params = {"created[gte]": str(created_gte), "limit": str(limit), **(extra or {})}
        if starting_after:
            params["starting_after"] = starting_after
        body = await self._request("GET", path, params=params)
        data = body.get("data")
        if not isinstance(data, list):
            raise ProcessorError(f"{path} list without data", http_status=200)
        return data, bool(body.get("has_more")) and bool(data)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        not_found: type[ProcessorError] = ChargeNotFound,
    ) -> dict[str, Any]:
        response = await self._send(
            method, path, params=params, data=data, idempotency_key=idempotency_key
        )
        body = json_object(response)
        if response.is_success:
            if body is None:
                raise ProcessorUnavailable(
                    f"{method} {path}: response is not a JSON object",
                    http_status=response.status_code,
                )
            return body
        raise error_from(response, body, not_found=not_found)


def _charge(obj: Mapping[str, Any]) -> ProcessorCharge:
    return ProcessorCharge(
        id=obj["id"],
        amount_cents=obj["amount"],
        currency=obj["currency"],
        amount_refunded_cents=obj["amount_refunded"],
        refunded=obj["refunded"],
    )


def _refund(obj: Mapping[str, Any], *, fallback_charge_id: str | None) -> ProcessorRefund:
    charge = obj.get("charge")
    if isinstance(charge, dict):  # expanded charge object
        charge = charge.get("id")
    metadata = obj.get("metadata") or {}
    return ProcessorRefund(
        id=obj["id"],
        amount_cents=obj["amount"],
        currency=obj["currency"],
        charge_id=charge or fallback_charge_id or "",
        status=obj["status"],
        failure_reason=obj.get("failure_reason"),
        metadata={str(key): str(value) for key, value in metadata.items()},
        created=obj.get("created") or 0,
        payment_intent_id=_id_of(obj.get("payment_intent")),
    )


def _dispute(obj: Mapping[str, Any]) -> ProcessorDispute:
    charge = obj.get("charge")
    if isinstance(charge, dict):  # expanded charge object
        charge = charge.get("id")
    return ProcessorDispute(
        id=obj["id"],
        amount_cents=obj["amount"],
        currency=obj["currency"],
        charge_id=charge or "",
        status=obj["status"],
        reason=obj.get("reason"),
        created=obj.get("created") or 0,
        payment_intent_id=_id_of(obj.get("payment_intent")),
    )


def _id_of(value: object) -> str | None:
    """The id of a reference that may be expanded into its object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _parse(build: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Call a response parser, turning a surprising response shape into a ProcessorError."""
    try:
        result = build(*args, **kwargs)
    except (KeyError, TypeError, AttributeError, ValidationError) as exc:
        raise ProcessorError(f"Unexpected response shape from the processor: {exc}") from exc
    return result
