"""requests.trace_parent: the W3C traceparent of the span that created the request

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A database made by the former create_all after the column joined the model (between git
    # fa0a2ab and migrations) already has it, yet is stamped at the baseline 0001: add it only if missing.
    # (Offline, --sql: no database to look at; the column is added.)
    if op.get_context().as_sql or "trace_parent" not in {
        c["name"] for c in sa.inspect(op.get_bind()).get_columns("requests")
    }:
        op.add_column("requests", sa.Column("trace_parent", sa.String(length=55), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch_op:
        batch_op.drop_column("trace_parent")
