"""Routing against a real nats-server and a real database: routed once, deduped, poison dead-lettered.

Each test gets a fresh provisioned server (``provisioned_nats``) and database (``make_database_url``:
SQLite, or PostgreSQL when BATON_TEST_DATABASE_URL is set) and runs the real app under its lifespan.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from libs.contracts import Catalog, DeadLetter, Routed, parse_event
from libs.contracts.subjects import CONSUMER_ROUTING, STREAM_DLQ, STREAM_EVENTS, STREAM_IN, event_subject
from services.routing.app import create_app
from services.routing.domain import RoutingRequest, choose, routed_event_id
from services.routing.handlers import ROUTED_SUBJECT, RoutingProcessor
from services.routing.settings import RoutingSettings
from tests.conftest import MakeDatabaseUrl

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)


def created_doc(request_id: str, **overrides: Any) -> dict[str, Any]:
    """A canonical ``created`` as intake appends it (with its stamps)."""
    doc: dict[str, Any] = {
        "type": "created",
        "event_id": f"ev-{request_id}",
        "request_id": request_id,
        "occurred_at": T0.isoformat(),
        "actor": {"department": "hr", "person": "Ana"},
        "title": "Laptop for a new hire",
        "category": "laptop",
        "priority": "normal",
        "requester": {"department": "hr", "person": "Ana"},
        "sequence": 1,
        "recorded_at": (T0 + timedelta(seconds=1)).isoformat(),
        "trace_id": "ab" * 16,
    }
    doc.update(overrides)
    return doc


def settings_for(url: str, database_url: str, catalog_path: Path) -> RoutingSettings:
    return RoutingSettings(
        nats_url=url,
        database_url=database_url,
        catalog_path=str(catalog_path),
        fetch_timeout=0.05,
        retry_delay=0.1,
        graceful_timeout=2.0,
    )


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app under its lifespan (broker consuming), with an HTTP client on it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://routing") as client:
            yield client


@pytest.fixture
async def nc(provisioned_nats: str) -> AsyncIterator[NATS]:
    client = await nats.connect(provisioned_nats, name="test-routing")
    yield client
    await client.close()


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 4.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def stream_messages(nc: NATS, stream: str) -> list[tuple[str, bytes]]:
    """Every message currently in ``stream``: (subject, data)."""
    jsm = nc.jsm()
    state = (await jsm.stream_info(stream)).state
    out: list[tuple[str, bytes]] = []
    for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
        try:
            msg = await jsm.get_msg(stream, seq)
        except NotFoundError:
            continue
        out.append((str(msg.subject), msg.data or b""))
    return out


def acked_through(nc: NATS, stream_seq: int) -> Callable[[], Awaitable[bool]]:
    """True once routing's consumer acked everything up to ``stream_seq`` and has nothing pending."""

    async def check() -> bool:
        info = await nc.jsm().consumer_info(STREAM_EVENTS, CONSUMER_ROUTING)
        return bool(info.ack_floor.stream_seq >= stream_seq and info.num_ack_pending == 0)

    return check


def count(app: FastAPI, outcome: str) -> float:
    registry: CollectorRegistry = app.state.registry
    return registry.get_sample_value("baton_routing_messages_total", {"outcome": outcome}) or 0.0


async def publish_canonical(nc: NATS, subject: str, body: bytes, msg_id: str) -> int:
    ack = await nc.jetstream().publish(subject, body, stream=STREAM_EVENTS, headers={"Nats-Msg-Id": msg_id})
    return int(ack.seq)


