"""The notifier's wiring with FastStream's in-memory ``TestNatsBroker``, and its processor with a fake publish.

``TestNatsBroker`` fakes ack/nak/term and ignores ``Nats-Msg-Id``: here the fake message's
ack/nak/term are recorded to check *which* one the handler chose (the batch pull subscriber
works under the test broker; each publish arrives as a batch of one). That redelivery really
happens, that JetStream drops republished copies, and that out-of-order events come back is
proved against a real server in tests/integration/test_notifier_nats.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from faststream.nats import JStream, NatsMessage, TestNatsBroker
from faststream.nats.testing import PatchedMessage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs.contracts import Catalog, DeadLetter, LifecycleEvent, Notification, dumps
from libs.contracts.subjects import STREAM_DLQ, STREAM_EVENTS, STREAM_NOTIFY, event_subject
from services.notifier import db
from services.notifier.app import create_app
from services.notifier.domain import Directory
from services.notifier.handlers import CONSUMER_SPEC, Inbound, NotifierProcessor, Outcome
from services.notifier.settings import NotifierSettings
from tests.conftest import MakeDatabaseUrl
from tests.notifier_events import EXPECTED, lifecycle, subject_and_body

pytestmark = pytest.mark.component

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def js_reply(stream_seq: int, delivered: int = 1) -> str:
    """A JetStream ack subject, so that the fake message carries delivery metadata like a real one."""
    return f"$JS.ACK.{STREAM_EVENTS}.notifier.{delivered}.{stream_seq}.{stream_seq}.1764000000000000000.0"


@dataclass
class Captured:
    subject: str
    body: bytes
    headers: dict[str, str]


@pytest.fixture
def settlements(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, float | None]]:
    """(subject, "ack" | "nak" | "term", delay) for every settlement of a fake canonical event message."""
    seen: list[tuple[str, str, float | None]] = []

    def record(msg: PatchedMessage, what: str, delay: float | None = None) -> None:
        if msg.subject.startswith("baton.events."):  # not the capture subscribers' own acks
            seen.append((msg.subject, what, delay))

    async def ack(self: PatchedMessage) -> None:
        record(self, "ack")

    async def nak(self: PatchedMessage, delay: float | None = None) -> None:
        record(self, "nak", delay)

    async def term(self: PatchedMessage) -> None:
        record(self, "term")

    async def term_with_reason(msg: PatchedMessage, reason: str = "") -> None:
        record(msg, "term")

    monkeypatch.setattr(PatchedMessage, "ack", ack)
    monkeypatch.setattr(PatchedMessage, "nak", nak)
    monkeypatch.setattr(PatchedMessage, "term", term)
    # Services terminate with a reason (``+TERM <reason>``, written on the raw message's connection).
    monkeypatch.setattr("services.notifier.handlers.term_with_reason", term_with_reason)
    return seen


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def app(
    catalog: Catalog, make_database_url: MakeDatabaseUrl, spans: InMemorySpanExporter
) -> AsyncIterator[FastAPI]:
    settings = NotifierSettings(database_url=make_database_url("notifier_wiring"), retry_delay=3.0, gap_delay=0.25)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    application = create_app(settings, catalog=catalog, tracer_provider=provider)
    database: db.Database = application.state.database
    await database.start()
    yield application
    await database.close()


@pytest.fixture
def outbox(app: FastAPI) -> list[Captured]:
    """Everything the app publishes to BATON_NOTIFY and BATON_DLQ (subscribers on the in-memory broker)."""
    broker = app.state.broker
    got: list[Captured] = []

    @broker.subscriber("baton.notify.>", stream=JStream(STREAM_NOTIFY, declare=False))
    async def notify(body: Any, msg: NatsMessage) -> None:
        got.append(Captured(msg.raw_message.subject, msg.body, dict(msg.headers)))

    @broker.subscriber("baton.dlq.>", stream=JStream(STREAM_DLQ, declare=False))
    async def dlq(body: Any, msg: NatsMessage) -> None:
        got.append(Captured(msg.raw_message.subject, msg.body, dict(msg.headers)))

    return got


async def send(br: Any, event: LifecycleEvent | bytes, stream_seq: int, delivered: int = 1, subject: str = "") -> None:
    if isinstance(event, bytes):
        body = event
    else:
        subject, body = subject_and_body(event)
    await br.publish(body, subject, stream=STREAM_EVENTS, reply_to=js_reply(stream_seq, delivered))


# --- wiring with TestNatsBroker ---------------------------------------------------------------------


async def test_canonical_events_fan_out_on_department_subjects(
    app: FastAPI,
    outbox: list[Captured],
    settlements: list[tuple[str, str, float | None]],
    spans: InMemorySpanExporter,
) -> None:
    events = lifecycle("REQ-WIRE0001")
    async with TestNatsBroker(app.state.broker) as br:
        for seq, event in enumerate(events, start=1):
            await send(br, event, seq)

    notes = [Notification.model_validate_json(c.body) for c in outbox]
    summary: dict[str, list[tuple[str, str]]] = {}
    for note in notes:
        summary.setdefault(note.department, []).append((note.type, note.role.value))
    assert summary == EXPECTED
    for captured, note in zip(outbox, notes, strict=True):
        assert captured.subject == f"baton.notify.{note.department}.{note.type}"
        assert captured.headers["Nats-Msg-Id"] == note.notification_id
    assert settlements == [(event_subject(e.request_id, e.type), "ack", None) for e in events]
    processed = [s for s in spans.get_finished_spans() if s.name == f"process {STREAM_EVENTS}"]
    assert [s.attributes["messaging.destination.name"] for s in processed if s.attributes] == [
        event_subject(e.request_id, e.type) for e in events
    ]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://notifier") as client:
        metrics = await client.get("/metrics/")
    assert 'baton_notifier_messages_total{outcome="applied"} 5.0' in metrics.text


async def test_an_early_event_is_naked_with_a_delay_and_poison_is_dead_lettered_and_acked(
    app: FastAPI, outbox: list[Captured], settlements: list[tuple[str, str, float | None]]
) -> None:
    routed = lifecycle("REQ-WIRE0002")[1]
    routed_subject = event_subject(routed.request_id, "routed")
    bad_subject = event_subject("REQ-WIRE0002", "created")
    async with TestNatsBroker(app.state.broker) as br:
        await send(br, routed, 7)  # before its created: a gap
        await send(br, routed, 7, delivered=3)
        await send(br, b"{not json", 8, subject=bad_subject)

    assert settlements == [
        (routed_subject, "nak", 0.25),
        (routed_subject, "nak", 1.0),  # the delay grows with each delivery
        (bad_subject, "ack", None),
    ]
    (letter,) = outbox
    assert letter.subject == "baton.dlq.notifier.invalid_event"
    dead = DeadLetter.model_validate_json(letter.body)
    assert (dead.original_subject, dead.original_stream_sequence, dead.service) == (bad_subject, 8, "notifier")
    assert letter.headers["Nats-Msg-Id"] == dead.dead_letter_id == "dlq-notifier-8"


async def test_a_failing_publish_naks_and_the_last_delivery_is_dead_lettered_then_termed(
    app: FastAPI, outbox: list[Captured], settlements: list[tuple[str, str, float | None]]
) -> None:
    processor: NotifierProcessor = app.state.processor
    real_publish = processor.publish

    async def no_notify_stream(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        if stream == STREAM_NOTIFY:
            raise RuntimeError("notification refused")  # not transient (a lost PubAck is waited out)
        await real_publish(subject, body, msg_id=msg_id, stream=stream)

    processor.publish = no_notify_stream
    created = lifecycle("REQ-WIRE0003")[0]
    subject = event_subject(created.request_id, "created")
    async with TestNatsBroker(app.state.broker) as br:
        await send(br, created, 1)
        await send(br, created, 1, delivered=CONSUMER_SPEC.max_deliver)  # the last allowed delivery

    assert settlements == [(subject, "nak", 3.0), (subject, "term", None)]
    (letter,) = outbox
    assert letter.subject == "baton.dlq.notifier.processing_failed"
    assert "notification refused" in DeadLetter.model_validate_json(letter.body).message


async def test_http_endpoints(app: FastAPI) -> None:
    processor: NotifierProcessor = app.state.processor
    fake = FakePublish()
    processor.publish = fake
    for seq, event in enumerate(lifecycle("REQ-HTTP0001"), start=1):
        assert (await processor.process(inbound(event, seq))).outcome is Outcome.APPLIED

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://notifier") as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        listing = await client.get("/v1/requests/REQ-HTTP0001/notifications")
        missing = await client.get("/v1/requests/REQ-NOTHING1/notifications")
        bad = await client.get("/v1/requests/no!/notifications")
        metrics = await client.get("/metrics/")

    assert listing.status_code == 200
    rows = listing.json()
    assert [(r["department"], r["type"], r["role"]) for r in rows][:3] == [
        ("finance", "created", "requester"),
        ("legal", "created", "watcher"),
        ("it", "routed", "provider"),
    ]
    assert len(rows) == len(fake.sent) == 12
    sent_ids = [Notification.model_validate_json(s.body).notification_id for s in fake.sent]
    assert [r["notification_id"] for r in rows] == sent_ids
    assert all(r["published"] and r["text"] for r in rows)
    assert missing.status_code == 404
    assert bad.status_code == 422
    assert metrics.status_code == 200
    assert 'baton_notifier_notifications_total{role="provider",type="routed"} 1.0' in metrics.text
    assert 'baton_notifier_notifications_total{role="watcher",type="created"} 1.0' in metrics.text


# --- the processor with a fake publish -----------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    subject: str
    body: bytes
    msg_id: str
    stream: str


class FakePublish:
    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.fail_after: int | None = None  # fail every publish once this many succeeded

    async def __call__(self, subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise TimeoutError("no PubAck")
        self.sent.append(Sent(subject, body, msg_id, stream))


def inbound(event: LifecycleEvent | bytes, seq: int, *, delivered: int = 1, subject: str = "") -> Inbound:
    if isinstance(event, bytes):
        data = event
    else:
        subject, data = subject or event_subject(event.request_id, event.type), dumps(event)
    return Inbound(subject=subject, data=data, headers={}, stream_sequence=seq, num_delivered=delivered)


@pytest.fixture
async def processor(catalog: Catalog, make_database_url: MakeDatabaseUrl) -> AsyncIterator[NotifierProcessor]:
    database = db.Database(make_database_url("notifier_processor"))
    await database.start()
    clock = iter(NOW + timedelta(seconds=i) for i in range(1000))
    yield NotifierProcessor(database, FakePublish(), Directory(catalog), clock=lambda: next(clock))
    await database.close()


def fake_of(processor: NotifierProcessor) -> FakePublish:
    assert isinstance(processor.publish, FakePublish)
    return processor.publish


async def test_a_publish_failure_after_the_commit_is_repaired_with_the_stored_bytes(
    processor: NotifierProcessor,
) -> None:
    fake = fake_of(processor)
    created = lifecycle("REQ-CRASH001")[0]
    fake.fail_after = 1  # finance's notification goes out, legal's PubAck never comes
    with pytest.raises(TimeoutError):
        await processor.process(inbound(created, 1))
    stored = fake.sent[0]
    fake.fail_after = None
    # The clock moved on, but nothing is re-rendered: the rows committed before the failure go out as they are.
    result = await processor.process(inbound(created, 1, delivered=2))
    assert (result.outcome, result.published) == (Outcome.REPUBLISHED, 2)
    again, legal = fake.sent[1:]
    assert again == stored
    assert Notification.model_validate_json(legal.body).created_at == NOW
    # Both PubAcks are recorded now: a third delivery has nothing left to send.
    assert (await processor.process(inbound(created, 1, delivered=3))).published == 0


async def test_a_copy_with_another_event_id_for_an_applied_sequence_is_dead_lettered(
    processor: NotifierProcessor,
) -> None:
    created, routed, *_ = lifecycle("REQ-CONFL001")
    await processor.process(inbound(created, 1))
    await processor.process(inbound(routed, 2))
    impostor = routed.model_copy(update={"event_id": "REQ-CONFL001-other"})
    assert (await processor.process(inbound(impostor, 3))).outcome is Outcome.DEAD_LETTERED
    letter = fake_of(processor).sent[-1]
    assert letter.subject == "baton.dlq.notifier.sequence_conflict"
    assert DeadLetter.model_validate_json(letter.body).event_id == "REQ-CONFL001-other"


async def test_a_gap_waits_with_growing_delays_and_is_dead_lettered_on_the_last_delivery(
    processor: NotifierProcessor,
) -> None:
    accepted = lifecycle("REQ-GAP00001")[2]
    delays = [(await processor.process(inbound(accepted, 3, delivered=n))).retry_in for n in (1, 2, 3, 9)]
    assert delays == [0.5, 1.0, 2.0, 30.0]
    last = await processor.process(inbound(accepted, 3, delivered=CONSUMER_SPEC.max_deliver))
    assert last.outcome is Outcome.DEAD_LETTERED
    (letter,) = fake_of(processor).sent
    assert letter.subject == "baton.dlq.notifier.sequence_gap"
    assert DeadLetter.model_validate_json(letter.body).details == {
        "request_id": "REQ-GAP00001",
        "sequence": 3,
        "expected": 1,
    }


@pytest.mark.parametrize(
    ("changes", "subject_type", "code"),
    [
        pytest.param({"sequence": None}, "routed", "unstamped_event", id="no sequence"),
        pytest.param({}, "created", "subject_mismatch", id="on another type's subject"),
        pytest.param({"sequence": 1}, "routed", "unexpected_event", id="first event is not created"),
    ],
)
async def test_events_that_can_never_apply_are_dead_lettered(
    processor: NotifierProcessor, changes: dict[str, Any], subject_type: str, code: str
) -> None:
    routed = lifecycle("REQ-POISON01")[1]
    event = routed.model_copy(update=changes)
    subject = event_subject(routed.request_id, subject_type)
    data = orjson.dumps(event.model_dump(mode="json", exclude_none=True))
    assert (await processor.process(inbound(data, 5, subject=subject))).outcome is Outcome.DEAD_LETTERED
    (letter,) = fake_of(processor).sent
    assert letter.subject == f"baton.dlq.notifier.{code}"
    assert letter.stream == STREAM_DLQ


# --- the nats-py / FastStream timeout workaround ------------------------------------------------------


async def test_a_batch_holding_an_event_twice_republishes_what_its_first_copy_stored(
    processor: NotifierProcessor,
) -> None:
    """A batch's new rows are inserted at its end, not as ORM objects the session flushes by itself
    (``PendingInserts``): the second copy of an event in the same batch must still find the notifications its
    first copy stored, so they are written before it looks."""
    fake = fake_of(processor)
    created, routed = lifecycle("REQ-TWICE001")[:2]
    batch = [inbound(created, 1), inbound(routed, 2), inbound(created, 3)]
    first, _routed, second = await processor.process_batch(batch, lambda _msg: nullcontext())
    assert first.outcome is Outcome.APPLIED
    assert (second.outcome, second.published) == (Outcome.REPUBLISHED, first.published)
    assert first.published > 0
    ids = [sent.msg_id for sent in fake.sent]
    assert len(ids) == len(set(ids))  # the batch's copies are published once
