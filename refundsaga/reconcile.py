"""What a processor event asks of RefundSaga: wake a saga, reconcile a purchase, or nothing.

Pure: a verified Stripe event (or, for the sweep, a refund or dispute object it listed) becomes
one action; `refundsaga.reconcile_dispatch` carries it out. Nothing here trusts the event
further than choosing what to look at: a woken saga and a reconciliation read the processor
themselves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from refundsaga.contracts import REFUND_REQUEST_METADATA, RefundRequest
from refundsaga.message import CURRENCY_PATTERN, MAX_STORE_INT
from refundsaga.processor_events import (
    CHARGE_ID_PATTERN,
    DISPUTE_ID_PATTERN,
    EVENT_ID_PATTERN,
    PROCESSOR_REQUESTER,
    REFUND_ID_PATTERN,
    EventSource,
    FailedRefund,
    ProcessorEvent,
    Reconciliation,
)

# The refund metadata every saga sets (activities/refund_activities.py): a refund carrying
# both is one of ours, made by that saga for that request.
WORKFLOW_ID_METADATA = "workflow_id"
PURCHASE_ID_METADATA = "purchase_id"

REFUND_EVENTS = frozenset(
    # charge.refund.updated: the name refund.updated had in older API versions.
    {"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"}
)
DISPUTE_LOST = "charge.dispute.closed"
DISPUTE_FUNDS_WITHDRAWN = "charge.dispute.funds_withdrawn"
CHARGE_REFUNDED = "charge.refunded"
# The event types to enable on the processor's webhook endpoint.
HANDLED_EVENTS = REFUND_EVENTS | {DISPUTE_LOST, DISPUTE_FUNDS_WITHDRAWN, CHARGE_REFUNDED}

# The requester the saga accepts for a reconciliation, and for nothing else.
REQUESTED_BY_PROCESSOR = PROCESSOR_REQUESTER

_EVENT_ID = re.compile(EVENT_ID_PATTERN)
_REFUND_ID = re.compile(REFUND_ID_PATTERN)
_DISPUTE_ID = re.compile(DISPUTE_ID_PATTERN)
_CHARGE_ID = re.compile(CHARGE_ID_PATTERN)
_PAYMENT_INTENT_ID = re.compile(r"^pi_[A-Za-z0-9_]{1,200}$")
_CURRENCY = re.compile(CURRENCY_PATTERN)
_REASON = re.compile(r"^[a-z0-9_]{1,100}$")
# Loose on purpose (the sagas' ids are `refund-<purchase>`): enough that Temporal takes it.
_WORKFLOW_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}$")
_EVENT_TYPE = re.compile(r"^[a-z_]{1,40}(\.[a-z_]{1,40}){1,3}$")


class MalformedEvent(ValueError):
    """The body is not a processor event: no event id, type or object. The message names
    what is missing, never a value from the body."""


@dataclass(frozen=True)
class ProcessorEventEnvelope:
    """The parts of a Stripe event the classification reads."""

    id: str
    type: str
    object: Mapping[str, Any]


@dataclass(frozen=True)
class LateFailure:
    """A refund of ours the processor failed: an ops task if its saga had completed."""

    refund_id: str
    charge_id: str
    amount_cents: int
    currency: str
    # From the refund's metadata; None: the dispatcher looks the charge up.
    purchase_id: int | None
    failure_reason: str | None
    source: EventSource
    event_id: str | None

    def task(self, purchase_id: int, saga_workflow_id: str) -> FailedRefund:
        """The ops task's input."""
        return FailedRefund(
            refund_id=self.refund_id,
            charge_id=self.charge_id,
            purchase_id=purchase_id,
            amount_cents=self.amount_cents,
            currency=self.currency,
            saga_workflow_id=saga_workflow_id,
            failure_reason=self.failure_reason,
            source=self.source,
            event_id=self.event_id,
        )


@dataclass(frozen=True)
class WakeSaga:
    """Signal the saga that made the refund: it reads the refund at the processor."""

    workflow_id: str
    # The first run id of the saga that made the refund (its request id is
    # `<workflow id>/<first run id>`), so a later saga under the same workflow id is not
    # taken for it; None when the metadata does not say.
    first_run_id: str | None
    event: ProcessorEvent
    # Set when the refund failed: if that saga has completed, the failure opens an ops task.
    failure: LateFailure | None = None


@dataclass(frozen=True)
class Reconcile:
    """Money went back outside OASIS: reconcile the purchase the charge paid for."""

    charge_id: str
    payment_intent_id: str | None
    reconciliation: Reconciliation


@dataclass(frozen=True)
class Ignore:
    """Nothing to do; the reason is ours (no text from the event)."""

    reason: str


Action = WakeSaga | Reconcile | Ignore


