"""Alembic environment of metrics's database: see libs.migrations.run_env (async engine, own version table)."""

from libs.migrations import run_env
from services.metrics.migrations import migrations

run_env(migrations())
