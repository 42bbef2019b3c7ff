"""Alembic environment of intake's database: see libs.migrations.run_env (async engine, own version table)."""

from libs.migrations import run_env
from services.intake.migrations import migrations

run_env(migrations())
