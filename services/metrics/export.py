"""Scorecard exports straight from the metrics database (``baton metrics export``): CSV or JSON."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from libs.contracts.catalog_file import load_catalog

from . import db
from .kpis import Window, parse_window, scorecards, to_csv


async def export(database_url: str, *, window: str, end: datetime, fmt: str, catalog_path: Path | None) -> str:
    """The scorecards of the window ending at ``end``, as ``csv`` or ``json`` text."""
    span = Window.ending(end, parse_window(window))
    catalog = load_catalog(catalog_path) if catalog_path is not None else None
    database = db.Database(database_url)
    try:
        await database.start()
        async with database.reading() as session:
            facts = await db.load_facts(session, since=span.start)
    finally:
        await database.close()
    cards = scorecards(facts, span, span.end, catalog)
    return to_csv(cards) if fmt == "csv" else cards.model_dump_json(indent=2) + "\n"
