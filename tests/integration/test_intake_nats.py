"""Intake against a real nats-server and a real database (SQLite, or PostgreSQL in CI)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from baton.cmd_tokens import issue_token
from libs.contracts.subjects import STREAM_DLQ, STREAM_EVENTS, STREAM_NOTIFY, inbound_subject, service_subject
from services.intake.app import create_app
from services.intake.settings import IntakeSettings
from tests.intake_events import T0, created, env, intake_settled, new_rid, publish, read_stream, routed

pytestmark = pytest.mark.integration


@pytest.fixture
def operator_token(tmp_path: Path) -> str:
    return issue_token(tmp_path / "tokens.yaml", None)[1]


@pytest.fixture
async def intake(
    provisioned_nats: str, make_database_url: Callable[[str], str], tmp_path: Path, operator_token: str
) -> AsyncIterator[Any]:
    settings = IntakeSettings(
        nats_url=provisioned_nats,
        database_url=make_database_url("intake"),
        fetch_timeout=0.05,
        retry_delay=0.2,
        tokens_path=tmp_path / "tokens.yaml",
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def nc(provisioned_nats: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(provisioned_nats)
    yield conn
    await conn.close()


async def test_lifecycle_lands_in_the_canonical_log_with_sequences(intake: Any, nc: NATS, operator_token: str) -> None:
    rid = new_rid()
    await publish(nc, inbound_subject("marketing", "created"), created(rid))
    await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.created", 1)
    await publish(nc, service_subject("routing", "routed"), routed(rid))
    await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.routed", 1)
    accepted = env("accepted", rid, "it", 2) | {"assignee": "Sam", "eta": (T0 + timedelta(days=1)).isoformat()}
    await publish(nc, inbound_subject("it", "accepted"), accepted)
    delayed = env("delayed", rid, "it", 3) | {"reason": "backorder", "new_eta": (T0 + timedelta(days=2)).isoformat()}
    await publish(nc, inbound_subject("it", "delayed"), delayed)
    resolved = env("resolved", rid, "it", 4) | {"resolution": "delivered", "outcome": "done"}
    await publish(nc, inbound_subject("it", "resolved"), resolved)

    log = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 5)
    assert [(e["type"], e["sequence"]) for e in log] == [
        ("created", 1),
        ("routed", 2),
        ("accepted", 3),
        ("delayed", 4),
        ("resolved", 5),
    ]
    assert len({e["trace_id"] for e in log}) == 1
    assert all(e["recorded_at"] for e in log)

    transport = httpx.ASGITransport(app=intake)
    auth = {"Authorization": f"Bearer {operator_token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://intake", headers=auth) as client:
        state = (await client.get(f"/v1/requests/{rid}")).json()
        assert (state["state"], state["holder_department"], state["sequence"]) == ("resolved", "it", 5)
        assert (await client.get("/v1/requests/REQ-UNKNOWN1")).status_code == 404
        assert (await client.get("/v1/requests/bad id")).status_code == 422


async def test_same_event_twice_has_one_effect_and_a_reused_id_is_a_conflict(intake: Any, nc: NATS) -> None:
    rid = new_rid()
    event = created(rid)
    # Different Nats-Msg-Ids get past the stream's duplicate window: intake itself must dedupe.
    await publish(nc, inbound_subject("marketing", "created"), event, msg_id="retry-1-" + event["event_id"])
    await publish(nc, inbound_subject("marketing", "created"), event, msg_id="retry-2-" + event["event_id"])
    conflicting = event | {"title": "Something else"}
    await publish(nc, inbound_subject("marketing", "created"), conflicting, msg_id="retry-3-" + event["event_id"])

    rejections = await read_stream(nc, STREAM_NOTIFY, "baton.notify.marketing.rejected", 1)
    mine = [r for r in rejections if r.get("request_id") == rid]
    assert [r["code"] for r in mine] == ["id_conflict"]
    log = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 1)
    assert len(log) == 1
    assert log[0]["title"] == "Laptop for new hire"


@pytest.mark.parametrize(
    ("subject", "payload", "code", "notified"),
    [
        ("baton.in.marketing.created", b"{this is not json", "malformed_json", "marketing"),
        ("baton.in.marketing.created", "missing-title", "validation_failed", "marketing"),
        ("baton.in.MARKETING.created", "valid", "bad_subject", None),
        ("baton.in.finance.created", "valid", "subject_mismatch", "finance"),
    ],
)
async def test_malformed_events_are_explained_dead_lettered_and_harmless(
    intake: Any, nc: NATS, subject: str, payload: Any, code: str, notified: str | None
) -> None:
    rid = new_rid()
    body = created(rid)
    if payload == "missing-title":
        del body["title"]
    data = payload if isinstance(payload, bytes) else orjson.dumps(body)
    await publish(nc, subject, data, msg_id=f"bad-{uuid.uuid4().hex}")
    good_rid = new_rid()
    await publish(nc, inbound_subject("hr", "created"), created(good_rid, "hr"))

    # the good event right behind it is unaffected
    assert len(await read_stream(nc, STREAM_EVENTS, f"baton.events.{good_rid}.*", 1)) == 1
    letters = await read_stream(nc, STREAM_DLQ, f"baton.dlq.intake.{code}", 1)
    assert any(base64.b64decode(letter["payload"]) == data for letter in letters)
    letter = next(letter for letter in letters if base64.b64decode(letter["payload"]) == data)
    assert letter["original_subject"] == subject
    assert letter["message"]
    if notified:
        notices = await read_stream(nc, STREAM_NOTIFY, f"baton.notify.{notified}.rejected", 1)
        notice = next(n for n in notices if n["subject"] == subject and n["code"] == code)
        assert notice["message"]
        if code == "validation_failed":
            assert notice["event_id"] == body["event_id"]
            assert {"loc": ["title"], "code": "missing", "message": "Field required"} in notice["errors"]
    # nothing from the bad event reached the log
    assert await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 0, within=0.5) == []


async def test_crash_between_commit_and_publish_is_repaired_by_redelivery(intake: Any, nc: NATS) -> None:
    """The canonical publish fails once after the commit: the redelivery publishes it, exactly once."""
    processor = intake.state.processor
    real_publish = processor.publish
    failed: list[str] = []

    async def flaky(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        if stream == STREAM_EVENTS and not failed:
            failed.append(subject)
            raise TimeoutError("simulated lost PubAck")
        await real_publish(subject, body, msg_id=msg_id, stream=stream)

    processor.publish = flaky
    rid = new_rid()
    await publish(nc, inbound_subject("marketing", "created"), created(rid))
    log = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 1)
    assert failed == [f"baton.events.{rid}.created"]
    await intake_settled(nc)  # the redelivery is handled: any second copy would be in the log now
    log = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 1)
    assert len(log) == 1
    assert log[0]["sequence"] == 1


async def test_illegal_transition_is_refused_and_changes_nothing(intake: Any, nc: NATS) -> None:
    rid = new_rid()
    await publish(nc, inbound_subject("marketing", "created"), created(rid))
    await publish(nc, service_subject("routing", "routed"), routed(rid))
    resolve = env("resolved", rid, "it", 3) | {"resolution": "done", "outcome": "done"}
    await publish(nc, inbound_subject("it", "resolved"), resolve)  # before accepted
    wrong = env("accepted", rid, "legal", 3) | {"assignee": "X", "eta": (T0 + timedelta(days=1)).isoformat()}
    await publish(nc, inbound_subject("legal", "accepted"), wrong)  # not the holder

    it_notices = await read_stream(nc, STREAM_NOTIFY, "baton.notify.it.rejected", 1)
    assert any(n["request_id"] == rid and n["code"] == "illegal_transition" for n in it_notices)
    legal_notices = await read_stream(nc, STREAM_NOTIFY, "baton.notify.legal.rejected", 1)
    assert any(n["request_id"] == rid and n["code"] == "not_allowed" for n in legal_notices)
    log = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 2)
    assert [e["type"] for e in log] == ["created", "routed"]


async def test_a_transient_failure_does_not_let_a_later_event_overtake(
    intake: Any, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database hiccups on 'accepted'; the 'delayed' right behind it must still come after it."""
    from sqlalchemy.exc import OperationalError

    rid = new_rid()
    await publish(nc, inbound_subject("marketing", "created"), created(rid))
    await publish(nc, service_subject("routing", "routed"), routed(rid))
    await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.routed", 1)

    from services.intake import handlers

    real_decide = handlers.decide  # type: ignore[attr-defined]  # in the transaction, on both paths
    failures = [OperationalError("UPDATE requests", {}, Exception("database is locked"))] * 2

    def hiccup(current: Any, event: Any) -> Any:
        if event.type == "accepted" and failures:
            raise failures.pop()
        return real_decide(current, event)

    monkeypatch.setattr(handlers, "decide", hiccup)
    accepted = env("accepted", rid, "it", 2) | {"assignee": "Sam", "eta": (T0 + timedelta(days=1)).isoformat()}
    delayed = env("delayed", rid, "it", 3) | {"reason": "backorder", "new_eta": (T0 + timedelta(days=2)).isoformat()}
    await publish(nc, inbound_subject("it", "accepted"), accepted)
    await publish(nc, inbound_subject("it", "delayed"), delayed)

    log = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 4)
    assert [(e["type"], e["sequence"]) for e in log] == [("created", 1), ("routed", 2), ("accepted", 3), ("delayed", 4)]
    assert not failures
