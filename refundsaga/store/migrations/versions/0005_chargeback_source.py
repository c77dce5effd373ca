"""A lost dispute in the ledger: refund source `chargeback`, the dispute id as its refund id.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

# Named as in 0001; the naming convention of the models' metadata prefixes it in the database.
CONSTRAINT = "ck_refunds_source"


def _allow(*sources: str) -> None:
    listed = ", ".join(f"'{source}'" for source in sources)
    # SQLite changes a constraint by recreating the table; batch mode does that, and is a
    # plain ALTER TABLE on PostgreSQL.
    with op.batch_alter_table("refunds") as batch:
        batch.drop_constraint(CONSTRAINT, type_="check")
        batch.create_check_constraint(CONSTRAINT, f"source IN ({listed})")


def upgrade() -> None:
    """Allow `chargeback` as a ledger row's source."""
    _allow("processor", "external", "chargeback")


def downgrade() -> None:
    """Back to refunds only; fails while the ledger holds a chargeback row."""
    _allow("processor", "external")