def parse_event(body: object) -> ProcessorEventEnvelope:
    """The id, type and object of a Stripe event.

    Raises:
        MalformedEvent: The body is not an event.
    """
    if not isinstance(body, Mapping):
        raise MalformedEvent("the body is not a JSON object")
    event_id = body.get("id")
    if not isinstance(event_id, str) or not _EVENT_ID.match(event_id):
        raise MalformedEvent("the event has no valid id")
    event_type = body.get("type")
    if not isinstance(event_type, str) or not _EVENT_TYPE.match(event_type):
        raise MalformedEvent("the event has no valid type")
    data = body.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(obj, Mapping):
        raise MalformedEvent("the event has no data.object")
    return ProcessorEventEnvelope(id=event_id, type=event_type, object=obj)


def classify(event: ProcessorEventEnvelope, *, source: EventSource = "webhook") -> Action:
    """The one action an event asks for."""
    if event.type in REFUND_EVENTS:
        return classify_refund(
            event.object, event_type=event.type, source=source, event_id=event.id
        )
    if event.type == CHARGE_REFUNDED:
        return classify_charge(event.object, source=source, event_id=event.id)
    if event.type in (DISPUTE_LOST, DISPUTE_FUNDS_WITHDRAWN):
        return classify_dispute(
            event.object, event_type=event.type, source=source, event_id=event.id
        )
    return Ignore("an event type RefundSaga does not act on")


def is_ours(refund: Mapping[str, Any]) -> bool:
    """Whether a saga made the refund: it carries the request and the workflow in metadata."""
    metadata = refund.get("metadata")
    return (
        isinstance(metadata, Mapping)
        and bool(metadata.get(REFUND_REQUEST_METADATA))
        and bool(metadata.get(WORKFLOW_ID_METADATA))
    )


def classify_refund(
    refund: Mapping[str, Any],
    *,
    event_type: str | None,
    source: EventSource,
    event_id: str | None,
    charge_id: str | None = None,
) -> Action:
    """A refund's action: wake our saga, reconcile an outside refund, or nothing.

    Args:
        refund: The refund object.
        event_type: The event that carried it; None when the sweep listed it.
        source: Who reported it.
        event_id: The event's id, when an event carried it.
        charge_id: The charge, when the refund came in a charge's list.
    """
    refund_id = refund.get("id")
    if not isinstance(refund_id, str) or not _REFUND_ID.match(refund_id):
        return Ignore("a refund without a valid refund id")
    status = refund.get("status")
    if is_ours(refund):
        if event_type == "refund.created":
            return Ignore("our saga's own refund, just made: the saga holds it")
        return _wake(refund, refund_id, status, source=source, event_id=event_id)
    if status != "succeeded":
        # A pending outside refund reports again when it settles; a failed one returned nothing.
        return Ignore("an outside refund that has not succeeded")
    charge = _charge_of(refund) or charge_id
    if charge is None:
        return Ignore("an outside refund without a valid charge id")
    return _reconcile(
        refund,
        charge,
        Reconciliation(
            kind="external_refund",
            processor_object_id=refund_id,
            source=source,
            event_id=event_id,
        ),
    )


def classify_charge(
    charge: Mapping[str, Any], *, source: EventSource, event_id: str | None
) -> Action:
    """`charge.refunded`: the charge's newest outside refund, when its refunds are listed.

    API versions since 2022-11-15 no longer list a charge's refunds in its events; the
    processor then sends `refund.created` for each refund, outside ones included, and that
    event names the refund a reconciliation needs. A bare charge cannot tell an outside refund
    from one of ours, so it starts nothing (and the sweep covers a missed refund event).
    """
    charge_id = charge.get("id")
    if not isinstance(charge_id, str) or not _CHARGE_ID.match(charge_id):
        return Ignore("a charge without a valid charge id")
    refunds = charge.get("refunds")
    listed = refunds.get("data") if isinstance(refunds, Mapping) else None
    if not isinstance(listed, list):
        return Ignore("a charge event without its refunds: refund.created names the refund")
    for refund in listed:  # newest first, as the processor lists them
        if isinstance(refund, Mapping) and not is_ours(refund):
            action = classify_refund(
                refund,
                event_type=CHARGE_REFUNDED,
                source=source,
                event_id=event_id,
                charge_id=charge_id,
            )
            if isinstance(action, Reconcile):
                if action.payment_intent_id is None:
                    return replace(action, payment_intent_id=_payment_intent_of(charge))
                return action
    return Ignore("no succeeded outside refund listed on the charge")


