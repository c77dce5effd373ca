"""The base of every message a workflow takes or gives, and the bounds its fields share."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

CURRENCY_PATTERN = r"^[a-z]{3}$"
# The store's ids and cents are SQL INTEGER (32-bit on PostgreSQL): a larger purchase id would
# fail the prepare step with an overflow, retried, instead of being refused at once.
MAX_STORE_INT = 2**31 - 1


class Message(BaseModel):
    """Base of every saga message: strict about unknown fields."""

    model_config = ConfigDict(extra="forbid")