async def test_created_is_routed_once_and_redelivery_republishes_the_same_bytes(
    provisioned_nats: str,
    nc: NATS,
    make_database_url: MakeDatabaseUrl,
    catalog_path: Path,
    catalog: Catalog,
) -> None:
    app = create_app(settings_for(provisioned_nats, make_database_url("routing"), catalog_path))
    doc = created_doc("REQ-NATS0001")
    body = orjson.dumps(doc)
    subject = event_subject(doc["request_id"], "created")
    expected = choose(catalog, RoutingRequest("laptop", doc["title"]))
    assert expected.department is not None

    async with running(app) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text

        seq = await publish_canonical(nc, subject, body, doc["event_id"])
        await until(acked_through(nc, seq), "the created event to be acked")
        routed_msgs = await stream_messages(nc, STREAM_IN)
        assert [s for s, _ in routed_msgs] == [ROUTED_SUBJECT]
        routed = parse_event(routed_msgs[0][1])
        assert isinstance(routed, Routed)
        assert routed.event_id == routed_event_id(doc["event_id"])
        assert (routed.provider_department, routed.rule) == (expected.department.slug, expected.rule)
        assert routed.caused_by == doc["event_id"]
        assert (routed.sequence, routed.recorded_at, routed.trace_id) == (None, None, None)

        # The same canonical event again, under another Nats-Msg-Id: a redelivery as routing sees it.
        seq = await publish_canonical(nc, subject, body, doc["event_id"] + "-again")
        await until(acked_through(nc, seq), "the duplicate to be acked")
        assert count(app, "republished") == 1
        assert count(app, "routed") == 1
        assert await stream_messages(nc, STREAM_IN) == routed_msgs  # deduped by Nats-Msg-Id, same bytes

        decisions = (await client.get(f"/v1/requests/{doc['request_id']}/routing")).json()["decisions"]
        assert len(decisions) == 1
        assert orjson.dumps(decisions[0]["event"]) == routed_msgs[0][1]


async def test_poison_is_dead_lettered_and_does_not_block_the_next_message(
    provisioned_nats: str, nc: NATS, make_database_url: MakeDatabaseUrl, catalog_path: Path
) -> None:
    app = create_app(settings_for(provisioned_nats, make_database_url("routing"), catalog_path))
    garbage = b"\x00not json{"
    good = created_doc("REQ-NATS0002", category="invoice")

    async with running(app):
        poison_seq = await publish_canonical(nc, "baton.events.REQ-NATS0002.created", garbage, "poison-1")
        seq = await publish_canonical(nc, event_subject(good["request_id"], "created"), orjson.dumps(good), "good-1")
        await until(acked_through(nc, seq), "both messages to be acked")
        assert count(app, "dead_lettered") == 1

    dead = await stream_messages(nc, STREAM_DLQ)
    assert [s for s, _ in dead] == ["baton.dlq.routing.malformed_json"]
    letter = DeadLetter.model_validate_json(dead[0][1])
    assert base64.b64decode(letter.payload) == garbage
    assert letter.original_stream_sequence == poison_seq
    assert letter.service == "routing"
    routed = [parse_event(data) for _, data in await stream_messages(nc, STREAM_IN)]
    assert [r.request_id for r in routed] == [good["request_id"]]


