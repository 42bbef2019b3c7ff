"""Routing's wiring with FastStream's in-memory ``TestNatsBroker``, and its processor with a fake publish.

``TestNatsBroker`` fakes ack/nak/term and ignores ``Nats-Msg-Id``: it only proves that a canonical
``created`` reaches the batch subscriber and that a ``routed`` event leaves on the right subject
and stream. Delivery semantics (dedupe, redelivery, dead letters) are in tests/integration.
The processor tests below drive ``RoutingProcessor`` directly (real SQLite, fake publish).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from faststream.nats import JStream, NatsMessage, TestNatsBroker

from libs.contracts import Catalog, DeadLetter, Routed, parse_event
from libs.contracts.subjects import STREAM_DLQ, STREAM_EVENTS, STREAM_IN, event_subject
from services.routing import db
from services.routing.app import create_app
from services.routing.domain import routed_event_id
from services.routing.handlers import (
    ROUTED_SUBJECT,
    UNKNOWN_REQUEST_DELIVERIES,
    DeliveryLimit,
    Inbound,
    Outcome,
    RoutingProcessor,
    SequenceGap,
    backoff_delay,
)
from services.routing.settings import RoutingSettings
from tests.conftest import MakeDatabaseUrl

pytestmark = pytest.mark.component

T0 = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)
NOW = datetime(2026, 11, 24, 9, 30, 2, tzinfo=UTC)


def created_doc(request_id: str = "REQ-WIRE0001", **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "created",
        "event_id": f"ev-{request_id}",
        "request_id": request_id,
        "occurred_at": T0.isoformat(),
        "actor": {"department": "hr", "person": "Ana"},
        "title": "Laptop for a new hire",
        "category": "laptop",
        "priority": "high",
        "requester": {"department": "hr", "person": "Ana"},
        "sequence": 1,
        "recorded_at": (T0 + timedelta(seconds=1)).isoformat(),
        "trace_id": "ab" * 16,
    }
    doc.update(overrides)
    return doc


def js_reply(stream_seq: int, delivered: int = 1) -> str:
    """A JetStream ack subject, so that the fake message carries delivery metadata like a real one."""
    return f"$JS.ACK.{STREAM_EVENTS}.routing.{delivered}.{stream_seq}.{stream_seq}.1764000000000000000.0"


# --- wiring with TestNatsBroker ---------------------------------------------------------
async def test_created_reaching_the_handler_publishes_routed(
    tmp_path: Path, catalog: Catalog, make_database_url: MakeDatabaseUrl
) -> None:
    settings = RoutingSettings(database_url=make_database_url("routing_wiring"), catalog_path=str(tmp_path / "unused"))
    app = create_app(settings, catalog=catalog)
    broker = app.state.broker
    seen: list[tuple[str, bytes, dict[str, str]]] = []

    @broker.subscriber(ROUTED_SUBJECT, stream=JStream(STREAM_IN, declare=False))
    async def capture(body: Any, msg: NatsMessage) -> None:
        seen.append((msg.raw_message.subject, msg.body, dict(msg.headers)))

    database: db.Database = app.state.database
    await database.start()
    try:
        async with TestNatsBroker(broker) as br:
            doc = created_doc()
            await br.publish(
                orjson.dumps(doc),
                event_subject(doc["request_id"], "created"),
                stream=STREAM_EVENTS,
                reply_to=js_reply(1),
            )
    finally:
        await database.close()

    assert len(seen) == 1
    subject, body, headers = seen[0]
    assert subject == "baton.svc.routing.routed"
    routed = parse_event(body)
    assert isinstance(routed, Routed)
    assert routed.provider_department == "it"
    assert routed.caused_by == doc["event_id"]
    assert headers["Nats-Msg-Id"] == routed.event_id == routed_event_id(doc["event_id"])


async def test_http_catalog_and_routing_endpoints(catalog: Catalog, make_database_url: MakeDatabaseUrl) -> None:
    app = create_app(RoutingSettings(database_url=make_database_url("routing_http")), catalog=catalog)
    database: db.Database = app.state.database
    processor: RoutingProcessor = app.state.processor
    sent: list[bytes] = []

    async def fake_publish(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        sent.append(body)

    processor.publish = fake_publish
    await database.start()
    try:
        doc = created_doc("REQ-HTTP0001", provider_department="acme-it", category="hardware")
        await processor.process(inbound(doc, seq=1))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://routing") as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            listing = (await client.get("/v1/catalog")).json()
            routing = await client.get("/v1/requests/REQ-HTTP0001/routing")
            missing = await client.get("/v1/requests/REQ-NOTHING1/routing")
            bad = await client.get("/v1/requests/no!/routing")
            metrics = await client.get("/metrics/")
    finally:
        await database.close()

    assert listing["fallback_department"] == catalog.fallback_department
    first = listing["departments"][0]
    assert set(first) == {"slug", "name", "kind", "categories", "timezone", "business_hours", "holidays", "sla"}
    assert [r["name"] for r in listing["rules"]] == [r.name for r in catalog.rules]
    assert listing["catalog"]["ok"] is True
    assert [d["slug"] for d in listing["departments"]] == catalog.slugs
    assert routing.status_code == 200
    (decision,) = routing.json()["decisions"]
    assert decision["provider_department"] == "acme-it"
    assert decision["rule"] == "explicit-provider"
    assert decision["caused_by"] == "ev-REQ-HTTP0001"
    assert orjson.dumps(decision["event"]) == sent[0]
    assert missing.status_code == 404
    assert bad.status_code == 422
    assert metrics.status_code == 200
    assert 'baton_routing_decisions_total{provider_department="acme-it",rule="explicit-provider"} 1.0' in metrics.text


# --- the processor with a fake publish -----------------------------------------------------
@dataclass
class Sent:
    subject: str
    body: bytes
    msg_id: str
    stream: str


class FakePublish:
    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.fail_next = 0

    async def __call__(self, subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise TimeoutError("no PubAck")
        self.sent.append(Sent(subject, body, msg_id, stream))


def inbound(doc: dict[str, Any] | bytes, *, seq: int, subject: str | None = None, delivered: int = 1) -> Inbound:
    data = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    if subject is None:
        assert isinstance(doc, dict)
        subject = event_subject(doc["request_id"], doc["type"])
    return Inbound(subject=subject, data=data, headers={}, stream_sequence=seq, num_delivered=delivered)


@pytest.fixture
async def processor(catalog: Catalog, make_database_url: MakeDatabaseUrl) -> Any:
    database = db.Database(make_database_url("routing_processor"))
    await database.start()
    clock = iter(NOW + timedelta(seconds=i) for i in range(1000))
    proc = RoutingProcessor(database, catalog, FakePublish(), clock=lambda: next(clock))
    yield proc
    await database.close()


async def test_redelivery_republishes_the_stored_bytes(processor: RoutingProcessor) -> None:
    fake: FakePublish = processor.publish  # type: ignore[assignment]
    doc = created_doc("REQ-REDELIV1")
    assert await processor.process(inbound(doc, seq=1)) is Outcome.ROUTED
    assert await processor.process(inbound(doc, seq=1, delivered=2)) is Outcome.REPUBLISHED
    first, second = fake.sent
    assert first == second  # same bytes, although the clock moved on
    assert (first.subject, first.stream, first.msg_id) == (ROUTED_SUBJECT, STREAM_IN, routed_event_id(doc["event_id"]))
    routed = parse_event(first.body)
    assert isinstance(routed, Routed)
    assert routed.occurred_at == NOW
    # it: high -> accept within 1 h of IT's business time from the handoff (Tuesday 10:30 in Paris)
    assert routed.accept_by == NOW + timedelta(hours=1)


async def test_publish_failure_after_commit_is_repaired_by_redelivery(processor: RoutingProcessor) -> None:
    fake: FakePublish = processor.publish  # type: ignore[assignment]
    fake.fail_next = 1
    doc = created_doc("REQ-CRASH001")
    with pytest.raises(TimeoutError):
        await processor.process(inbound(doc, seq=1))
    assert await processor.process(inbound(doc, seq=1, delivered=2)) is Outcome.REPUBLISHED
    (only,) = fake.sent
    assert parse_event(only.body).occurred_at == NOW  # the decision made before the failure


async def test_other_event_types_are_ignored(processor: RoutingProcessor) -> None:
    fake: FakePublish = processor.publish  # type: ignore[assignment]
    accepted = {
        "type": "accepted",
        "event_id": "ev-accepted-01",
        "request_id": "REQ-IGNORE01",
        "occurred_at": T0.isoformat(),
        "actor": {"department": "it", "person": "Bo"},
        "assignee": "Bo",
        "eta": (T0 + timedelta(days=1)).isoformat(),
        "sequence": 3,
    }
    with pytest.raises(SequenceGap):  # its created may still be in flight at another replica: wait a little
        await processor.process(inbound(accepted, seq=7))
    assert await processor.process(inbound(accepted, seq=7, delivered=UNKNOWN_REQUEST_DELIVERIES)) is Outcome.IGNORED
    assert fake.sent == []


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"not json{", "malformed_json"),
        (orjson.dumps({"type": "created", "event_id": "ev-poison-001"}), "validation_failed"),
    ],
)
async def test_poison_is_dead_lettered(processor: RoutingProcessor, data: bytes, code: str) -> None:
    fake: FakePublish = processor.publish  # type: ignore[assignment]
    msg = inbound(data, seq=42, subject="baton.events.REQ-POISON01.created")
    assert await processor.process(msg) is Outcome.DEAD_LETTERED
    (letter_msg,) = fake.sent
    assert (letter_msg.subject, letter_msg.stream) == (f"baton.dlq.routing.{code}", STREAM_DLQ)
    letter = DeadLetter.model_validate_json(letter_msg.body)
    assert letter.dead_letter_id == letter_msg.msg_id == "dlq-routing-42"
    assert letter.code == code
    assert letter.original_stream_sequence == 42
    assert base64.b64decode(letter.payload) == data
    assert letter.event_id == (None if code == "malformed_json" else "ev-poison-001")


async def test_event_on_the_wrong_subject_is_dead_lettered(processor: RoutingProcessor) -> None:
    fake: FakePublish = processor.publish  # type: ignore[assignment]
    doc = created_doc("REQ-WRONGSUB")
    msg = inbound(doc, seq=5, subject="baton.events.REQ-SOMEONE1.created")
    assert await processor.process(msg) is Outcome.DEAD_LETTERED
    assert fake.sent[0].subject == "baton.dlq.routing.subject_mismatch"


@pytest.mark.parametrize(
    ("max_deliver", "delivered", "last"),
    [(3, 2, False), (3, 3, True), (3, 4, True), (-1, 1000, False), (1, 1, True)],
)
def test_delivery_limit(max_deliver: int, delivered: int, last: bool) -> None:
    assert DeliveryLimit(max_deliver).is_last(delivered) is last


def test_redelivery_delay_doubles_per_delivery_up_to_a_cap() -> None:
    assert [backoff_delay(2.0, n) for n in (1, 2, 3, 4, 5, 6, 60)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff_delay(0.1, 0) == 0.1
