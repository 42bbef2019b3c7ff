"""``baton metrics rebuild`` against a real nats-server and database: after a live run with duplicates and
out-of-order deliveries, a rebuild from the canonical log reproduces the live projection exactly.

Set BATON_TEST_DATABASE_URL to run the live projection on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import nats
import pytest
from sqlalchemy import delete, update
from typer.testing import CliRunner

from baton.cli import app as cli
from libs.contracts import dumps
from libs.contracts.subjects import CONSUMER_METRICS, STREAM_EVENTS, event_subject
from services.metrics import db as metrics_db
from services.metrics.app import create_app
from services.metrics.kpis import Window, scorecards, service_map
from services.metrics.rebuild import rebuild
from services.metrics.settings import MetricsSettings
from tests.integration.test_metrics_nats import eventually
from tests.metrics_scenario import EVENTS, NOW, WINDOW

pytestmark = pytest.mark.integration


@pytest.fixture
async def live(provisioned_nats: str, make_database_url: Callable[[str], str]) -> AsyncIterator[dict[str, Any]]:
    settings = MetricsSettings(
        nats_url=provisioned_nats, database_url=make_database_url("live"), fetch_timeout=0.05, graceful_timeout=2
    )
    app = create_app(settings, clock=lambda: NOW)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metrics") as http,
    ):
        yield {"app": app, "http": http, "url": settings.database_url, "nats": provisioned_nats}


async def publish_scenario_shuffled(nats_url: str, seed: int) -> int:
    """Every scenario event once, a third of them twice more (new Nats-Msg-Id: the stream stores the copy),
    in an order where each request's events arrive shuffled. Returns how many messages were stored."""
    rng = random.Random(seed)
    messages = []
    for events in EVENTS.values():
        for event in events:
            messages.append((event, "a"))
            if rng.random() < 0.33:
                messages.append((event, "b"))
    rng.shuffle(messages)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for event, tag in messages:
            ack = await js.publish(
                event_subject(event.request_id, event.type),
                dumps(event),
                stream=STREAM_EVENTS,
                headers={"Nats-Msg-Id": f"{event.event_id}-{tag}"},
            )
            assert not ack.duplicate
    finally:
        await nc.close()
    return len(messages)


async def settled(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()

        async def probe() -> bool | None:
            info = await js.consumer_info(STREAM_EVENTS, CONSUMER_METRICS)
            return True if info.num_pending == 0 and info.num_ack_pending == 0 else None

        await eventually(probe, within=30, what="the live metrics consumer drained")
    finally:
        await nc.close()


async def test_rebuild_reproduces_the_live_projection_exactly(live: dict[str, Any], tmp_path: Any) -> None:
    stored = await publish_scenario_shuffled(live["nats"], seed=11)
    await settled(live["nats"])
    distinct = sum(len(e) for e in EVENTS.values())
    assert stored > distinct  # duplicates really were stored in the log

    live_cards = (await live["http"].get("/v1/scorecards", params={"window": "30d"})).json()
    live_map = (await live["http"].get("/v1/service-map", params={"window": "30d"})).json()
    assert {c["department"] for c in live_cards["departments"]} >= {"it", "acme-it", "finance"}

    report = await rebuild(live["nats"], live["url"], scratch_url=f"sqlite+aiosqlite:///{tmp_path}/scratch.db")
    assert report.messages == stored
    assert report.outcomes == {"projected": distinct, "duplicate": stored - distinct}
    assert report.refused == {}
    assert report.identical, report.differences
    assert report.differences["facts"] == {"only_live": 0, "only_rebuilt": 0, "different": 0}

    # The numbers computed from the rebuilt projection are the live numbers, to the last digit.
    scratch = metrics_db.Database(f"sqlite+aiosqlite:///{tmp_path}/scratch.db")
    try:
        async with scratch.transaction() as session:
            facts = await metrics_db.load_facts(session)
    finally:
        await scratch.close()
    window = Window.ending(NOW, WINDOW)
    assert scorecards(facts, window, NOW).model_dump(mode="json")["departments"] == live_cards["departments"]
    assert service_map(facts, window, NOW).model_dump(mode="json")["edges"] == live_map["edges"]
    assert live_cards["departments"][0]["provider"]["received"] == 2  # acme-it: the scenario really went through


async def test_rebuild_replace_repairs_a_damaged_projection(live: dict[str, Any]) -> None:
    await publish_scenario_shuffled(live["nats"], seed=5)
    await settled(live["nats"])
    before = (await live["http"].get("/v1/scorecards")).json()
    database: metrics_db.Database = live["app"].state.database
    async with database.transaction() as session:
        await session.execute(delete(metrics_db.FactsRow).where(metrics_db.FactsRow.request_id == "REQ-R3-VENDR"))
        await session.execute(delete(metrics_db.PartyRow).where(metrics_db.PartyRow.department == "hr"))
        await session.execute(
            update(metrics_db.EventRow).where(metrics_db.EventRow.request_id == "REQ-R1-WKEND").values(type="x")
        )
    damaged = await rebuild(live["nats"], live["url"])
    assert not damaged.identical
    assert damaged.differences["facts"]["only_rebuilt"] == 1
    assert damaged.differences["parties"]["only_rebuilt"] == 3  # hr: R3 (requester, actor), R6 (requester)
    assert damaged.differences["events"]["different"] == 5

    repaired = await rebuild(live["nats"], live["url"], replace=True)
    assert repaired.replaced
    assert (await live["http"].get("/v1/scorecards")).json() == before

    # the command line: exit status 0 when the rebuilt projection is identical
    args = ["metrics", "rebuild", "--nats-url", live["nats"], "--database-url", live["url"]]
    result = await asyncio.to_thread(CliRunner().invoke, cli, args)
    assert result.exit_code == 0, result.output
    assert "the rebuilt projection is identical to the live one" in result.output
