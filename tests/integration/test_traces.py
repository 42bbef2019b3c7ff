"""One trace per request, end to end: the four real services, a real nats-server, real databases.

Intake, routing, notifier and metrics run in-process (their ``create_app`` factories under their
lifespans), each with its own tracer provider (its ``service.name``) feeding one in-memory exporter.
A request's whole lifecycle is published with plain nats-py by "department systems" that know
nothing of Baton's trace: ``created`` with no trace context, then ``accepted``, ``delayed``,
``resolved`` and ``feedback``, each published later by another publisher with no or an unrelated
trace context. The accept clock is 4 s, so routing's durable timers fire ``sla_warning`` and
``escalated`` before the request is accepted. A webhook of the provider department receives the
notifications on a local HTTP server.

The span tree is then asserted against one visible table of edges (``EDGES``: producer span ->
consumer span, service by service, like the OpenTelemetry demo's edge tests), message by message.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select, update

from baton.natsserver import NatsServer
from baton.provision import provision
from libs.contracts.catalog_file import load_catalog
from libs.contracts.subjects import (
    CONSUMER_INTAKE,
    CONSUMER_METRICS,
    CONSUMER_NOTIFIER,
    CONSUMER_ROUTING,
    STREAM_EVENTS,
    STREAM_IN,
    STREAM_NOTIFY,
    inbound_subject,
)
from services.intake import db as intake_db
from services.intake.app import create_app as create_intake
from services.intake.settings import IntakeSettings
from services.metrics.app import create_app as create_metrics
from services.metrics.settings import MetricsSettings
from services.notifier.app import create_app as create_notifier
from services.notifier.settings import NotifierSettings
from services.routing import db as routing_db
from services.routing.app import create_app as create_routing
from services.routing.settings import RoutingSettings
from tests.conftest import MakeDatabaseUrl
from tests.intake_events import created, env, routed
from tests.notifier_events import hook_server, write_tokens

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ACCEPT_WITHIN = 4  # seconds, around the clock: the warning (75 %) and the breach fire during the test
CATALOG = f"""\
version: 1
fallback_department: ops
departments:
  - slug: ops
    name: Operations (24/7)
    categories: [ops-task]
    business_hours: {{always: true}}
    sla:
      normal: {{accept_within: {ACCEPT_WITHIN}, resolve_within: 1h}}
  - slug: marketing
    name: Marketing
    categories: [campaign]
"""

#: Free text of the request: none of it may ever appear in a span attribute.
TITLE = "Replace the badge reader of Mrs Example's office"
DESCRIPTION = "The reader at door 4 beeps twice and refuses every badge since Monday."
PERSONAL = [TITLE, DESCRIPTION, "Ana Requester", "Olga Operator", "waiting for a part", "fixed it", "quick"]

#: The span tree of one request, service by service: (producer service, span) -> (consumer service, span).
#: Every parent/child edge in the request's trace must be one of these, and each must occur.
EDGES: set[tuple[tuple[str, str], tuple[str, str]]] = {
    # the canonical log: intake appends, every service consumes
    (("intake", "send baton.events"), ("routing", "process BATON_EVENTS")),
    (("intake", "send baton.events"), ("notifier", "process BATON_EVENTS")),
    (("intake", "send baton.events"), ("metrics", "process BATON_EVENTS")),
    # routing's events (routed, sla_warning, escalated) go back through intake
    (("routing", "send baton.svc.routing"), ("intake", "process BATON_IN")),
    # a department's later event (no or a foreign trace context): under the request's first span, plus a link
    (("intake", "process BATON_IN"), ("intake", "process BATON_IN")),
    # durable SLA timers: armed in routing's span, fired days (here: seconds) later
    (("routing", "send baton.timers.sched"), ("routing", "process BATON_TIMERS")),
    # what each processing span publishes
    (("intake", "process BATON_IN"), ("intake", "send baton.events")),
    (("routing", "process BATON_EVENTS"), ("routing", "send baton.svc.routing")),
    (("routing", "process BATON_EVENTS"), ("routing", "send baton.timers.sched")),
    (("routing", "process BATON_TIMERS"), ("routing", "send baton.svc.routing")),
    (("routing", "process BATON_TIMERS"), ("routing", "send baton.timers.sched")),  # the next timer of the clock
    (("notifier", "process BATON_EVENTS"), ("notifier", "send baton.notify")),
    # webhook deliveries, sent later by the notifier's worker
    (("notifier", "process BATON_EVENTS"), ("notifier", "POST")),
}


def service(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"]).removeprefix("baton-")


def hexid(value: int, width: int = 16) -> str:
    return format(value, f"0{width}x")


def foreign_traceparent() -> tuple[str, str, str]:
    """A department system's own, unrelated trace context: (traceparent, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def settled(nc: NATS) -> bool:
    """Every consumer has acked everything its stream holds."""
    jsm = nc.jsm()
    consumers = {STREAM_IN: [CONSUMER_INTAKE], STREAM_EVENTS: [CONSUMER_ROUTING, CONSUMER_NOTIFIER, CONSUMER_METRICS]}
    for stream, durables in consumers.items():
        last = (await jsm.stream_info(stream)).state.last_seq
        for durable in durables:
            info = await jsm.consumer_info(stream, durable)
            if info.ack_floor.stream_seq < last or info.num_ack_pending:
                return False
    return True


