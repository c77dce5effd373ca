"""Initial OASIS store: users, products, purchases, refund ledger, progress, archive, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Written out rather than imported from the ORM: a migration is a record of what the schema was
# at this revision, and must not change when the models do.
TIMESTAMP = sa.DateTime(timezone=True)
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _currency_code(column: str) -> str:
    # ^[a-z]{3}$ without a regex operator, which SQLite lacks: letters are the only characters
    # that change under upper().
    letters = " AND ".join(
        f"substr({column}, {i}, 1) <> upper(substr({column}, {i}, 1))" for i in (1, 2, 3)
    )
    return f"length({column}) = 3 AND {column} = lower({column}) AND {letters}"


def _created_at(name: str = "created_at") -> sa.Column[object]:
    return sa.Column(name, TIMESTAMP, server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    """Create every table of the store with its constraints and indexes."""
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("ams_member_id", sa.String(64), nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("email", name="uq_users_email"),
        sa.UniqueConstraint("ams_member_id", name="uq_users_ams_member_id"),
    )
    op.create_table(
        "products",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("title", sa.String(300), nullable=False),
        sa.Column("entitlement_source", sa.String(16), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_products"),
        sa.UniqueConstraint("code", name="uq_products_code"),
        sa.CheckConstraint(
            "entitlement_source IN ('oasis', 'ams', 'ams_manual')",
            name="ck_products_entitlement_source",
        ),
    )
    op.create_table(
        "purchases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("processor_charge_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), server_default="active", nullable=False),
        sa.Column("refunded_cents", sa.Integer(), server_default="0", nullable=False),
        _created_at(),
        _created_at("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_purchases"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_purchases_user_id_users"),
        sa.ForeignKeyConstraint(
            ["product_id"], ["products.id"], name="fk_purchases_product_id_products"
        ),
        sa.UniqueConstraint("processor_charge_id", name="uq_purchases_processor_charge_id"),
        sa.CheckConstraint("amount_cents > 0", name="ck_purchases_amount_positive"),
        sa.CheckConstraint(_currency_code("currency"), name="ck_purchases_currency_code"),
        sa.CheckConstraint(
            "status IN ('active', 'partially_refunded', 'refunded', 'revoked')",
            name="ck_purchases_status",
        ),
        sa.CheckConstraint(
            "refunded_cents >= 0 AND refunded_cents <= amount_cents",
            name="ck_purchases_refunded_within_amount",
        ),
    )
    op.create_index("ix_purchases_user_id_product_id", "purchases", ["user_id", "product_id"])

    op.create_table(
        "refunds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("purchase_id", sa.Integer(), nullable=False),
        sa.Column("processor_refund_id", sa.String(255), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("workflow_id", sa.String(255), nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_refunds"),
        sa.ForeignKeyConstraint(
            ["purchase_id"], ["purchases.id"], name="fk_refunds_purchase_id_purchases"
        ),
        sa.UniqueConstraint("processor_refund_id", name="uq_refunds_processor_refund_id"),
        sa.CheckConstraint("amount_cents > 0", name="ck_refunds_amount_positive"),
        sa.CheckConstraint(_currency_code("currency"), name="ck_refunds_currency_code"),
        sa.CheckConstraint("source IN ('processor', 'external')", name="ck_refunds_source"),
        sa.CheckConstraint(
            "status IN ('succeeded', 'pending', 'failed')", name="ck_refunds_status"
        ),
    )
    op.create_index("ix_refunds_purchase_id", "refunds", ["purchase_id"])
    op.create_index("ix_refunds_workflow_id", "refunds", ["workflow_id"])

    op.create_table(
        "course_progress",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("item_key", sa.String(200), nullable=False),
        sa.Column("percent", sa.Integer(), server_default="0", nullable=False),
        sa.Column("completed_at", TIMESTAMP, nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_course_progress"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_course_progress_user_id_users"),
        sa.ForeignKeyConstraint(
            ["product_id"], ["products.id"], name="fk_course_progress_product_id_products"
        ),
        # Leading (user_id, product_id): this index also serves the saga's progress lookups.
        sa.UniqueConstraint(
            "user_id",
            "product_id",
            "item_key",
            name="uq_course_progress_user_id_product_id_item_key",
        ),
        sa.CheckConstraint(
            "percent >= 0 AND percent <= 100", name="ck_course_progress_percent_range"
        ),
    )

    op.create_table(
        "progress_archive",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("original_progress_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Integer(), nullable=False),
        sa.Column("item_key", sa.String(200), nullable=False),
        sa.Column("payload", JSON_DOCUMENT, nullable=False),
        _created_at("archived_at"),
        sa.Column("workflow_id", sa.String(255), nullable=False),
        sa.Column("purchase_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_progress_archive"),
        sa.ForeignKeyConstraint(
            ["purchase_id"], ["purchases.id"], name="fk_progress_archive_purchase_id_purchases"
        ),
    )
    op.create_index(
        "ix_progress_archive_user_id_product_id", "progress_archive", ["user_id", "product_id"]
    )
    op.create_index("ix_progress_archive_workflow_id", "progress_archive", ["workflow_id"])

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        _created_at("at"),
        sa.Column("workflow_id", sa.String(255), nullable=True),
        sa.Column("purchase_id", sa.Integer(), nullable=True),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("detail", JSON_DOCUMENT, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_workflow_id", "audit_events", ["workflow_id"])
    op.create_index("ix_audit_events_purchase_id", "audit_events", ["purchase_id"])


def downgrade() -> None:
    """Drop every table, dependants first."""
    op.drop_index("ix_audit_events_purchase_id", table_name="audit_events")
    op.drop_index("ix_audit_events_workflow_id", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index("ix_progress_archive_workflow_id", table_name="progress_archive")
    op.drop_index("ix_progress_archive_user_id_product_id", table_name="progress_archive")
    op.drop_table("progress_archive")
    op.drop_table("course_progress")
    op.drop_index("ix_refunds_workflow_id", table_name="refunds")
    op.drop_index("ix_refunds_purchase_id", table_name="refunds")
    op.drop_table("refunds")
    op.drop_index("ix_purchases_user_id_product_id", table_name="purchases")
    op.drop_table("purchases")
    op.drop_table("products")
    op.drop_table("users")
