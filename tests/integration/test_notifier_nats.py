"""The notifier against a real nats-server and a real database (SQLite, or PostgreSQL with BATON_TEST_DATABASE_URL).

Canonical events are published straight onto ``BATON_EVENTS`` (as intake would append them);
the notifier runs as its real app (``create_app`` + lifespan) on the provisioned ``notifier``
consumer, and each department's notifications are read back from ``BATON_NOTIFY``.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from sqlalchemy import update

from libs.contracts import LifecycleEvent, Notification
from libs.contracts.subjects import CONSUMER_NOTIFIER, STREAM_DLQ, STREAM_EVENTS, STREAM_NOTIFY, event_subject
from services.notifier import db
from services.notifier.app import create_app
from services.notifier.handlers import NotifierProcessor
from services.notifier.settings import NotifierSettings
from tests.conftest import MakeDatabaseUrl
from tests.notifier_events import DELAYED_TEXT, EXPECTED, lifecycle, subject_and_body

pytestmark = pytest.mark.integration


def new_rid() -> str:
    return f"REQ-{uuid.uuid4().hex[:10].upper()}"


@pytest.fixture
async def notifier(
    provisioned_nats: str, make_database_url: MakeDatabaseUrl, catalog_path: Path
) -> AsyncIterator[FastAPI]:
    settings = NotifierSettings(
        nats_url=provisioned_nats,
        database_url=make_database_url("notifier"),
        catalog_path=str(catalog_path),
        fetch_timeout=0.05,
        retry_delay=0.2,
        gap_delay=0.1,
        gap_max_delay=0.4,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def nc(provisioned_nats: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(provisioned_nats)
    yield conn
    await conn.close()


async def publish_event(nc: NATS, event: LifecycleEvent, msg_id: str | None = None) -> None:
    subject, body = subject_and_body(event)
    await nc.jetstream().publish(subject, body, stream=STREAM_EVENTS, headers={"Nats-Msg-Id": msg_id or event.event_id})


async def settle(nc: NATS, within: float = 4.0) -> None:
    """Wait until the notifier has acked every message now in BATON_EVENTS.

    The consumer's ack floor, not its ``num_pending``: the server updates the pending count
    asynchronously, so right after a PubAck it can still read 0.
    """
    jsm = nc.jsm()
    last = (await jsm.stream_info(STREAM_EVENTS)).state.last_seq
    deadline = asyncio.get_running_loop().time() + within
    while True:
        info = await jsm.consumer_info(STREAM_EVENTS, CONSUMER_NOTIFIER)
        if info.ack_floor.stream_seq >= last and info.num_ack_pending == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"notifier consumer not settled after {within}s: {info}")
        await asyncio.sleep(0.02)


@dataclass(frozen=True)
class Stored:
    subject: str
    headers: dict[str, str]
    data: bytes


async def stream_messages(nc: NATS, stream: str) -> list[Stored]:
    """Every message in ``stream`` (each test has its own server: they are all this test's)."""
    jsm = nc.jsm()
    state = (await jsm.stream_info(stream)).state
    out: list[Stored] = []
    if state.messages == 0:
        return out
    for seq in range(state.first_seq, state.last_seq + 1):
        msg = await jsm.get_msg(stream, seq)
        out.append(Stored(msg.subject or "", dict(msg.headers or {}), msg.data or b""))
    return out


async def by_department(nc: NATS) -> dict[str, list[Notification]]:
    got: dict[str, list[Notification]] = defaultdict(list)
    for stored in await stream_messages(nc, STREAM_NOTIFY):
        note = Notification.model_validate_json(stored.data)
        assert stored.subject == f"baton.notify.{note.department}.{note.type}"
        assert stored.headers["Nats-Msg-Id"] == note.notification_id
        got[note.department].append(note)
    return dict(got)


def summary(got: dict[str, list[Notification]]) -> dict[str, list[tuple[str, str]]]:
    return {dept: [(n.type, n.role.value) for n in notes] for dept, notes in got.items()}


async def test_lifecycle_reaches_every_department_once(notifier: FastAPI, nc: NATS) -> None:
    rid = new_rid()
    events = lifecycle(rid)
    for event in events:
        await publish_event(nc, event)
    await settle(nc)

    got = await by_department(nc)
    assert summary(got) == EXPECTED
    for dept, text in DELAYED_TEXT.items():
        (delayed,) = [n for n in got[dept] if n.type == "delayed"]
        assert delayed.text == text.format(rid=rid)
        assert delayed.event == events[3]
        assert (delayed.sequence, delayed.trace_id, delayed.request_id) == (4, events[3].trace_id, rid)
    assert await stream_messages(nc, STREAM_DLQ) == []

    transport = httpx.ASGITransport(app=notifier)
    async with httpx.AsyncClient(transport=transport, base_url="http://notifier") as client:
        listing = await client.get(f"/v1/requests/{rid}/notifications")
        assert listing.status_code == 200
        rows = listing.json()
        assert len(rows) == sum(len(v) for v in EXPECTED.values())
        assert all(r["published"] for r in rows)
        assert {(r["department"], r["type"], r["role"]) for r in rows} == {
            (dept, kind, role) for dept, pairs in EXPECTED.items() for kind, role in pairs
        }
        assert (await client.get("/v1/requests/REQ-UNKNOWN1/notifications")).status_code == 404
        assert (await client.get("/v1/requests/bad id!/notifications")).status_code == 422
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"nats": True, "database": True}
        metrics = await client.get("/metrics/")
        assert "faststream_received_messages_total" in metrics.text


