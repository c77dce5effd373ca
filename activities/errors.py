"""How the RefundSaga's activities speak to Temporal: domain errors in, `ApplicationError`s
out, and a processor refund as a step result.

Business failures become non-retryable errors whose `type` the workflow branches on; transient
failures stay retryable so Temporal retries them with backoff. The types are recorded in
workflow histories: they must not change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from temporalio.exceptions import ApplicationError

from refundsaga.ams import AmsError
from refundsaga.contracts import ProcessorRefundResult
from refundsaga.processor import ProcessorError, ProcessorRefund
from refundsaga.store import (
    PurchaseClaimed,
    PurchaseNotFound,
    RefundRefused,
    RequestReplayed,
    StoreError,
)

INVALID_REQUEST = "InvalidRefundRequest"
# ApplicationError types of the pivot that the saga branches on.
REFUND_FAILED = "RefundFailed"
REFUND_REQUIRES_ACTION = "RefundRequiresAction"
REQUEST_SPENT = "ProcessorRequestSpent"
# The store's refusals, by their error names (see translated).
PURCHASE_CLAIMED = PurchaseClaimed.__name__
REQUEST_REPLAYED = RequestReplayed.__name__
REFUND_REFUSED = RefundRefused.__name__


def invalid(message: str) -> ApplicationError:
    return ApplicationError(message, type=INVALID_REQUEST, non_retryable=True)


@contextmanager
def translated() -> Iterator[None]:
    """Domain errors in, Temporal errors out: the type names the domain error."""
    try:
        yield
    except (ProcessorError, AmsError) as err:
        # A 429's Retry-After paces the next attempt instead of the activity's backoff.
        after = getattr(err, "retry_after_s", None)
        raise ApplicationError(
            err.message,
            type=type(err).__name__,
            non_retryable=not err.retryable,
            next_retry_delay=timedelta(seconds=after) if after and err.retryable else None,
        ) from err
    except (PurchaseNotFound, PurchaseClaimed, RefundRefused, RequestReplayed) as err:
        raise ApplicationError(str(err), type=type(err).__name__, non_retryable=True) from err
    except StoreError as err:
        # Store errors are refusals of inconsistent data, not outages: a person must look.
        raise ApplicationError(str(err), type="StoreRefused", non_retryable=True) from err


def request_spent(why: str) -> ApplicationError:
    return ApplicationError(
        f"the processor will answer this request the same way until its key expires: {why}",
        type=REQUEST_SPENT,
        non_retryable=True,
    )


def outcome(refund: ProcessorRefund) -> ProcessorRefundResult:
    """A succeeded or pending refund; any status that moved no money is a non-retryable error."""
    if refund.status == "requires_action":
        raise ApplicationError(
            f"refund {refund.id} requires action at the processor before any money moves; "
            "retry once it has settled there, or abort",
            type=REFUND_REQUIRES_ACTION,
            non_retryable=True,
        )
    if refund.status in ("failed", "canceled"):
        raise ApplicationError(
            f"refund {refund.id} {refund.status}"
            + (f" ({refund.failure_reason})" if refund.failure_reason else "")
            + ": no money moved; retry sends a new refund, abort ends the saga",
            type=REFUND_FAILED,
            non_retryable=True,
        )
    return refund_result(refund)


def refund_result(refund: ProcessorRefund) -> ProcessorRefundResult:
    return ProcessorRefundResult(
        refund_id=refund.id,
        status=refund.status,
        amount_cents=refund.amount_cents,
        currency=refund.currency,
        failure_reason=refund.failure_reason,
    )
