"""Domain records shared by the store, the clients, the activities and the workflow.

Identifiers and money only: no names or emails, because these records travel through
Temporal history. Money is integer cents plus an ISO currency code in lower case.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EntitlementSource = Literal["oasis", "ams", "ams_manual"]
"""Where a product's entitlement comes from: OASIS purchases, an AMS with an API, an AMS without."""

PurchaseStatus = Literal["active", "partially_refunded", "refunded", "revoked"]
LedgerSource = Literal["processor", "external", "chargeback"]
"""Who returned the money: our refund, one made outside OASIS, or a lost dispute (its `dp_` id
stands in the ledger's processor refund id)."""
AccessReason = Literal["progress", "oasis_purchase", "ams_entitlement"]

Currency = str


class Record(BaseModel):
    """Base for the project's records: immutable, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PurchaseSnapshot(Record):
    """A purchase as the store knows it, with what a refund needs to plan."""

    purchase_id: int
    user_id: int
    product_id: int
    product_code: str
    entitlement_source: EntitlementSource
    ams_member_id: str | None
    amount_cents: int
    currency: Currency
    refunded_cents: int
    status: PurchaseStatus
    processor_charge_id: str
    progress_count: int

    @property
    def refundable_cents(self) -> int:
        """What OASIS still believes can be refunded."""
        return max(self.amount_cents - self.refunded_cents, 0)


class LedgerEntry(Record):
    """One refund as it goes into the OASIS ledger."""

    processor_refund_id: str
    amount_cents: int = Field(gt=0)
    currency: Currency
    source: LedgerSource
    status: Literal["succeeded", "pending", "failed"] = "succeeded"


class RecordRefundsResult(Record):
    """What the ledger holds for a purchase after recording."""

    recorded: int
    refunded_cents: int
    purchase_status: PurchaseStatus


class RevokeResult(Record):
    """Progress deleted from a user's course, each record archived first."""

    deleted: int
    archived: int


class AccessFacts(Record):
    """What OASIS itself knows about a user's access to a product."""

    progress_count: int
    active_purchase: bool


class AccessDecision(Record):
    """The OASIS access rule's answer, with every reason that grants access."""

    has_access: bool
    reasons: list[AccessReason]
