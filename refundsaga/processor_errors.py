"""The processor client's errors, and how a Stripe error response maps to one of them.

Only `ProcessorUnavailable` is worth retrying (with the same idempotency key); the error's class
name is the `type` the saga's activities hand to Temporal, so the names are part of the contract.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

# Statuses where the processor is telling us to come back later, not that we are wrong:
# 409 is Stripe's "same idempotency key still in flight", 429 its rate limit.
_TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})


class ProcessorError(Exception):
    """A request to the processor failed.

    Attributes:
        message: The processor's (or the transport's) explanation.
        code: Stripe's `error.code` when there is one, e.g. `charge_already_refunded`.
        http_status: The HTTP status, or None when no response arrived.
        param: Stripe's `error.param`, the offending parameter, when given.
        request_id: The processor's `Request-Id` header, for support tickets.
        retry_after_s: The processor's `Retry-After`, when it said when to come back.
        retryable: Whether retrying the same request (same idempotency key) may succeed.
    """

    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        code: str | None = None,
        http_status: int | None = None,
        param: str | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        # Positional args so the exception pickles and crosses process boundaries intact.
        super().__init__(message, code, http_status, param, request_id, retry_after_s)
        self.message = message
        self.code = code
        self.http_status = http_status
        self.param = param
        self.request_id = request_id
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        details = [f"{name}={value}" for name, value in self._details() if value is not None]
        return f"{self.message} ({', '.join(details)})" if details else self.message

    def _details(self) -> list[tuple[str, object]]:
        return [("http_status", self.http_status), ("code", self.code), ("param", self.param)]


class ChargeAlreadyRefunded(ProcessorError):
    """The charge has nothing left to refund (Stripe `charge_already_refunded`)."""


class AmountTooLarge(ProcessorError):
    """The amount exceeds what is left on the charge (Stripe `amount_too_large`)."""


class ChargeNotFound(ProcessorError):
    """The processor does not know the charge (Stripe 404 `resource_missing`)."""


class ProcessorAuthError(ProcessorError):
    """The API key was missing, wrong or lacks permission (401/403)."""


class IdempotencyConflict(ProcessorError):
    """The idempotency key was already used with other parameters (`idempotency_error`)."""


class ProcessorRejected(ProcessorError):
    """Any other 4xx: the processor understood the request and refuses it."""


class ProcessorUnavailable(ProcessorError):
    """Transient: 5xx, 429, timeouts, refused or dropped connections. Retry with the same key."""

    retryable: ClassVar[bool] = True


class ProcessorRequestSpent(ProcessorError):
    """The processor answered an error it saved under the idempotency key and said not to retry
    (`Stripe-Should-Retry: false`, e.g. a saved 500): the same request gets the same answer until
    the key expires. Whether money moved is unknown: list the charge's refunds, then send a new
    request under a new key."""


def error_from(
    response: httpx.Response, body: dict[str, Any] | None, *, not_found: type[ProcessorError]
) -> ProcessorError:
    """Map a Stripe error response (by status, `error.type` and `error.code`) to an error."""
    status = response.status_code
    error = body.get("error") if body else None
    if not isinstance(error, dict):
        error = {}
    code = error.get("code") if isinstance(error.get("code"), str) else None
    error_type = error.get("type")
    message = str(error.get("message") or f"Processor answered HTTP {status}")
    kwargs: dict[str, Any] = {
        "code": code,
        "http_status": status,
        "param": error.get("param") if isinstance(error.get("param"), str) else None,
        "request_id": response.headers.get("request-id"),
        "retry_after_s": _retry_after(response),
    }
    # Stripe says whether the same request may succeed; it overrides what the status suggests.
    should_retry = response.headers.get("stripe-should-retry")
    error_class: type[ProcessorError]
    if status in (401, 403):
        error_class = ProcessorAuthError
    elif should_retry == "false" and (
        status >= 500 or response.headers.get("idempotent-replayed") == "true"
    ):
        error_class = ProcessorRequestSpent
    elif should_retry != "false" and (
        status >= 500 or status in _TRANSIENT_STATUSES or should_retry == "true"
    ):
        error_class = ProcessorUnavailable
    elif error_type == "idempotency_error":
        error_class = IdempotencyConflict
    elif code == "charge_already_refunded":
        error_class = ChargeAlreadyRefunded
    elif code == "amount_too_large":
        error_class = AmountTooLarge
    elif status == 404 or code == "resource_missing":
        error_class = not_found
    else:
        error_class = ProcessorRejected
    return error_class(message, **kwargs)


def _retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds when it is a number (Stripe sends seconds), else None."""
    value = response.headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds <= 3600 else None
