"""baseline: the schema created at start before migrations (git fa0a2ab)

Revision ID: 0001
Revises:
Create Date: 2026-11-22 (the models at git fa0a2ab; reviewed by hand)
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "digests",
        sa.Column("digest_id", sa.String(length=80), nullable=False),
        sa.Column("department", sa.String(length=32), nullable=False),
        sa.Column("period", sa.String(length=16), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("digest_id"),
    )
    op.create_index(op.f("ix_digests_department"), "digests", ["department"], unique=False)

    op.create_table(
        "outbox",
        sa.Column("notification_id", sa.String(length=80), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("department", sa.String(length=32), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivery", sa.String(length=16), nullable=True),
        sa.Column("digest_id", sa.String(length=80), nullable=True),
        sa.PrimaryKeyConstraint("notification_id"),
    )
    op.create_index("ix_outbox_digest_pending", "outbox", ["department", "delivery", "digest_id"], unique=False)
    op.create_index(op.f("ix_outbox_event_id"), "outbox", ["event_id"], unique=False)
    op.create_index(op.f("ix_outbox_request_id"), "outbox", ["request_id"], unique=False)

    op.create_table(
        "preferences",
        sa.Column("department", sa.String(length=32), nullable=False),
        sa.Column("digest", sa.JSON(), nullable=False),
        sa.Column("daily_at", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("department"),
    )
    op.create_table(
        "processed_events",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
        sa.UniqueConstraint("request_id", "sequence", name="uq_processed_request_sequence"),
    )
    op.create_table(
        "projections",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("requester_department", sa.String(length=32), nullable=False),
        sa.Column("holder_department", sa.String(length=32), nullable=True),
        sa.Column("past_holders", sa.JSON(), nullable=False),
        sa.Column("watchers", sa.JSON(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("eta", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delay_count", sa.Integer(), nullable=False),
        sa.Column("last_sequence", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reopen_count", sa.Integer(), nullable=True),
        sa.Column("notices", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=80), nullable=False),
        sa.Column("subscription_id", sa.String(length=40), nullable=False),
        sa.Column("department", sa.String(length=32), nullable=False),
        sa.Column("notification_id", sa.String(length=80), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("traceparent", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_deliveries_due", "webhook_deliveries", ["status", "subscription_id", "next_attempt_at"], unique=False
    )
    op.create_index(op.f("ix_webhook_deliveries_department"), "webhook_deliveries", ["department"], unique=False)

    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("department", sa.String(length=32), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("secret", sa.String(length=200), nullable=False),
        sa.Column("event_types", sa.JSON(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("description", sa.String(length=200), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_webhooks_department"), "webhooks", ["department"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_webhooks_department"), table_name="webhooks")

    op.drop_table("webhooks")
    op.drop_index(op.f("ix_webhook_deliveries_department"), table_name="webhook_deliveries")
    op.drop_index("ix_deliveries_due", table_name="webhook_deliveries")

    op.drop_table("webhook_deliveries")
    op.drop_table("projections")
    op.drop_table("processed_events")
    op.drop_table("preferences")
    op.drop_index(op.f("ix_outbox_request_id"), table_name="outbox")
    op.drop_index(op.f("ix_outbox_event_id"), table_name="outbox")
    op.drop_index("ix_outbox_digest_pending", table_name="outbox")

    op.drop_table("outbox")
    op.drop_index(op.f("ix_digests_department"), table_name="digests")

    op.drop_table("digests")
