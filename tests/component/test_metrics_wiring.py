"""Metrics' wiring with FastStream's in-memory TestNatsBroker: the app's own broker, router and HTTP routes.

The batch pull subscriber works under TestNatsBroker (each publish arrives as a batch of one).
TestNatsBroker fakes ack/nak/term, so these tests spy on them to check the handler's choices;
delivery semantics (real redelivery, Nats-Msg-Id dedupe, ack-after-commit) are in
tests/integration/test_metrics_nats.py against a real nats-server.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from unittest.mock import AsyncMock, patch

import httpx
import pytest
from fastapi import FastAPI
from faststream.nats import JStream, NatsBroker, TestNatsBroker
from faststream.nats.testing import PatchedMessage

from libs.contracts import DeadLetter
from libs.contracts.subjects import CONSUMER_METRICS, SERVICE_CONSUMERS, STREAM_DLQ, STREAM_EVENTS
from services.metrics.app import create_app
from services.metrics.settings import MetricsSettings
from tests.metrics_events import EXPECTED_SEGMENTS, at, lifecycle, subject_and_body

pytestmark = pytest.mark.component

RID = "REQ-COMP0001"
METRICS_CONSUMER = next(c for c in SERVICE_CONSUMERS if c.durable == CONSUMER_METRICS)
NOW = at(40 * 60)


def js_reply(stream_seq: int, delivered: int = 1) -> str:
    """The reply subject a JetStream delivery carries (TestNatsBroker has none): metadata comes from it."""
    return f"$JS.ACK.{STREAM_EVENTS}.{CONSUMER_METRICS}.{delivered}.{stream_seq}.{stream_seq}.{time.time_ns()}.0"


def calls_on_events(spy: Any) -> list[Any]:
    """The spied ack/nak/term calls made on canonical-log messages (not on the test's own DLQ subscriber's)."""
    return [c for c in spy.call_args_list if c.args[0].subject.startswith("baton.events.")]


class Harness:
    def __init__(self, app: FastAPI, broker: NatsBroker, http: httpx.AsyncClient, dlq: list[DeadLetter]) -> None:
        self.app, self.broker, self.http, self.dlq = app, broker, http, dlq
        self._seq = 0

    async def deliver(self, subject: str, body: bytes, *, delivered: int = 1) -> None:
        self._seq += 1
        await self.broker.publish(body, subject, stream=STREAM_EVENTS, reply_to=js_reply(self._seq, delivered))


@pytest.fixture
async def harness(make_database_url: Callable[[str], str]) -> AsyncIterator[Harness]:
    settings = MetricsSettings(nats_url="nats://127.0.0.1:1", database_url=make_database_url("metrics"), retry_delay=3)
    app = create_app(settings, clock=lambda: NOW)
    broker: NatsBroker = app.state.broker
    dlq: list[DeadLetter] = []

    @broker.subscriber("baton.dlq.>", stream=JStream(STREAM_DLQ, declare=False))
    async def capture(letter: DeadLetter) -> None:
        dlq.append(letter)

    await app.state.database.start()  # the lifespan also checks the real consumer: not here
    try:
        async with (
            TestNatsBroker(broker) as _,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metrics") as http,
        ):
            yield Harness(app, broker, http, dlq)
    finally:
        await app.state.database.close()


async def test_lifecycle_out_of_order_with_duplicates_gives_the_timeline(harness: Harness) -> None:
    events = lifecycle(RID)
    for index in (2, 0, 4, 1, 0, 3, 4):
        await harness.deliver(*subject_and_body(events[index]))

    resp = await harness.http.get(f"/v1/requests/{RID}/timeline")
    assert resp.status_code == 200, resp.text
    tl = resp.json()
    assert [e["sequence"] for e in tl["events"]] == [1, 2, 3, 4, 5]
    assert (tl["complete"], tl["state"], tl["holder_department"]) == (True, "resolved", "it")
    assert [(s["kind"], s["department"], s["seconds"]) for s in tl["segments"]] == EXPECTED_SEGMENTS
    assert harness.dlq == []


async def test_metrics_count_projected_events_and_duplicates(harness: Harness) -> None:
    created = lifecycle(RID)[0]
    await harness.deliver(*subject_and_body(created))
    await harness.deliver(*subject_and_body(created))
    text = (await harness.http.get("/metrics/")).text
    assert 'baton_metrics_events_projected_total{type="created"} 1.0' in text
    assert 'baton_metrics_messages_total{outcome="duplicate",type="created"} 1.0' in text


async def test_poison_is_dead_lettered_and_acked(harness: Harness) -> None:
    with (
        patch.object(PatchedMessage, "ack", autospec=True) as ack,
        patch.object(PatchedMessage, "nak", autospec=True) as nak,
    ):
        await harness.deliver(f"baton.events.{RID}.created", b'{"type": "created", "title": 1}')
    assert (len(calls_on_events(ack)), len(calls_on_events(nak))) == (1, 0)
    [letter] = harness.dlq
    assert (letter.service, letter.code) == ("metrics", "validation_failed")
    assert letter.original_subject == f"baton.events.{RID}.created"
    assert base64.b64decode(letter.payload) == b'{"type": "created", "title": 1}'
    assert letter.original_stream_sequence == 1
    assert (await harness.http.get(f"/v1/requests/{RID}/timeline")).status_code == 404


@pytest.mark.parametrize(("delivered", "delay"), [(1, 3.0), (2, 6.0), (4, 24.0), (5, 30.0), (40, 30.0)])
async def test_transient_failure_naks_with_a_growing_delay(harness: Harness, delivered: int, delay: float) -> None:
    failing = AsyncMock(side_effect=RuntimeError("database is down"))
    with (
        patch.object(harness.app.state.processor, "process", failing),
        patch.object(PatchedMessage, "ack", autospec=True) as ack,
        patch.object(PatchedMessage, "nak", autospec=True) as nak,
    ):
        await harness.deliver(*subject_and_body(lifecycle(RID)[0]), delivered=delivered)
    assert len(calls_on_events(ack)) == 0
    [nak_call] = calls_on_events(nak)
    assert nak_call.kwargs == {"delay": delay}  # retry_delay=3, doubled per delivery, capped at 30 s
    assert harness.dlq == []


async def test_last_delivery_failure_is_dead_lettered_and_terminated(harness: Harness) -> None:
    failing = AsyncMock(side_effect=RuntimeError("database is down"))
    with (
        patch.object(harness.app.state.processor, "process", failing),
        patch("services.metrics.handlers.term_with_reason", new_callable=AsyncMock) as term,
        patch.object(PatchedMessage, "nak", autospec=True) as nak,
    ):
        await harness.deliver(*subject_and_body(lifecycle(RID)[0]), delivered=METRICS_CONSUMER.max_deliver)
    # Terminated with the reason (``+TERM dead-lettered by the service``), never nak'd.
    assert (term.await_count, len(calls_on_events(nak))) == (1, 0)
    [letter] = harness.dlq
    assert letter.code == "processing_failed"
    assert "database is down" in letter.message


async def test_http_problems(harness: Harness) -> None:
    unknown = await harness.http.get("/v1/requests/REQ-NOPE0001/timeline")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"
    assert unknown.json()["detail"] == "request REQ-NOPE0001 not found"
    bad = await harness.http.get("/v1/requests/no!/timeline")
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"
    assert (await harness.http.get("/v1/requests", params={"department": "Not A Slug"})).status_code == 422
    assert (await harness.http.get("/healthz")).json() == {"status": "ok"}
    schema = harness.app.openapi()
    assert "/v1/requests/{request_id}/timeline" in schema["paths"]
    assert "from" in schema["components"]["schemas"]["Hold"]["properties"]


async def test_requests_list_by_department(harness: Harness) -> None:
    for rid, count in (("REQ-LIST0001", 5), ("REQ-LIST0002", 2), ("REQ-LIST0003", 1)):
        for event in lifecycle(rid)[:count]:
            await harness.deliver(*subject_and_body(event))

    async def listed(**params: Any) -> list[dict[str, Any]]:
        resp = await harness.http.get("/v1/requests", params=params)
        assert resp.status_code == 200, resp.text
        rows: list[dict[str, Any]] = resp.json()
        return rows

    it = await listed(department="it")
    assert [(r["request_id"], r["state"]) for r in it] == [("REQ-LIST0001", "resolved"), ("REQ-LIST0002", "routed")]
    assert {r["request_id"] for r in await listed(department="marketing")} == {
        "REQ-LIST0001",
        "REQ-LIST0002",
        "REQ-LIST0003",
    }
    assert len(await listed(department="finance")) == 3  # a watcher is party too
    assert await listed(department="legal") == []
    assert len(await listed(limit=2)) == 2
    [first] = await listed(department="it", limit=1)
    assert first["eta"] == "2026-11-25T15:00:00Z"
