"""Metrics against a real nats-server (provisioned like production) and a real database.

The app runs as built by ``create_app(settings)`` with its lifespan; HTTP goes through
``httpx.ASGITransport``. Set BATON_TEST_DATABASE_URL to run these on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from unittest.mock import patch

import httpx
import nats
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from libs.contracts import DeadLetter, dumps
from libs.contracts.subjects import CONSUMER_METRICS, STREAM_DLQ, STREAM_EVENTS, dlq_subject
from services.metrics import db as metrics_db
from services.metrics.app import create_app
from services.metrics.handlers import Inbound, MetricsProcessor, Outcome
from services.metrics.settings import MetricsSettings
from tests.metrics_events import EXPECTED_HOLDS, EXPECTED_SEGMENTS, at, lifecycle, subject_and_body

pytestmark = pytest.mark.integration

T = TypeVar("T")
NOW = at(40 * 60)


async def eventually(probe: Callable[[], Awaitable[T | None]], *, within: float = 5.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something other than None (or fail after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s")
        await asyncio.sleep(0.05)


class Running:
    def __init__(self, app: FastAPI, http: httpx.AsyncClient, nc: NATS, js: JetStreamContext) -> None:
        self.app, self.http, self.nc, self.js = app, http, nc, js

    async def publish(self, subject: str, body: bytes, msg_id: str) -> int:
        ack = await self.js.publish(subject, body, stream=STREAM_EVENTS, headers={"Nats-Msg-Id": msg_id})
        assert not ack.duplicate
        seq: int = ack.seq
        return seq

    async def timeline(self, rid: str) -> httpx.Response:
        return await self.http.get(f"/v1/requests/{rid}/timeline")

    async def settled(self) -> None:
        """Wait until the metrics consumer has nothing pending and nothing unacked."""

        async def probe() -> bool | None:
            info = await self.js.consumer_info(STREAM_EVENTS, CONSUMER_METRICS)
            return True if info.num_pending == 0 and info.num_ack_pending == 0 else None

        await eventually(probe, what="metrics consumer drained and acked")

    async def dead_letter(self, code: str) -> DeadLetter:
        async def probe() -> DeadLetter | None:
            try:
                msg = await self.js.get_last_msg(STREAM_DLQ, dlq_subject("metrics", code))
            except nats.js.errors.NotFoundError:
                return None
            return DeadLetter.model_validate_json(msg.data or b"")

        return await eventually(probe, what=f"a dead letter {code}")


@pytest.fixture
async def running(provisioned_nats: str, make_database_url: Callable[[str], str]) -> AsyncIterator[Running]:
    settings = MetricsSettings(
        nats_url=provisioned_nats,
        database_url=make_database_url("metrics"),
        fetch_timeout=0.05,
        retry_delay=0.2,
        graceful_timeout=2,
    )
    app = create_app(settings, clock=lambda: NOW)
    nc = await nats.connect(provisioned_nats, connect_timeout=2, max_reconnect_attempts=1)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metrics") as http,
        ):
            yield Running(app, http, nc, nc.jetstream(timeout=5))
    finally:
        await nc.close()


async def test_out_of_order_lifecycle_with_a_republished_duplicate(running: Running) -> None:
    rid = "REQ-INTG0001"
    events = lifecycle(rid)
    order = [(2, "a"), (0, "a"), (4, "a"), (1, "a"), (0, "again"), (3, "a")]  # created published twice
    for index, tag in order:
        subject, body = subject_and_body(events[index])
        await running.publish(subject, body, msg_id=f"{events[index].event_id}-{tag}")

    async def complete() -> dict[str, Any] | None:
        resp = await running.timeline(rid)
        doc: dict[str, Any] = resp.json()
        return doc if resp.status_code == 200 and doc["complete"] else None

    tl = await eventually(complete, what="a complete timeline")
    await running.settled()

    assert [e["sequence"] for e in tl["events"]] == [1, 2, 3, 4, 5]
    assert [e["type"] for e in tl["events"]] == ["created", "routed", "accepted", "delayed", "resolved"]
    assert [e["event_id"] for e in tl["events"]] == [e.event_id for e in events]
    assert (tl["state"], tl["missing_sequences"], tl["holder_department"]) == ("resolved", [], "it")
    assert (tl["title"], tl["requester_department"], tl["trace_id"]) == (
        "Laptop for new hire",
        "marketing",
        events[0].trace_id,
    )
    assert [{k: h[k] for k in ("department", "role", "from", "to")} for h in tl["holds"]] == EXPECTED_HOLDS
    assert [(s["kind"], s["department"], s["seconds"]) for s in tl["segments"]] == EXPECTED_SEGMENTS
    assert tl["deadlines"]["eta"] == "2026-11-25T15:00:00Z"
    assert tl["sla"] == {"accept_breached": False, "resolve_breached": True}
    assert tl["events"][3]["summary"] == "Sam (it) moved the ETA to 2026-11-25 15:00 UTC: supplier backorder"

    metrics = (await running.http.get("/metrics/")).text
    assert 'baton_metrics_events_projected_total{type="created"} 1.0' in metrics
    assert 'baton_metrics_messages_total{outcome="duplicate",type="created"} 1.0' in metrics

    async with running.app.state.database.transaction() as session:
        rows = await metrics_db.request_events(session, rid)
    assert [r.canonical.encode() for r in rows] == [dumps(e) for e in events]  # stored verbatim, once each

    listed = (await running.http.get("/v1/requests", params={"department": "it"})).json()
    assert [(r["request_id"], r["state"], r["complete"]) for r in listed] == [(rid, "resolved", True)]


async def test_gap_then_fill(running: Running) -> None:
    rid = "REQ-INTG0002"
    events = lifecycle(rid)
    for event in (events[0], events[2]):
        await running.publish(*subject_and_body(event), msg_id=event.event_id)
    await running.settled()
    tl = (await running.timeline(rid)).json()
    assert (tl["complete"], tl["missing_sequences"], tl["state"], tl["derived_through"]) == (False, [2], "created", 1)

    await running.publish(*subject_and_body(events[1]), msg_id=events[1].event_id)
    await running.settled()
    tl = (await running.timeline(rid)).json()
    assert (tl["complete"], tl["state"], tl["derived_through"]) == (True, "accepted", 3)


async def test_poison_and_conflicts_are_dead_lettered_and_acked(running: Running) -> None:
    rid = "REQ-INTG0003"
    garbage_seq = await running.publish(f"baton.events.{rid}.created", b"{not json", msg_id="garbage-1")
    letter = await running.dead_letter("malformed_json")
    assert (letter.service, letter.original_stream_sequence) == ("metrics", garbage_seq)

    created = lifecycle(rid)[0]
    await running.publish(*subject_and_body(created), msg_id=created.event_id)
    impostor = created.model_copy(update={"event_id": f"{rid}-other"})  # same request and sequence, new id
    await running.publish(*subject_and_body(impostor), msg_id=impostor.event_id)
    conflict = await running.dead_letter("sequence_conflict")
    assert conflict.event_id == impostor.event_id

    await running.settled()
    info = await running.js.consumer_info(STREAM_EVENTS, CONSUMER_METRICS)
    assert info.delivered.consumer_seq == 3  # three messages, three deliveries: poison never loops
    tl = (await running.timeline(rid)).json()
    assert [e["event_id"] for e in tl["events"]] == [created.event_id]


async def test_transient_failure_is_redelivered_then_projected(running: Running) -> None:
    rid = "REQ-INTG0004"
    real_insert = metrics_db.insert_events
    calls = 0

    async def flaky(session: Any, rows: Any) -> list[metrics_db.Stored]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database went away")
        return await real_insert(session, rows)

    processor: MetricsProcessor = running.app.state.processor
    real_process = processor.process
    deliveries: list[tuple[int, int]] = []

    async def recording(msg: Inbound) -> Outcome:
        deliveries.append((msg.stream_sequence, msg.num_delivered))
        return await real_process(msg)

    created = lifecycle(rid)[0]
    with patch.object(metrics_db, "insert_events", flaky), patch.object(processor, "process", recording):
        await running.publish(*subject_and_body(created), msg_id=created.event_id)

        async def projected() -> bool | None:
            return True if (await running.timeline(rid)).status_code == 200 else None

        await eventually(projected, what="the event projected after a redelivery")
    await running.settled()
    assert calls == 2
    assert [delivered for _seq, delivered in deliveries] == [1, 2]  # naked, then redelivered by the server
    assert len({seq for seq, _delivered in deliveries}) == 1


async def test_readyz_and_unknown_request(running: Running) -> None:
    ready = await running.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"nats": True, "database": True}}
    unknown = await running.timeline("REQ-UNKNOWN1")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"
