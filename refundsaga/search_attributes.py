"""The saga's typed search attributes: what ops filter on in the Temporal UI and the CLI."""

from __future__ import annotations

from typing import Any

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from refundsaga.contracts import RefundRequest, SagaState

REFUND_STATE = SearchAttributeKey.for_keyword("RefundState")
WAITING_FOR = SearchAttributeKey.for_keyword("WaitingFor")
PURCHASE_ID = SearchAttributeKey.for_keyword("PurchaseId")
REFUND_AMOUNT_CENTS = SearchAttributeKey.for_int("RefundAmountCents")
REQUESTED_BY = SearchAttributeKey.for_keyword("RequestedBy")
# What started it: "webhook" or "sweep" (processor events). Support's starts carry none, so a
# server without this attribute registered still takes them; none means "support".
REFUND_SOURCE = SearchAttributeKey.for_keyword("RefundSource")
SOURCE_SUPPORT = "support"

ALL = (REFUND_STATE, WAITING_FOR, PURCHASE_ID, REFUND_AMOUNT_CENTS, REQUESTED_BY, REFUND_SOURCE)


def at_start(request: RefundRequest) -> TypedSearchAttributes:
    """What lists show of a saga from its start (`refund start`, and a batch's children).

    A saga started with these does not upsert them itself (its first transition, PREPARING,
    is already listed): one history event and one visibility write less.
    """
    pairs: list[SearchAttributePair[Any]] = [
        SearchAttributePair(REFUND_STATE, SagaState.PREPARING.value),
        SearchAttributePair(WAITING_FOR, "none"),
        SearchAttributePair(PURCHASE_ID, str(request.purchase_id)),
        SearchAttributePair(REQUESTED_BY, request.requested_by),
    ]
    if request.amount_cents is not None:
        pairs.append(SearchAttributePair(REFUND_AMOUNT_CENTS, request.amount_cents))
    if request.reconcile is not None:
        pairs.append(SearchAttributePair(REFUND_SOURCE, request.reconcile.source))
    return TypedSearchAttributes(pairs)


def dev_server_flags() -> list[str]:
    """`--search-attribute` flags that register them on `temporal server start-dev`."""
    kinds = {"KEYWORD": "Keyword", "INT": "Int"}
    return [
        f"--search-attribute={key.name}={kinds[key.indexed_value_type.name.removeprefix('INDEXED_VALUE_TYPE_')]}"
        for key in ALL
    ]
