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
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_department", sa.String(length=32), nullable=False),
        sa.Column("actor_person", sa.String(length=200), nullable=False),
        sa.Column("trace_id", sa.String(length=32), nullable=True),
        sa.Column("canonical", sa.Text(), nullable=False),
        sa.Column("stream_sequence", sa.BigInteger(), nullable=True),
        sa.Column("projected_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
        sa.UniqueConstraint("request_id", "sequence", name="uq_metrics_events_request_sequence"),
    )
    op.create_index(op.f("ix_events_request_id"), "events", ["request_id"], unique=False)

    op.create_table(
        "facts",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("requester", sa.String(length=32), nullable=True),
        sa.Column("holder", sa.String(length=32), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_event_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("derived_through", sa.Integer(), nullable=False),
        sa.Column("facts", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_index(op.f("ix_facts_holder"), "facts", ["holder"], unique=False)
    op.create_index(op.f("ix_facts_last_event_at"), "facts", ["last_event_at"], unique=False)
    op.create_index(op.f("ix_facts_requester"), "facts", ["requester"], unique=False)

    op.create_table(
        "parties",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("department", sa.String(length=32), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "department", "role"),
    )
    op.create_index(op.f("ix_parties_department"), "parties", ["department"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_parties_department"), table_name="parties")

    op.drop_table("parties")
    op.drop_index(op.f("ix_facts_requester"), table_name="facts")
    op.drop_index(op.f("ix_facts_last_event_at"), table_name="facts")
    op.drop_index(op.f("ix_facts_holder"), table_name="facts")

    op.drop_table("facts")
    op.drop_index(op.f("ix_events_request_id"), table_name="events")

    op.drop_table("events")
