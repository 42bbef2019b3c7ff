"""projections.reopen_count and projections.notices on databases from before they existed

The baseline (0001) already has both columns. A database created by an early release's create_all
(the foundation, before reopenings and SLA notices were projected) lacks them; it is stamped at 0001
when first migrated (libs/migrations.py), so this revision adds them where they are missing. Both are
nullable and read as 0 / () when NULL. On any other database it changes nothing.

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

COLUMNS = (("reopen_count", sa.Integer()), ("notices", sa.JSON()))


def upgrade() -> None:
    if op.get_context().as_sql:
        return  # offline (--sql) output starts from a baseline that already has them
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("projections")}
    for name, type_ in COLUMNS:
        if name not in have:
            op.add_column("projections", sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    # The baseline has both columns: nothing to undo.
    pass
