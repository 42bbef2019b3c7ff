"""routing_requests.trace_parent: the request's first span, for timers re-armed with no live span

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
    # A database made by the former create_all after the column joined the model is stamped at the
    # baseline 0001 yet already has it: add it only if missing (offline, --sql: always added).
    columns = set() if op.get_context().as_sql else sa.inspect(op.get_bind()).get_columns("routing_requests")
    if op.get_context().as_sql or "trace_parent" not in {c["name"] for c in columns}:
        op.add_column("routing_requests", sa.Column("trace_parent", sa.String(length=55), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("routing_requests") as batch_op:
        batch_op.drop_column("trace_parent")