async def messages(nc: NATS, stream: str) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """Every message of ``stream``: (subject, headers, body)."""
    jsm = nc.jsm()
    state = (await jsm.stream_info(stream)).state
    out: list[tuple[str, dict[str, str], dict[str, Any]]] = []
    if state.messages == 0:
        return out
    for seq in range(state.first_seq, state.last_seq + 1):
        msg = await jsm.get_msg(stream, seq)
        out.append((msg.subject or "", dict(msg.headers or {}), orjson.loads(msg.data or b"{}")))
    return out


def envelope(kind: str, rid: str, dept: str, person: str, **body: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "event_id": f"evt-{uuid.uuid4().hex[:16]}",
        "request_id": rid,
        "occurred_at": datetime.now(UTC).isoformat(),
        "actor": {"department": dept, "person": person},
        **body,
    }


async def department_publishes(url: str, event: dict[str, Any], traceparent: str | None = None) -> None:
    """A department's system, on its own connection: plain nats-py, its own (or no) trace context."""
    headers = {"Nats-Msg-Id": event["event_id"]}
    if traceparent:
        headers["traceparent"] = traceparent
    conn = await nats.connect(url)
    try:
        subject = inbound_subject(event["actor"]["department"], event["type"])
        await conn.jetstream().publish(subject, orjson.dumps(event), headers=headers)
    finally:
        await conn.close()


@pytest.fixture
async def stack(
    nats_server: NatsServer, make_database_url: MakeDatabaseUrl, tmp_path: Path
) -> AsyncIterator[tuple[dict[str, FastAPI], InMemorySpanExporter, dict[str, str], str]]:
    catalog_path = tmp_path / "catalog.yaml"
    catalog_path.write_text(CATALOG)
    await provision(nats_server.url, load_catalog(catalog_path))
    tokens_path = tmp_path / "tokens.yaml"
    tokens = write_tokens(tokens_path, ["ops", "marketing"])
    exporter = InMemorySpanExporter()

    def provider(name: str) -> TracerProvider:
        p = TracerProvider(resource=Resource.create({"service.name": f"baton-{name}"}))
        p.add_span_processor(SimpleSpanProcessor(exporter))
        return p

    fast: dict[str, Any] = {"nats_url": nats_server.url, "fetch_timeout": 0.05, "retry_delay": 0.2}
    apps = {
        "intake": create_intake(
            IntakeSettings(**fast, database_url=make_database_url("intake")), tracer_provider=provider("intake")
        ),
        "routing": create_routing(
            RoutingSettings(**fast, database_url=make_database_url("routing"), catalog_path=str(catalog_path)),
            tracer_provider=provider("routing"),
        ),
        "notifier": create_notifier(
            NotifierSettings(
                **fast,
                database_url=make_database_url("notifier"),
                catalog_path=str(catalog_path),
                tokens_path=str(tokens_path),
                gap_delay=0.1,
                gap_max_delay=0.4,
                webhook_poll_interval=0.05,
            ),
            tracer_provider=provider("notifier"),
        ),
        "metrics": create_metrics(
            MetricsSettings(**fast, database_url=make_database_url("metrics"), catalog_path=catalog_path),
            tracer_provider=provider("metrics"),
        ),
    }
    async with AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        yield apps, exporter, tokens, nats_server.url
        # (each app shuts its provider down on exit, which stops the shared exporter: read spans before)