@pytest.mark.parametrize(
    "publish_order",
    [pytest.param((2, 1, 3, 4, 5), id="routed before created"), pytest.param((5, 4, 3, 2, 1), id="all reversed")],
)
async def test_out_of_order_events_are_applied_in_sequence(
    notifier: FastAPI, nc: NATS, publish_order: tuple[int, ...]
) -> None:
    rid = new_rid()
    events = lifecycle(rid)
    for seq in publish_order:
        await publish_event(nc, events[seq - 1])
    await settle(nc)

    got = await by_department(nc)
    assert summary(got) == EXPECTED  # same notifications, published in sequence order per department
    assert [n.sequence for n in got["finance"]] == [1, 2, 3, 4, 5]
    (delayed,) = [n for n in got["legal"] if n.type == "delayed"]
    assert delayed.text == DELAYED_TEXT["legal"].format(rid=rid)  # the ETA it replaced was known
    assert await stream_messages(nc, STREAM_DLQ) == []


async def test_a_redelivered_event_adds_no_notification(notifier: FastAPI, nc: NATS) -> None:
    rid = new_rid()
    events = lifecycle(rid)
    for event in events:
        await publish_event(nc, event)
    await settle(nc)
    before = await stream_messages(nc, STREAM_NOTIFY)

    # The same canonical event again, past the stream's own dedupe (a different Nats-Msg-Id).
    await publish_event(nc, events[0], msg_id=f"copy-{uuid.uuid4().hex}")
    await publish_event(nc, events[3], msg_id=f"copy-{uuid.uuid4().hex}")
    await settle(nc)

    assert await stream_messages(nc, STREAM_NOTIFY) == before
    assert await stream_messages(nc, STREAM_DLQ) == []


async def test_crash_after_the_pubacks_republishes_byte_identical_copies_that_jetstream_drops(
    notifier: FastAPI, nc: NATS
) -> None:
    """The PubAcks came back but the notifier died before recording them: the redelivery publishes the
    stored rows again (same bytes, same Nats-Msg-Id) and BATON_NOTIFY keeps one copy of each."""
    processor: NotifierProcessor = notifier.state.processor
    database: db.Database = notifier.state.database
    rid = new_rid()
    events = lifecycle(rid)
    for event in events:
        await publish_event(nc, event)
    await settle(nc)
    before = await stream_messages(nc, STREAM_NOTIFY)

    async with database.transaction() as session:
        await session.execute(
            update(db.OutboxRow).where(db.OutboxRow.event_id == events[3].event_id).values(published_at=None)
        )
    sent: list[tuple[str, bytes, str]] = []
    real_publish = processor.publish

    async def spy(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        sent.append((subject, body, msg_id))
        await real_publish(subject, body, msg_id=msg_id, stream=stream)

    processor.publish = spy
    await publish_event(nc, events[3], msg_id=f"copy-{uuid.uuid4().hex}")
    await settle(nc)

    originals = {(m.subject, m.data, m.headers["Nats-Msg-Id"]) for m in before if f".{events[3].type}" in m.subject}
    assert len(sent) == 3
    assert set(sent) == originals  # byte-identical, never re-rendered
    assert await stream_messages(nc, STREAM_NOTIFY) == before


async def test_a_failed_publish_after_the_commit_is_repaired_by_redelivery(notifier: FastAPI, nc: NATS) -> None:
    processor: NotifierProcessor = notifier.state.processor
    real_publish = processor.publish
    failed: list[str] = []

    async def flaky(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        if stream == STREAM_NOTIFY and len(failed) < 2 and ".routed" in subject:
            failed.append(subject)
            raise TimeoutError("simulated lost PubAck")
        await real_publish(subject, body, msg_id=msg_id, stream=stream)

    processor.publish = flaky
    rid = new_rid()
    for event in lifecycle(rid):
        await publish_event(nc, event)
    await settle(nc)

    assert len(failed) == 2
    assert summary(await by_department(nc)) == EXPECTED


@pytest.mark.parametrize(
    ("mangle", "code"),
    [
        pytest.param(lambda doc: b"{not json", "invalid_event", id="not JSON"),
        pytest.param(lambda doc: orjson.dumps({**doc, "title": ""}), "invalid_event", id="breaks the contract"),
        pytest.param(
            lambda doc: orjson.dumps({k: v for k, v in doc.items() if k != "sequence"}),
            "unstamped_event",
            id="no sequence",
        ),
    ],
)
async def test_poison_is_dead_lettered_and_acked(notifier: FastAPI, nc: NATS, mangle: Any, code: str) -> None:
    rid = new_rid()
    created, *_ = lifecycle(rid)
    data: bytes = mangle(orjson.loads(subject_and_body(created)[1]))
    subject = event_subject(rid, "created")
    await nc.jetstream().publish(subject, data, stream=STREAM_EVENTS, headers={"Nats-Msg-Id": f"bad-{rid}"})
    good = lifecycle(new_rid())[0]
    await publish_event(nc, good)
    await settle(nc)

    (letter,) = [orjson.loads(m.data) for m in await stream_messages(nc, STREAM_DLQ)]
    assert letter["service"] == "notifier"
    assert letter["code"] == code
    assert letter["original_subject"] == subject
    assert base64.b64decode(letter["payload"]) == data
    got = await by_department(nc)
    assert {n.request_id for notes in got.values() for n in notes} == {good.request_id}  # the next one went through
