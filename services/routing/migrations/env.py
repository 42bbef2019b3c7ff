"""Alembic environment of routing's database: see libs.migrations.run_env (async engine, own version table)."""

from libs.migrations import run_env
from services.routing.migrations import migrations

run_env(migrations())