async def test_one_request_is_one_trace_across_the_four_services(
    stack: tuple[dict[str, FastAPI], InMemorySpanExporter, dict[str, str], str],
) -> None:
    apps, exporter, tokens, url = stack
    rid = f"REQ-{uuid.uuid4().hex[:10].upper()}"
    nc = await nats.connect(url)
    notifier = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=apps["notifier"]),
        base_url="http://notifier",
        headers={"Authorization": f"Bearer {tokens['ops']}"},
    )
    metrics = httpx.AsyncClient(transport=httpx.ASGITransport(app=apps["metrics"]), base_url="http://metrics")
    foreign: dict[str, tuple[str, str, str]] = {}
    try:
        with hook_server() as hooks:
            hook = await notifier.post("/v1/departments/ops/webhooks", json={"url": hooks.url + "/ops"})
            assert hook.status_code == 201, hook.text

            # created: a department system with no trace context at all
            await department_publishes(
                url,
                envelope(
                    "created",
                    rid,
                    "marketing",
                    "Ana Requester",
                    title=TITLE,
                    description=DESCRIPTION,
                    category="ops-task",
                    priority="normal",
                    requester={"department": "marketing", "person": "Ana Requester"},
                ),
            )

            async def escalated() -> bool:
                types = [b.get("type") for s, _, b in await messages(nc, STREAM_EVENTS) if b.get("request_id") == rid]
                return "escalated" in types

            # routing's durable timers: sla_warning at 3 s, escalated at 4 s (the request was not accepted)
            await until(escalated, "routing's timers to escalate the unaccepted request")

            # later events, each from another publisher: three with their own unrelated traces, one with none
            eta = (datetime.now(UTC) + timedelta(days=2)).isoformat()
            later = [
                (envelope("accepted", rid, "ops", "Olga Operator", assignee="Olga Operator", eta=eta), True),
                (
                    envelope(
                        "delayed",
                        rid,
                        "ops",
                        "Olga Operator",
                        reason="waiting for a part",
                        new_eta=(datetime.now(UTC) + timedelta(days=3)).isoformat(),
                    ),
                    False,
                ),
                (envelope("resolved", rid, "ops", "Olga Operator", resolution="fixed it", outcome="done"), True),
                (envelope("feedback", rid, "marketing", "Ana Requester", rating=5, comment="quick"), True),
            ]
            for event, with_context in later:
                tp = foreign_traceparent() if with_context else None
                if tp is not None:
                    foreign[event["event_id"]] = tp
                await department_publishes(url, event, tp[0] if tp else None)
                await until(lambda: settled(nc), f"every service to settle after {event['type']}")

            await until(lambda: settled(nc), "every service to settle")
            notices = [b for _, _, b in await messages(nc, STREAM_NOTIFY) if b.get("request_id") == rid]
            for_ops = [n for n in notices if n.get("department") == "ops"]
            # one POST per notification of ops (every one is immediate: no digest was chosen)
            await until(lambda: _true(len(hooks.on("/ops")) >= len(for_ops)), "the webhook deliveries to ops")
            hits = hooks.on("/ops")
            assert sorted(h.headers["Baton-Notification-Id"] for h in hits) == sorted(
                n["notification_id"] for n in for_ops
            )
            # the POST spans end once the responses are read (just after the server recorded the hits)
            await until(
                lambda: _true(sum(s.name == "POST" for s in exporter.get_finished_spans()) >= len(hits)),
                "the webhook POST spans to end",
            )
            spans = list(exporter.get_finished_spans())
            timeline = (await metrics.get(f"/v1/requests/{rid}/timeline")).json()
            canonical = [(s, h, b) for s, h, b in await messages(nc, STREAM_EVENTS) if b.get("request_id") == rid]
            inbound = [(s, h, b) for s, h, b in await messages(nc, STREAM_IN) if b.get("request_id") == rid]
    finally:
        await notifier.aclose()
        await metrics.aclose()
        await nc.close()

    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    types = [b["type"] for _, _, b in canonical]
    print(f"\ncanonical events: {types}; spans exported: {len(spans)}; webhook hits: {len(hits)}")
    assert {"created", "routed", "sla_warning", "escalated", "accepted", "delayed", "resolved", "feedback"} <= set(
        types
    )

    # --- one trace id: the timeline's, every notification's, every Baton span of the request ----------------
    trace_id = timeline["trace_id"]
    assert trace_id
    assert all(b["trace_id"] == trace_id for _, _, b in canonical)
    assert notices
    assert all(n.get("trace_id") == trace_id for n in notices), "every notification carries the trace"
    request_spans = [s for s in spans if s.attributes and s.attributes.get("baton.request_id") == rid]
    assert len(request_spans) >= 40
    assert {hexid(s.context.trace_id, 32) for s in request_spans if s.context} == {trace_id}
    in_trace = [s for s in spans if s.context is not None and hexid(s.context.trace_id, 32) == trace_id]
    roots = [s for s in in_trace if s.parent is None]
    assert [(service(s), s.name, s.attributes["baton.event_type"] if s.attributes else None) for s in roots] == [
        ("intake", "process BATON_IN", "created")
    ], "the request's trace has one root: intake's span of its created"
    root = roots[0]
    print(f"trace {trace_id}: {len(in_trace)} spans, {len({service(s) for s in in_trace})} services")

    # --- the edge matrix, against the real spans -------------------------------------------------------------
    observed: dict[tuple[tuple[str, str], tuple[str, str]], int] = {}
    for child in in_trace:
        if child.parent is None:
            continue
        parent = by_id.get(child.parent.span_id)
        assert parent is not None, f"{service(child)} {child.name}: its parent span was never exported"
        edge = ((service(parent), parent.name), (service(child), child.name))
        observed[edge] = observed.get(edge, 0) + 1
    for edge, n in sorted(observed.items()):
        print(f"  {edge[0][0]:>8} {edge[0][1]:<26} -> {edge[1][0]:>8} {edge[1][1]:<24} x{n}")
    assert set(observed) == EDGES

    # --- message by message: every consumer span is a child of the span that published what it consumed --------
    def spans_of(svc: str, name: str, message_id: str) -> list[ReadableSpan]:
        return [
            s
            for s in in_trace
            if service(s) == svc
            and s.name == name
            and s.attributes
            and s.attributes.get("messaging.message.id") == message_id
        ]

    for _subject, headers, body in canonical:
        sender = by_id[int(headers["traceparent"].split("-")[2], 16)]
        assert (service(sender), sender.name) == ("intake", "send baton.events")
        for svc in ("routing", "notifier", "metrics"):
            consumers = spans_of(svc, "process BATON_EVENTS", body["event_id"])
            assert consumers, f"{svc} has no span for {body['type']}"
            assert {c.parent.span_id for c in consumers if c.parent} == {sender.context.span_id}
    for subject, headers, body in inbound:
        (processed,) = spans_of("intake", "process BATON_IN", body["event_id"])
        assert processed.parent is not None or body["type"] == "created"
        if subject.startswith("baton.svc."):  # routing's event, published inside the request's trace
            sender = by_id[int(headers["traceparent"].split("-")[2], 16)]
            assert (service(sender), sender.name) == ("routing", "send baton.svc.routing")
            assert processed.parent is not None
            assert processed.parent.span_id == sender.context.span_id
            assert not processed.links
        elif body["type"] != "created":  # a department's: under the request's first span, linked to the publisher
            assert processed.parent is not None
            assert processed.parent.span_id == root.context.span_id
            tp = foreign.get(body["event_id"])
            linked = {(hexid(link.context.trace_id, 32), hexid(link.context.span_id)) for link in processed.links}
            assert linked == ({(tp[1], tp[2])} if tp else set()), body["type"]
    timers = [s for s in in_trace if s.name == "process BATON_TIMERS"]
    assert len(timers) >= 2, "the warning and the breach timers ran in the request's trace"

    # --- webhooks: the POST carries the traceparent of its own span, in the request's trace ---------------------
    posts = {s.context.span_id: s for s in in_trace if service(s) == "notifier" and s.name == "POST"}
    for hit in hits:
        _, hit_trace, hit_span, _ = hit.headers["traceparent"].split("-")
        assert hit_trace == trace_id
        assert int(hit_span, 16) in posts

    # --- no personal data or free text in any attribute -----------------------------------------------------
    for span in spans:
        for key, value in (span.attributes or {}).items():
            assert not any(text in str(value) for text in PERSONAL), f"{span.name}: {key}={value!r}"


