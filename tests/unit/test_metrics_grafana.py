"""The Grafana dashboard (deploy/grafana/baton.json) only queries series that Baton exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from services.metrics.app import create_app
from services.metrics.settings import MetricsSettings

pytestmark = pytest.mark.unit

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "baton.json"


def family(name: str) -> str:
    return re.sub(r"_(bucket|total|count|sum)$", "", name)


def test_every_baton_series_on_the_dashboard_exists(tmp_path: Path) -> None:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    queried = {m for e in exprs for m in re.findall(r"\b(baton_[a-z_]+)", e)}
    assert {
        "baton_open_requests",
        "baton_time_to_accept_seconds_bucket",
        "baton_time_to_resolve_seconds_bucket",
    } <= queried
    settings = MetricsSettings(nats_url="nats://127.0.0.1:1", database_url=f"sqlite+aiosqlite:///{tmp_path}/m.db")
    registry: CollectorRegistry = create_app(settings).state.registry
    exposed = {f.name for f in registry.collect()}
    assert {family(n) for n in queried} - exposed == set()
