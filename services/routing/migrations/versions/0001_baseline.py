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
        "processed_events",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=32), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "routing_decisions",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("caused_by", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("provider_department", sa.String(length=32), nullable=False),
        sa.Column("rule", sa.String(length=100), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("accept_by", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolve_by", sa.DateTime(timezone=True), nullable=True),
        sa.Column("routed", sa.Text(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
        sa.UniqueConstraint("caused_by"),
    )
    op.create_index(
        op.f("ix_routing_decisions_provider_department"), "routing_decisions", ["provider_department"], unique=False
    )
    op.create_index(op.f("ix_routing_decisions_request_id"), "routing_decisions", ["request_id"], unique=False)

    op.create_table(
        "routing_outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=32), nullable=False),
        sa.Column("caused_by", sa.String(length=200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index(op.f("ix_routing_outbox_caused_by"), "routing_outbox", ["caused_by"], unique=False)
    op.create_index(op.f("ix_routing_outbox_request_id"), "routing_outbox", ["request_id"], unique=False)

    op.create_table(
        "routing_requests",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("requester", sa.String(length=32), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("attributes", sa.Text(), nullable=False),
        sa.Column("requested_provider", sa.String(length=32), nullable=True),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("holder", sa.String(length=32), nullable=True),
        sa.Column("chain", sa.Text(), nullable=False),
        sa.Column("declines", sa.Text(), nullable=False),
        sa.Column("waits", sa.Text(), nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_sequence", sa.Integer(), nullable=False),
        sa.Column("last_stream_seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_table(
        "sla_clocks",
        sa.Column("clock_id", sa.String(length=160), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("department", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("episode", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("target_us", sa.BigInteger(), nullable=False),
        sa.Column("consumed_us", sa.BigInteger(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("running_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("close_reason", sa.String(length=32), nullable=True),
        sa.Column("breach_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("warned", sa.Boolean(), nullable=False),
        sa.Column("escalated", sa.Boolean(), nullable=False),
        sa.Column("warn_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("schedule_dirty", sa.Boolean(), nullable=False),
        sa.Column("schedule_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("clock_id"),
    )
    op.create_index(op.f("ix_sla_clocks_deadline_at"), "sla_clocks", ["deadline_at"], unique=False)
    op.create_index(op.f("ix_sla_clocks_department"), "sla_clocks", ["department"], unique=False)
    op.create_index(op.f("ix_sla_clocks_request_id"), "sla_clocks", ["request_id"], unique=False)
    op.create_index(op.f("ix_sla_clocks_schedule_dirty"), "sla_clocks", ["schedule_dirty"], unique=False)
    op.create_index(op.f("ix_sla_clocks_warn_at"), "sla_clocks", ["warn_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_sla_clocks_warn_at"), table_name="sla_clocks")
    op.drop_index(op.f("ix_sla_clocks_schedule_dirty"), table_name="sla_clocks")
    op.drop_index(op.f("ix_sla_clocks_request_id"), table_name="sla_clocks")
    op.drop_index(op.f("ix_sla_clocks_department"), table_name="sla_clocks")
    op.drop_index(op.f("ix_sla_clocks_deadline_at"), table_name="sla_clocks")

    op.drop_table("sla_clocks")
    op.drop_table("routing_requests")
    op.drop_index(op.f("ix_routing_outbox_request_id"), table_name="routing_outbox")
    op.drop_index(op.f("ix_routing_outbox_caused_by"), table_name="routing_outbox")

    op.drop_table("routing_outbox")
    op.drop_index(op.f("ix_routing_decisions_request_id"), table_name="routing_decisions")
    op.drop_index(op.f("ix_routing_decisions_provider_department"), table_name="routing_decisions")

    op.drop_table("routing_decisions")
    op.drop_table("processed_events")