async def _true(value: bool) -> bool:
    return value


# --- the HTTP path and the outbox --------------------------------------------------------------------------
async def test_http_submissions_and_outbox_republications_join_the_requests_trace(
    provisioned_nats: str, make_database_url: MakeDatabaseUrl, tmp_path: Path
) -> None:
    tokens = write_tokens(tmp_path / "tokens.yaml", ["marketing", "it"])
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "baton-intake"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = IntakeSettings(
        nats_url=provisioned_nats,
        database_url=make_database_url("intake"),
        fetch_timeout=0.05,
        retry_delay=0.2,
        tokens_path=tmp_path / "tokens.yaml",
        outbox_interval=3600,  # the test runs the outbox itself
    )
    app = create_intake(settings, tracer_provider=provider)
    rid = f"REQ-{uuid.uuid4().hex[:10].upper()}"
    caller, caller_trace, caller_span = foreign_traceparent()
    later, later_trace, later_span = foreign_traceparent()
    async with app.router.lifespan_context(app):
        nc = await nats.connect(provisioned_nats)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://intake")
        try:
            auth = {"Authorization": f"Bearer {tokens['marketing']}"}
            made = await http.post("/v1/requests", json=created(rid), headers=auth | {"traceparent": caller})
            assert made.status_code == 201, made.text
            trace_id = made.json()["trace_id"]
            # routing's routed, over NATS, here without any trace context: hangs under the request's first span
            await nc.jetstream().publish("baton.svc.routing.routed", orjson.dumps(routed(rid)))
            await until(lambda: settled_intake(nc), "intake to append routed")
            accepted = env("accepted", rid, "it", 2) | {"assignee": "Sam", "eta": "2030-01-01T00:00:00+00:00"}
            auth = {"Authorization": f"Bearer {tokens['it']}", "traceparent": later}
            response = await http.post(f"/v1/requests/{rid}/events", json=accepted, headers=auth)
            assert response.status_code == 201, response.text
            # as if the PubAck of accepted had been lost: the outbox publishes it again, with no span alive
            async with app.state.database.transaction() as session:
                session.add(intake_db.PendingPublish(event_id=accepted["event_id"], created_at=datetime.now(UTC)))
            async with app.state.database.transaction() as session:
                await session.execute(
                    update(intake_db.PendingPublish).values(created_at=datetime.now(UTC) - timedelta(hours=1))
                )
            assert await app.state.processor.publish_pending(older_than=1) == 1
            spans = list(exporter.get_finished_spans())
        finally:
            await http.aclose()
            await nc.close()

    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    assert {hexid(s.context.trace_id, 32) for s in spans if s.context} == {trace_id}
    (root,) = [s for s in spans if s.parent is None]
    assert (root.name, root.attributes and root.attributes["baton.event_type"]) == ("POST /v1/requests", "created")
    assert [(hexid(lk.context.trace_id, 32), hexid(lk.context.span_id)) for lk in root.links] == [
        (caller_trace, caller_span)
    ]

    def named(name: str, event_id: str) -> list[ReadableSpan]:
        return [
            s for s in spans if s.name == name and s.attributes and s.attributes.get("messaging.message.id") == event_id
        ]

    (routed_span,) = [s for s in spans if s.name == "process BATON_IN"]
    assert routed_span.parent is not None
    assert routed_span.parent.span_id == root.context.span_id
    assert not routed_span.links
    (accept_span,) = [s for s in spans if s.name == "POST /v1/requests/{request_id}/events"]
    assert accept_span.parent is not None
    assert accept_span.parent.span_id == root.context.span_id
    assert [(hexid(lk.context.trace_id, 32), hexid(lk.context.span_id)) for lk in accept_span.links] == [
        (later_trace, later_span)
    ]
    first, again = named("send baton.events", accepted["event_id"])
    assert first.parent is not None
    assert again.parent is not None
    assert by_id[first.parent.span_id] is accept_span
    assert again.parent.span_id == root.context.span_id  # the outbox: under the request's first span


