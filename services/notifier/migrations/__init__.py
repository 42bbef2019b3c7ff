"""Notifier's Alembic migrations (``versions/``); run by ``libs.migrations`` at start and by ``baton migrate``."""

from __future__ import annotations

from pathlib import Path

from libs.migrations import Migrations


def migrations() -> Migrations:
    from ..db import Base

    return Migrations(service="notifier", directory=Path(__file__).resolve().parent, metadata=Base.metadata)
