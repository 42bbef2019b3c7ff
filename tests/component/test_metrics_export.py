"""``baton metrics export``: the scorecards straight from the metrics database, as CSV or JSON."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from baton.cli import app as cli
from services.metrics.app import create_app
from services.metrics.settings import MetricsSettings
from tests.component.test_metrics_dashboard import feed
from tests.metrics_scenario import NOW

pytestmark = pytest.mark.component


async def populate(url: str) -> None:
    app = create_app(MetricsSettings(nats_url="nats://127.0.0.1:1", database_url=url), clock=lambda: NOW)
    await app.state.database.start()
    try:
        await feed(app)
    finally:
        await app.state.database.close()


def test_export_csv_and_json(make_database_url: Callable[[str], str], tmp_path: Path, catalog_path: Path) -> None:
    url = make_database_url("export")
    with ThreadPoolExecutor(max_workers=1) as pool:  # the CLI runs its own event loop, like this helper
        pool.submit(asyncio.run, populate(url)).result()

    runner = CliRunner()
    out = tmp_path / "cards.csv"
    args = ["metrics", "export", "--database-url", url, "--at", NOW.isoformat(), "--catalog", str(catalog_path)]
    result = runner.invoke(cli, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["department"]: r for r in csv.DictReader(io.StringIO(out.read_text()))}
    assert (rows["it"]["received"], rows["it"]["name"], rows["acme-it"]["kind"]) == ("5", "IT Operations", "vendor")
    assert rows["it"]["window_end"] == "2026-11-30T12:00:00+00:00"

    as_json = runner.invoke(cli, [*args, "--format", "json", "--window", "7d"])
    assert as_json.exit_code == 0, as_json.output
    doc = json.loads(as_json.stdout)
    it = next(c for c in doc["departments"] if c["department"] == "it")
    assert (doc["window"]["seconds"], it["provider"]["received"]) == (7 * 86400, 3)
    assert runner.invoke(cli, [*args, "--format", "xml"]).exit_code != 0
