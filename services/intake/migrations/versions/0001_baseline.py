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
        "events",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("payload_hash", sa.String(length=64), nullable=False),
        sa.Column("canonical", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
        sa.UniqueConstraint("request_id", "sequence", name="uq_events_request_sequence"),
    )
    op.create_index(op.f("ix_events_request_id"), "events", ["request_id"], unique=False)

    op.create_table(
        "pending_publish",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_index(op.f("ix_pending_publish_created_at"), "pending_publish", ["created_at"], unique=False)

    op.create_table(
        "rejections",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("source_key", sa.String(length=128), nullable=False),
        sa.Column("department", sa.String(length=32), nullable=True),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("event_type", sa.String(length=32), nullable=True),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source_key"),
    )
    op.create_index(op.f("ix_rejections_department"), "rejections", ["department"], unique=False)

    op.create_table(
        "requests",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("requester_department", sa.String(length=32), nullable=False),
        sa.Column("holder_department", sa.String(length=32), nullable=True),
        sa.Column("last_sequence", sa.Integer(), nullable=False),
        sa.Column("eta", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delay_count", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("trace_id", sa.String(length=32), nullable=True),
        sa.Column("declined_by", sa.JSON(), nullable=False),
        sa.Column("reopen_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_index(op.f("ix_requests_holder_department"), "requests", ["holder_department"], unique=False)
    op.create_index(op.f("ix_requests_requester_department"), "requests", ["requester_department"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_requests_requester_department"), table_name="requests")
    op.drop_index(op.f("ix_requests_holder_department"), table_name="requests")

    op.drop_table("requests")
    op.drop_index(op.f("ix_rejections_department"), table_name="rejections")

    op.drop_table("rejections")
    op.drop_index(op.f("ix_pending_publish_created_at"), table_name="pending_publish")

    op.drop_table("pending_publish")
    op.drop_index(op.f("ix_events_request_id"), table_name="events")

    op.drop_table("events")
