"""AMS adapter: the `AmsClient` interface and an HTTP implementation of it.

An association management system (AMS) grants members entitlements to product codes.
Refunds remove them. Removal is idempotent: an entitlement that is already gone counts
as success (`already_absent`), so a retried removal is harmless.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, ClassVar, Protocol, runtime_checkable

import httpx
from pydantic import ValidationError

from refundsaga.api_client import JsonApiClient, json_object, segment
from refundsaga.models import Record

logger = logging.getLogger(__name__)

# 408/425/429: the AMS asks us to come back later rather than saying we are wrong.
_TRANSIENT_STATUSES = frozenset({408, 425, 429})


class AmsEntitlement(Record):
    """One entitlement a member holds in the AMS."""

    product_code: str
    status: str
    granted_at: datetime | None = None


class AmsRemoval(Record):
    """The outcome of removing an entitlement; both outcomes mean it is gone now."""

    member_id: str
    product_code: str
    removed: bool
    already_absent: bool


class AmsError(Exception):
    """A request to the AMS failed.

    Attributes:
        message: The AMS's (or the transport's) explanation.
        code: The AMS's `error.code`, e.g. `member_not_found`.
        http_status: The HTTP status, or None when no response arrived.
        retryable: Whether retrying the same request may succeed.
    """

    retryable: ClassVar[bool] = False

    def __init__(
        self, message: str, code: str | None = None, http_status: int | None = None
    ) -> None:
        # Positional args so the exception pickles and crosses process boundaries intact.
        super().__init__(message, code, http_status)
        self.message = message
        self.code = code
        self.http_status = http_status

    def __str__(self) -> str:
        details = [
            f"{name}={value}"
            for name, value in (("http_status", self.http_status), ("code", self.code))
            if value is not None
        ]
        return f"{self.message} ({', '.join(details)})" if details else self.message


class AmsMemberNotFound(AmsError):
    """The AMS does not know the member (404 `member_not_found`)."""


class AmsAuthError(AmsError):
    """The API key was missing, wrong or lacks permission (401/403)."""


class AmsRejected(AmsError):
    """Any other 4xx: the AMS understood the request and refuses it."""


class AmsUnavailable(AmsError):
    """Transient: 5xx, 429, timeouts, refused or dropped connections."""

    retryable: ClassVar[bool] = True


@runtime_checkable
class AmsClient(Protocol):
    """What the refund saga needs from an AMS; one adapter per AMS vendor."""

    async def list_entitlements(self, member_id: str) -> list[AmsEntitlement]:
        """The member's current entitlements.

        Raises:
            AmsMemberNotFound: Unknown member.
            AmsError: Any other failure.
        """
        ...

    async def remove_entitlement(
        self, member_id: str, product_code: str, *, idempotency_key: str
    ) -> AmsRemoval:
        """Remove one entitlement; succeeds with `already_absent=True` if it is gone already.

        Raises:
            AmsMemberNotFound: Unknown member.
            AmsError: Any other failure.
        """
        ...

    async def has_active_entitlement(self, member_id: str, product_code: str) -> bool:
        """Whether the member holds an active entitlement to `product_code`.

        Raises:
            AmsMemberNotFound: Unknown member.
            AmsError: Any other failure.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class HttpAmsClient(JsonApiClient):
    """`AmsClient` for the AMS entitlement HTTP API (as the AMS sandbox serves it).

    Args:
        base_url: E.g. `http://127.0.0.1:8302`.
        api_key: Secret key sent as a Bearer token; never logged nor put in errors.
        timeout_s: Connect, read, write and pool timeout for each request.
        transport: Optional httpx transport (tests).
    """

    unavailable = AmsUnavailable
    logger = logger

    async def list_entitlements(self, member_id: str) -> list[AmsEntitlement]:
        """The member's active entitlements (see `AmsClient.list_entitlements`)."""
        response = await self._request("GET", f"/v1/members/{segment(member_id)}/entitlements")
        body = json_object(response)
        if not response.is_success:
            raise _error_from(response, body)
        data = body.get("data") if body else None
        if not isinstance(data, list):
            raise AmsError("Unexpected entitlement list from the AMS", http_status=200)
        try:
            return [
                AmsEntitlement(
                    product_code=item["product_code"],
                    status=item["status"],
                    granted_at=item.get("granted_at"),
                )
                for item in data
            ]
        except (KeyError, TypeError, AttributeError, ValidationError) as exc:
            raise AmsError(f"Unexpected entitlement shape from the AMS: {exc}") from exc

    async def remove_entitlement(
        self, member_id: str, product_code: str, *, idempotency_key: str
    ) -> AmsRemoval:
        """Remove one entitlement (see `AmsClient.remove_entitlement`)."""
        path = f"/v1/members/{segment(member_id)}/entitlements/{segment(product_code)}"
        response = await self._request("DELETE", path, idempotency_key=idempotency_key)
        body = json_object(response)
        if response.is_success:
            return AmsRemoval(
                member_id=member_id, product_code=product_code, removed=True, already_absent=False
            )
        # Only the AMS's explicit code means "already gone": a bare 404 from a wrong base URL
        # or proxy must not pass for a successful removal.
        if response.status_code == 404 and _error_code(body) == "entitlement_not_found":
            return AmsRemoval(
                member_id=member_id, product_code=product_code, removed=False, already_absent=True
            )
        raise _error_from(response, body)

    async def has_active_entitlement(self, member_id: str, product_code: str) -> bool:
        """Whether the member holds `product_code` (see `AmsClient.has_active_entitlement`)."""
        entitlements = await self.list_entitlements(member_id)
        return any(e.product_code == product_code and e.status == "active" for e in entitlements)

    async def _request(
        self, method: str, path: str, *, idempotency_key: str | None = None
    ) -> httpx.Response:
        return await self._send(method, path, idempotency_key=idempotency_key)


def _error_code(body: dict[str, Any] | None) -> str | None:
    error = body.get("error") if body else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _error_from(response: httpx.Response, body: dict[str, Any] | None) -> AmsError:
    status = response.status_code
    code = _error_code(body)
    error = body.get("error") if body else None
    message = str(
        (error.get("message") if isinstance(error, dict) else None) or f"AMS answered HTTP {status}"
    )
    error_class: type[AmsError]
    if status in (401, 403):
        error_class = AmsAuthError
    elif status >= 500 or status in _TRANSIENT_STATUSES:
        error_class = AmsUnavailable
    elif code == "member_not_found":
        error_class = AmsMemberNotFound
    else:
        error_class = AmsRejected
    return error_class(message, code=code, http_status=status)