async def settled_intake(nc: NATS) -> bool:
    jsm = nc.jsm()
    last = (await jsm.stream_info(STREAM_IN)).state.last_seq
    info = await jsm.consumer_info(STREAM_IN, CONSUMER_INTAKE)
    return bool(info.ack_floor.stream_seq >= last and not info.num_ack_pending)


# --- timers armed by no live span ----------------------------------------------------------------------------
async def test_timers_rearmed_outside_any_span_stay_in_the_requests_trace(
    provisioned_nats: str, make_database_url: MakeDatabaseUrl, catalog_path: Path
) -> None:
    """The reconciler re-arms timers (e.g. after NATS was down) with no span alive: the schedules it sends
    are children of routing's stored span of the request's ``created``, so the due timers (days later)
    land in the request's trace."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "baton-routing"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_routing(
        RoutingSettings(
            nats_url=provisioned_nats,
            database_url=make_database_url("routing"),
            catalog_path=str(catalog_path),
            fetch_timeout=0.05,
            retry_delay=0.1,
            reconcile_interval=3600,  # the test runs the reconciler itself
        ),
        tracer_provider=provider,
    )
    rid = f"REQ-{uuid.uuid4().hex[:10].upper()}"
    trace_id, intake_span = secrets.token_hex(16), secrets.token_hex(8)
    doc = envelope(
        "created",
        rid,
        "marketing",
        "Ana Requester",
        title=TITLE,
        category="laptop",
        priority="normal",
        requester={"department": "marketing", "person": "Ana Requester"},
    ) | {"sequence": 1, "recorded_at": datetime.now(UTC).isoformat(), "trace_id": trace_id}
    async with app.router.lifespan_context(app):
        nc = await nats.connect(provisioned_nats)
        try:
            ack = await nc.jetstream().publish(
                f"baton.events.{rid}.created",
                orjson.dumps(doc),
                stream=STREAM_EVENTS,
                headers={"Nats-Msg-Id": doc["event_id"], "traceparent": f"00-{trace_id}-{intake_span}-01"},
            )

            async def applied(seq: int) -> bool:
                info = await nc.jsm().consumer_info(STREAM_EVENTS, CONSUMER_ROUTING)
                return bool(info.ack_floor.stream_seq >= seq and not info.num_ack_pending)

            await until(lambda: applied(ack.seq), "routing to process the created event")
            # intake's part, played here: append routing's routed to the canonical log (the clocks start then)
            routed = orjson.loads((await nc.jsm().get_msg(STREAM_IN, 1)).data or b"{}")
            routed |= {"sequence": 2, "recorded_at": datetime.now(UTC).isoformat(), "trace_id": trace_id}
            ack = await nc.jetstream().publish(
                f"baton.events.{rid}.routed",
                orjson.dumps(routed),
                stream=STREAM_EVENTS,
                headers={"Nats-Msg-Id": routed["event_id"], "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
            )
            await until(lambda: applied(ack.seq), "routing to process the routed event")
            armed = [s for s in exporter.get_finished_spans() if s.name == "send baton.timers.sched"]
            async with app.state.database.transaction() as session:
                clocks = (
                    (
                        await session.execute(
                            select(routing_db.ClockRow.clock_id).where(routing_db.ClockRow.request_id == rid)
                        )
                    )
                    .scalars()
                    .all()
                )
                await routing_db.mark_dirty(session, list(clocks))
            assert await app.state.processor.reconcile() >= 1
            spans = list(exporter.get_finished_spans())
        finally:
            await nc.close()

    process, process_routed = [s for s in spans if s.name == "process BATON_EVENTS"]
    assert process.parent is not None
    assert hexid(process.parent.span_id) == intake_span
    assert armed, "the routed event armed the clocks' timers"
    assert all(s.parent is not None and s.parent.span_id == process_routed.context.span_id for s in armed)
    rearmed = [s for s in spans if s.name == "send baton.timers.sched" and s not in armed]
    assert rearmed, "the reconciler sent schedules"
    for span in rearmed:
        assert hexid(span.context.trace_id, 32) == trace_id
        assert span.parent is not None
        assert span.parent.span_id == process.context.span_id  # routing's stored span of the created
