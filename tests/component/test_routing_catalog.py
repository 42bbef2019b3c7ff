"""The catalog is re-read when its file changes; an invalid edit keeps the last good catalog and says why."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from libs.contracts import Catalog
from services.routing.app import create_app
from services.routing.catalog_watch import CatalogWatcher
from services.routing.domain import RoutingRequest, choose
from services.routing.settings import RoutingSettings
from tests.conftest import MakeDatabaseUrl

pytestmark = pytest.mark.component

CATALOG = """\
version: 1
fallback_department: service-desk
departments:
  - slug: service-desk
    name: Service Desk
    categories: [general]
  - slug: it
    name: IT
    categories: [laptop]
  - slug: acme-it
    name: ACME
    kind: vendor
    categories: [laptop]
"""
WITH_RULE = (
    CATALOG
    + """\
rules:
  - name: repairs
    when: {title_keywords: [broken]}
    route_to: acme-it
"""
)
BROKEN = WITH_RULE.replace("route_to: acme-it", "route_to: acme")


def save(path: Path, text: str) -> None:
    """Write and move the mtime forward (a fast double write within one timestamp tick is otherwise invisible)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    after = path.stat().st_mtime_ns
    if after <= before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_a_valid_edit_is_picked_up_and_an_invalid_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    save(path, CATALOG)
    seen: list[Catalog] = []
    watcher = CatalogWatcher(path, on_change=seen.append)
    assert watcher.current.rules == []
    assert watcher.check() is False  # nothing changed

    save(path, WITH_RULE)
    assert watcher.check() is True
    assert [r.name for r in watcher.current.rules] == ["repairs"]
    assert seen == [watcher.current]
    assert choose(watcher.current, RoutingRequest("laptop", "Broken screen")).rule == "rule:repairs"

    good = watcher.current
    save(path, BROKEN)
    assert watcher.check() is False
    assert watcher.current is good  # the last good catalog stays in force
    status = watcher.status()
    assert status["ok"] is False
    assert f"{path}:17: rules[0].route_to: route_to 'acme' is not a department in the catalog" in status["last_error"]
    assert watcher.check() is False  # the same broken file is not re-read every time

    save(path, WITH_RULE + "\n# fixed\n")
    assert watcher.check() is True
    assert watcher.status()["ok"] is True
    assert watcher.status()["last_error"] is None
    assert watcher.reloads == 2


def test_touching_the_file_without_changing_it_is_not_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    save(path, CATALOG)
    watcher = CatalogWatcher(path)
    save(path, CATALOG)
    assert watcher.check() is False
    assert watcher.reloads == 0


def test_a_deleted_file_keeps_the_catalog(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    save(path, CATALOG)
    watcher = CatalogWatcher(path)
    path.unlink()
    assert watcher.check() is False
    assert "cannot read" in (watcher.status()["last_error"] or "")
    assert watcher.current.slugs == ["service-desk", "it", "acme-it"]


async def test_the_service_routes_with_the_reloaded_catalog_and_shows_why_an_edit_was_refused(
    tmp_path: Path, make_database_url: MakeDatabaseUrl
) -> None:
    path = tmp_path / "catalog.yaml"
    save(path, CATALOG)
    app = create_app(RoutingSettings(database_url=make_database_url("routing_reload"), catalog_path=str(path)))
    watcher: CatalogWatcher = app.state.catalog_watcher
    save(path, WITH_RULE)
    watcher.check()
    assert [r.name for r in app.state.processor.catalog.rules] == ["repairs"]
    save(path, BROKEN)
    watcher.check()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://routing") as client:
        listing = (await client.get("/v1/catalog")).json()
        ready = await client.get("/readyz")
    await app.state.database.close()
    assert [r["name"] for r in listing["rules"]] == ["repairs"]
    assert listing["catalog"]["ok"] is False
    assert "rules[0].route_to" in listing["catalog"]["last_error"]
    assert ready.json()["catalog"]["ok"] is False  # reported; readiness itself depends on NATS and the database