async def test_publish_failure_after_commit_is_retried_with_the_stored_event(
    provisioned_nats: str, nc: NATS, make_database_url: MakeDatabaseUrl, catalog_path: Path
) -> None:
    app = create_app(settings_for(provisioned_nats, make_database_url("routing"), catalog_path))
    processor: RoutingProcessor = app.state.processor
    real_publish = processor.publish
    failures = [TimeoutError("no PubAck (injected)")]

    async def flaky_publish(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        if subject == ROUTED_SUBJECT and failures:
            raise failures.pop()
        await real_publish(subject, body, msg_id=msg_id, stream=stream)

    processor.publish = flaky_publish
    doc = created_doc("REQ-NATS0003")

    async with running(app) as client:
        seq = await publish_canonical(nc, event_subject(doc["request_id"], "created"), orjson.dumps(doc), "c-3")
        await until(acked_through(nc, seq), "the created event to be acked after its redelivery")
        assert (count(app, "retried"), count(app, "republished"), count(app, "routed")) == (1, 1, 0)
        stored = (await client.get(f"/v1/requests/{doc['request_id']}/routing")).json()["decisions"][0]["event"]

    routed_msgs = await stream_messages(nc, STREAM_IN)
    assert len(routed_msgs) == 1
    assert routed_msgs[0][1] == orjson.dumps(stored)  # the event decided before the failure, not a new one


async def test_a_message_failing_every_delivery_is_dead_lettered_on_the_last(
    provisioned_nats: str, nc: NATS, make_database_url: MakeDatabaseUrl, catalog_path: Path
) -> None:
    app = create_app(settings_for(provisioned_nats, make_database_url("routing"), catalog_path))
    processor: RoutingProcessor = app.state.processor
    real_publish = processor.publish

    async def broken_publish(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        if subject == ROUTED_SUBJECT:
            # Not transient (a TimeoutError would be waited out on the last delivery, never dead-lettered).
            raise RuntimeError("publish refused (injected, every time)")
        await real_publish(subject, body, msg_id=msg_id, stream=stream)

    processor.publish = broken_publish
    doc = created_doc("REQ-NATS0005")
    # Fewer deliveries than the spec's, to keep the test short: routing reads the limit from the server.
    max_deliver = 3
    jsm = nc.jsm()
    config = (await jsm.consumer_info(STREAM_EVENTS, CONSUMER_ROUTING)).config
    config.max_deliver = max_deliver
    await jsm.add_consumer(STREAM_EVENTS, config)

    async with running(app):
        seq = await publish_canonical(nc, event_subject(doc["request_id"], "created"), orjson.dumps(doc), "c-5")
        assert app.state.delivery_limit.max_deliver == max_deliver
        await until(acked_through(nc, seq), "the message to be given up")
        assert (count(app, "retried"), count(app, "gave_up")) == (max_deliver - 1, 1)

    (dead,) = await stream_messages(nc, STREAM_DLQ)
    assert dead[0] == "baton.dlq.routing.processing_failed"
    letter = DeadLetter.model_validate_json(dead[1])
    assert letter.event_id == doc["event_id"]
    assert "publish refused" in letter.message
    assert await stream_messages(nc, STREAM_IN) == []


async def test_routed_continues_the_trace_of_the_created_event(
    provisioned_nats: str, nc: NATS, make_database_url: MakeDatabaseUrl, catalog_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = settings_for(provisioned_nats, make_database_url("routing"), catalog_path)
    app = create_app(settings, tracer_provider=provider)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    doc = created_doc("REQ-NATS0004", trace_id=trace_id)
    headers = {"Nats-Msg-Id": doc["event_id"], "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}

    async with running(app):
        ack = await nc.jetstream().publish(
            event_subject(doc["request_id"], "created"), orjson.dumps(doc), stream=STREAM_EVENTS, headers=headers
        )
        await until(acked_through(nc, ack.seq), "the created event to be acked")
        routed = await nc.jsm().get_msg(STREAM_IN, 1)
        spans = exporter.get_finished_spans()

    assert routed.headers is not None
    assert routed.headers["traceparent"].split("-")[1] == trace_id
    process = [s for s in spans if s.name == f"process {STREAM_EVENTS}"]
    assert len(process) == 1
    assert process[0].context is not None
    assert format(process[0].context.trace_id, "032x") == trace_id


async def test_startup_fails_clearly_without_the_provisioned_consumer(
    nats_server: Any, make_database_url: MakeDatabaseUrl, catalog_path: Path
) -> None:
    app = create_app(settings_for(nats_server.url, make_database_url("routing"), catalog_path))
    with pytest.raises(RuntimeError, match="run `baton provision` first"):
        async with app.router.lifespan_context(app):
            pass  # pragma: no cover
    await app.state.database.close()


SHORT_SLA = Catalog.model_validate(
    {
        "fallback_department": "ops",
        "departments": [
            {
                "slug": "ops",
                "name": "Ops (24/7)",
                "categories": ["ops-task"],
                "business_hours": {"always": True},
                "sla": {"normal": {"accept_within": 2, "resolve_within": 3600}},
            }
        ],
    }
)


async def test_a_jetstream_scheduled_timer_escalates_a_breach_once(
    provisioned_nats: str, nc: NATS, make_database_url: MakeDatabaseUrl, catalog_path: Path
) -> None:
    """The whole timer path on a real nats-server: clock armed -> schedule in BATON_TIMERS -> due message ->
    sla_warning at 75 % and escalated at the deadline, each once."""
    app = create_app(settings_for(provisioned_nats, make_database_url("routing"), catalog_path), catalog=SHORT_SLA)
    created = created_doc("REQ-TIMER001", category="ops-task", occurred_at=datetime.now(UTC).isoformat())
    async with running(app):
        await publish_canonical(nc, event_subject("REQ-TIMER001", "created"), orjson.dumps(created), "c-t1")

        async def routed_published() -> bool:
            return any(s == ROUTED_SUBJECT for s, _ in await stream_messages(nc, STREAM_IN))

        await until(routed_published, "routed")
        (routed_body,) = [d for s, d in await stream_messages(nc, STREAM_IN) if s == ROUTED_SUBJECT]
        # What intake does with it: append it to the canonical log with its stamps.
        stamped = orjson.loads(routed_body) | {"sequence": 2, "recorded_at": datetime.now(UTC).isoformat()}
        await publish_canonical(nc, event_subject("REQ-TIMER001", "routed"), orjson.dumps(stamped), "c-t2")

        async def notices() -> list[str]:
            return [s for s, _ in await stream_messages(nc, STREAM_IN) if s != ROUTED_SUBJECT]

        async def escalated() -> bool:
            return "baton.svc.routing.escalated" in await notices()

        await until(escalated, "the accept clock to breach", timeout=10)
        await asyncio.sleep(1.0)  # nothing else may come
        assert sorted(await notices()) == ["baton.svc.routing.escalated", "baton.svc.routing.sla_warning"]
        timers = await nc.jsm().stream_info("BATON_TIMERS", subjects_filter="baton.timers.>")
        assert timers.state.subjects is not None
        # Fired schedules are removed; their due messages stay until their TTL. The resolve clock's wait in place.
        assert set(timers.state.subjects) == {
            "baton.timers.due.REQ-TIMER001.ops.accept.1.warning",
            "baton.timers.due.REQ-TIMER001.ops.accept.1.breach",
            "baton.timers.sched.REQ-TIMER001.ops.resolve.1.warning",
            "baton.timers.sched.REQ-TIMER001.ops.resolve.1.breach",
        }
    (body,) = [d for s, d in await stream_messages(nc, STREAM_IN) if s.endswith(".escalated")]
    event = parse_event(body)
    assert event.type == "escalated"
    assert (event.department, event.clock.value, event.episode) == ("ops", "accept", 1)  # type: ignore[union-attr]
    assert 0 <= event.overdue_seconds < 5  # type: ignore[union-attr]


async def test_the_running_service_reloads_its_catalog_file(
    provisioned_nats: str, nc: NATS, make_database_url: MakeDatabaseUrl, catalog_path: Path, tmp_path: Path
) -> None:
    path = tmp_path / "catalog.yaml"
    original = catalog_path.read_text(encoding="utf-8")
    path.write_text(original, encoding="utf-8")
    settings = settings_for(provisioned_nats, make_database_url("routing"), path).model_copy(
        update={"catalog_poll_interval": 0.1}
    )
    app = create_app(settings)
    laptop_rule = "\n  - name: all-laptops-to-vendor\n    when: {categories: [laptop]}\n    route_to: acme-it\n"
    async with running(app) as client:
        path.write_text(original.replace("\nrules:\n", "\nrules:" + laptop_rule, 1), encoding="utf-8")

        async def reloaded() -> bool:
            rules = (await client.get("/v1/catalog")).json()["rules"]
            return any(r["name"] == "all-laptops-to-vendor" for r in rules)

        await until(reloaded, "the edited catalog to be loaded")
        doc = created_doc("REQ-RELOAD01")
        seq = await publish_canonical(nc, event_subject(doc["request_id"], "created"), orjson.dumps(doc), "c-r1")
        await until(acked_through(nc, seq), "the created event to be acked")
        (routed,) = [parse_event(d) for s, d in await stream_messages(nc, STREAM_IN) if s == ROUTED_SUBJECT]
        assert isinstance(routed, Routed)
        assert (routed.provider_department, routed.rule) == ("acme-it", "rule:all-laptops-to-vendor")

        path.write_text(original.replace("fallback_department: service-desk", "fallback_department: nobody"))

        async def refused() -> bool:
            return (await client.get("/readyz")).json()["catalog"]["ok"] is False

        await until(refused, "the broken edit to be refused")
        ready = await client.get("/readyz")
        assert ready.status_code == 200  # still routing, with the last good catalog
        status = ready.json()["catalog"]
        assert f"{path}:" in status["last_error"]
        assert "fallback_department 'nobody' is not a department in the catalog" in status["last_error"]
        assert app.state.processor.catalog.fallback_department == "service-desk"