def classify_dispute(
    dispute: Mapping[str, Any],
    *,
    event_type: str | None,
    source: EventSource,
    event_id: str | None,
) -> Action:
    """A dispute's action: reconcile when the money went back to the cardholder.

    Args:
        dispute: The dispute object.
        event_type: `charge.dispute.closed` (acted on when lost), or
            `charge.dispute.funds_withdrawn`; None when the sweep listed it (acted on when lost).
    """
    dispute_id = dispute.get("id")
    if not isinstance(dispute_id, str) or not _DISPUTE_ID.match(dispute_id):
        return Ignore("a dispute without a valid dispute id")
    if event_type != DISPUTE_FUNDS_WITHDRAWN and dispute.get("status") != "lost":
        return Ignore("a dispute that was not lost: the money stayed")
    charge = _charge_of(dispute)
    if charge is None:
        return Ignore("a dispute without a valid charge id")
    return _reconcile(
        dispute,
        charge,
        Reconciliation(
            kind="chargeback", processor_object_id=dispute_id, source=source, event_id=event_id
        ),
    )


def reconcile_request(purchase_id: int, reconciliation: Reconciliation) -> RefundRequest:
    """The reconciliation saga's request: no amount (the processor's record decides), a reason
    naming what returned the money, and the processor as requester."""
    what = (
        "refund made outside OASIS"
        if reconciliation.kind == "external_refund"
        else "chargeback (dispute lost)"
    )
    return RefundRequest(
        purchase_id=purchase_id,
        reason=(
            f"Reconcile a {what}: {reconciliation.processor_object_id}, "
            f"reported by the processor ({reconciliation.source})"
        ),
        requested_by=REQUESTED_BY_PROCESSOR,
        reconcile=reconciliation,
    )


def first_run_of(request_id: object) -> str | None:
    """The first run id in a saga's request id (`<workflow id>/<first run id>`), or None."""
    if not isinstance(request_id, str):
        return None
    _, slash, run_id = request_id.rpartition("/")
    return run_id if slash and run_id else None


def _wake(
    refund: Mapping[str, Any],
    refund_id: str,
    status: object,
    *,
    source: EventSource,
    event_id: str | None,
) -> Action:
    metadata: Mapping[str, Any] = refund["metadata"]
    workflow_id = str(metadata[WORKFLOW_ID_METADATA])
    if not _WORKFLOW_ID.match(workflow_id):
        return Ignore("a refund of ours naming no valid workflow id")
    failure = None
    if status == "failed":
        failure = _late_failure(refund, refund_id, source=source, event_id=event_id)
        if failure is None:
            return Ignore("a failed refund of ours without its charge, amount or currency")
    return WakeSaga(
        workflow_id=workflow_id,
        first_run_id=first_run_of(metadata.get(REFUND_REQUEST_METADATA)),
        event=ProcessorEvent(refund_id=refund_id, event_id=event_id),
        failure=failure,
    )


def _late_failure(
    refund: Mapping[str, Any], refund_id: str, *, source: EventSource, event_id: str | None
) -> LateFailure | None:
    charge = _charge_of(refund)
    amount = refund.get("amount")
    currency = refund.get("currency")
    if (
        charge is None
        or not isinstance(amount, int)
        or not 0 < amount <= MAX_STORE_INT
        or not isinstance(currency, str)
        or not _CURRENCY.match(currency)
    ):
        return None
    metadata: Mapping[str, Any] = refund["metadata"]
    raw_purchase = str(metadata.get(PURCHASE_ID_METADATA, ""))
    purchase_id = int(raw_purchase) if raw_purchase.isdigit() else 0
    reason = refund.get("failure_reason")
    return LateFailure(
        refund_id=refund_id,
        charge_id=charge,
        amount_cents=amount,
        currency=currency,
        purchase_id=purchase_id if 0 < purchase_id <= MAX_STORE_INT else None,
        # Stripe's failure reasons are short codes; anything else is not worth keeping.
        failure_reason=reason if isinstance(reason, str) and _REASON.match(reason) else None,
        source=source,
        event_id=event_id,
    )


def _reconcile(obj: Mapping[str, Any], charge_id: str, reconciliation: Reconciliation) -> Reconcile:
    return Reconcile(
        charge_id=charge_id,
        payment_intent_id=_payment_intent_of(obj),
        reconciliation=reconciliation,
    )


def _payment_intent_of(obj: Mapping[str, Any]) -> str | None:
    intent = obj.get("payment_intent")
    if isinstance(intent, Mapping):  # expanded
        intent = intent.get("id")
    return intent if isinstance(intent, str) and _PAYMENT_INTENT_ID.match(intent) else None


def _charge_of(obj: Mapping[str, Any]) -> str | None:
    charge = obj.get("charge")
    if isinstance(charge, Mapping):  # expanded
        charge = charge.get("id")
    return charge if isinstance(charge, str) and _CHARGE_ID.match(charge) else None
