"""The saga's typed search attributes: what ops filter on in the Temporal UI and the CLI."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

REFUND_STATE = SearchAttributeKey.for_keyword("RefundState")
WAITING_FOR = SearchAttributeKey.for_keyword("WaitingFor")
PURCHASE_ID = SearchAttributeKey.for_keyword("PurchaseId")
REFUND_AMOUNT_CENTS = SearchAttributeKey.for_int("RefundAmountCents")
REQUESTED_BY = SearchAttributeKey.for_keyword("RequestedBy")

ALL = (REFUND_STATE, WAITING_FOR, PURCHASE_ID, REFUND_AMOUNT_CENTS, REQUESTED_BY)


def dev_server_flags() -> list[str]:
    """`--search-attribute` flags that register them on `temporal server start-dev`."""
    kinds = {"KEYWORD": "Keyword", "INT": "Int"}
    return [
        f"--search-attribute={key.name}={kinds[key.indexed_value_type.name.removeprefix('INDEXED_VALUE_TYPE_')]}"
        for key in ALL
    ]
