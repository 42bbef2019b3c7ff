"""Routing's whole wiring: settings -> catalog (watched) -> telemetry -> middlewares -> broker -> routers ->
background chores (catalog reload, timer scheduling) -> HTTP app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path as FilePath
from typing import Annotated, Any

import nats
from fastapi import FastAPI, HTTPException, Path
from faststream.nats import NatsBroker
from faststream.prometheus import PrometheusMiddleware
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter, make_asgi_app
from starlette.responses import JSONResponse

from libs.contracts import Catalog, loads
from libs.contracts.broker_metrics import bounded_labels
from libs.contracts.envelope import ID_PATTERN
from libs.contracts.publishing import jetstream_publish_many, sequential_publish_many
from libs.contracts.subjects import (
    CONSUMER_ROUTING,
    CONSUMER_ROUTING_TIMERS,
    STREAM_EVENTS,
    STREAM_TIMERS,
    request_events_filter,
)
from libs.contracts.tracing import make_tracer_provider, send_span
from libs.contracts.watchdog import watch, watch_subscriptions

from . import db
from .business_time import BusinessCalendar
from .catalog_watch import CatalogWatcher
from .domain import business_amount, calendar_of
from .handlers import DeliveryLimit, RoutingMetrics, RoutingProcessor, build_router, sequential_schedule_many
from .settings import RoutingSettings
from .tracking import Clock, Policy

SERVICE_NAME = "baton-routing"
log = logging.getLogger("baton.routing")


async def require_consumer(
    servers: list[str], stream: str, durable: str, options: dict[str, Any] | None = None
) -> ConsumerConfig:
    """The provisioned consumer's config; fail fast, with the fix, when it is missing (services never create one)."""
    nc = await nats.connect(
        servers, connect_timeout=5, max_reconnect_attempts=3, name=f"{SERVICE_NAME}-check", **(options or {})
    )
    try:
        config: ConsumerConfig = (await nc.jetstream().consumer_info(stream, durable)).config
        return config
    except NotFoundError as exc:
        raise RuntimeError(f"consumer {stream}/{durable} does not exist: run `baton provision` first") from exc
    finally:
        await nc.close()


def create_app(
    settings: RoutingSettings,
    *,
    catalog: Catalog | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """The routing service. ``catalog`` defaults to the file at ``settings.catalog_path`` (loaded now: fail fast;
    then re-read whenever the file changes). A ``catalog`` given here is fixed."""
    watcher = CatalogWatcher(None if catalog is not None else FilePath(settings.catalog_path), catalog)
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE_NAME)
    tracer = tracer_provider.get_tracer("baton.routing")
    registry = CollectorRegistry()
    metrics = RoutingMetrics(registry)
    reloads = Counter(
        "baton_routing_catalog_reloads",
        "Catalog file changes seen, by result (loaded, refused: the last good catalog was kept).",
        ["result"],
        registry=registry,
    )
    servers = [s.strip() for s in settings.nats_url.split(",") if s.strip()]

    nats_options = settings.nats_options()  # this service's NATS login (docs/security.md)
    broker = NatsBroker(
        servers,
        **settings.broker_options(),
        name=SERVICE_NAME,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        graceful_timeout=settings.graceful_timeout,
        log_level=logging.DEBUG,
        middlewares=[
            PrometheusMiddleware(settings_provider_factory=bounded_labels, registry=registry, app_name=SERVICE_NAME),
        ],
    )
    database = db.Database(settings.database_url)

    async def publish(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        with send_span(tracer, subject, body, {"Nats-Msg-Id": msg_id}) as headers:
            await broker.publish(body, subject, headers=headers, stream=stream, timeout=10)

    async def schedule(subject: str, body: bytes, *, headers: dict[str, str]) -> None:
        # The server copies these headers (traceparent included) onto the due message: the timer's span,
        # days later, is a child of the span that armed it.
        with send_span(tracer, subject, body, headers) as traced:
            await broker.publish(body, subject, headers=traced, stream=STREAM_TIMERS, timeout=10)

    async def pending(request_id: str, after_stream_seq: int) -> bool:
        """Is an event of this request already in the canonical log past what routing applied?"""
        jsm = broker.connection.jsm()
        try:
            await jsm.get_msg(
                STREAM_EVENTS, seq=after_stream_seq + 1, subject=request_events_filter(request_id), next=True
            )
        except NotFoundError:
            return False
        return True

    policy = Policy(
        warning_fraction=settings.warning_fraction,
        max_hops=settings.max_hops,
        quick_reassign_within=timedelta(seconds=settings.quick_reassign_within),
    )

    def jetstream() -> Any:
        return broker.config.broker_config.connection_state.stream

    processor = RoutingProcessor(
        database,
        watcher.current,
        publish,
        metrics=metrics,
        schedule=schedule,
        pending=pending,
        policy=policy,
        publish_many=jetstream_publish_many(jetstream, tracer, sequential_publish_many(publish)),
        schedule_many=jetstream_publish_many(jetstream, tracer, sequential_schedule_many(schedule)),
    )

    def catalog_changed(new: Catalog) -> None:
        processor.catalog = new

    watcher.on_change = catalog_changed
    limit = DeliveryLimit()
    broker.include_router(
        build_router(
            processor,
            batch_size=settings.fetch_batch,
            fetch_timeout=settings.fetch_timeout,
            retry_delay=settings.retry_delay,
            inbox_prefix=settings.subscriber_inbox_prefix(),
            metrics=metrics,
            tracer=tracer,
            limit=limit,
        )
    )
    # A batch handed over as soon as anything arrived, and a stall watchdog per subscription (libs/contracts).
    watchdogs = watch_subscriptions(broker, registry, "routing", idle=settings.fetch_timeout)

    def check_catalog() -> None:
        had_error = watcher.last_error
        if watcher.check():
            reloads.labels("loaded").inc()
        elif watcher.last_error is not None and watcher.last_error != had_error:
            reloads.labels("refused").inc()

    async def maintain() -> None:
        """Background chores: reload the catalog when its file changes; schedule timers that did not reach NATS
        (e.g. it was down); now and then re-arm timers that should have fired and were never acted on."""
        loop = asyncio.get_running_loop()
        next_catalog = next_reconcile = next_overdue = loop.time()
        grace = timedelta(seconds=settings.overdue_grace)
        while True:
            now = loop.time()
            if settings.catalog_poll_interval and now >= next_catalog:
                next_catalog = now + settings.catalog_poll_interval
                check_catalog()
            if now >= next_reconcile:
                next_reconcile = now + settings.reconcile_interval
                overdue = now >= next_overdue
                if overdue:
                    next_overdue = now + settings.overdue_grace
                try:
                    await processor.reconcile(overdue_grace=grace if overdue else None)
                except Exception:
                    log.warning("scheduling pending timers failed; retrying in %.0fs", settings.reconcile_interval,
                                exc_info=True)  # fmt: skip
            waits = [next_reconcile] + ([next_catalog] if settings.catalog_poll_interval else [])
            await asyncio.sleep(max(min(waits) - loop.time(), 0.05))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await database.start(migrate=settings.migrate_on_start)
        consumer = await require_consumer(servers, STREAM_EVENTS, CONSUMER_ROUTING, nats_options)
        await require_consumer(servers, STREAM_TIMERS, CONSUMER_ROUTING_TIMERS, nats_options)
        if consumer.max_deliver is not None:
            limit.max_deliver = consumer.max_deliver
        await broker.start()
        current = watcher.current
        log.info(
            "routing consuming %s/%s and %s/%s (dead-letter on delivery %d) with %d departments, %d rules "
            "(fallback %s)",
            STREAM_EVENTS,
            CONSUMER_ROUTING,
            STREAM_TIMERS,
            CONSUMER_ROUTING_TIMERS,
            limit.max_deliver,
            len(current.departments),
            len(current.rules),
            current.fallback_department,
        )
        chores = asyncio.create_task(maintain(), name="routing-maintenance")
        watchdog = asyncio.create_task(watch(watchdogs), name="routing-subscription-watchdog")
        try:
            yield
        finally:
            for task in (chores, watchdog):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await broker.stop()
            await database.close()
            tracer_provider.shutdown()

    app = FastAPI(title="Baton routing", version="1.0.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.catalog_watcher = watcher
    app.state.broker = broker
    app.state.watchdogs = watchdogs
    app.state.database = database
    app.state.processor = processor
    app.state.delivery_limit = limit
    app.state.registry = registry
    app.mount("/metrics", make_asgi_app(registry))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        checks = {"nats": await broker.ping(timeout=2), "database": await _db_ok(database)}
        # A refused catalog edit does not make routing unready: it keeps routing with the last good catalog.
        return JSONResponse(
            {"ready": all(checks.values()), "checks": checks, "catalog": watcher.status()},
            status_code=200 if all(checks.values()) else 503,
        )

    @app.get("/v1/catalog", tags=["catalog"])
    async def get_catalog() -> dict[str, Any]:
        current = watcher.current
        return {
            "version": current.version,
            "fallback_department": current.fallback_department,
            "departments": [
                {
                    "slug": d.slug,
                    "name": d.name,
                    "kind": d.kind.value,
                    "categories": list(d.categories),
                    "timezone": d.timezone,
                    "business_hours": d.business_hours.model_dump(mode="json"),
                    "holidays": [h.isoformat() for h in d.holidays],
                    "sla": {
                        p.value: {
                            "accept_within_business_seconds": business_amount(t.accept_within, d).total_seconds(),
                            "resolve_within_business_seconds": business_amount(t.resolve_within, d).total_seconds(),
                        }
                        for p, t in d.sla.items()
                    },
                }
                for d in current.departments
            ],
            "rules": [r.model_dump(mode="json") for r in current.rules],
            "catalog": watcher.status(),
        }

    @app.get("/v1/requests/{request_id}/routing", tags=["requests"])
    async def get_routing(request_id: Annotated[str, Path(pattern=ID_PATTERN)]) -> dict[str, Any]:
        async with database.transaction() as session:
            rows = await db.decisions_of(session, request_id)
            track, _ = await db.load_track(session, request_id)
            clock_rows = {r.clock_id: r for r in await db.clocks_of(session, request_id)}
            emitted = await db.outbox_of(session, request_id)
        if not rows and track is None:
            raise HTTPException(404, f"no routing decision for request {request_id}")
        now = datetime.now(UTC)
        current = watcher.current
        body: dict[str, Any] = {
            "request_id": request_id,
            "decisions": [
                {
                    "event_id": r.event_id,
                    "caused_by": r.caused_by,
                    "provider_department": r.provider_department,
                    "rule": r.rule,
                    "reason": r.reason,
                    "accept_by": _iso(r.accept_by),
                    "resolve_by": _iso(r.resolve_by),
                    "decided_at": _iso(r.decided_at),
                    "event": loads(r.routed),
                }
                for r in rows
            ],
            "emitted": [
                {"event_id": e.event_id, "type": e.event_type, "caused_by": e.caused_by, "event": loads(e.body)}
                for e in emitted
            ],
        }
        if track is not None:
            body |= {
                "phase": track.phase.value,
                "holder": track.holder,
                "chain": track.chain,
                "declines": [d.__dict__ for d in track.declines],
                "waits": [
                    {
                        "holder": w.holder,
                        "charged_to": w.charged_to,
                        "reason_code": w.reason_code.value,
                        "started_at": w.started_at.isoformat(),
                        "ended_at": _iso(w.ended_at),
                        "caused_by": w.caused_by,
                    }
                    for w in track.waits
                ],
                "clocks": [
                    _clock_view(c, calendar_of(current, c.department), clock_rows.get(c.clock_id), now)
                    for c in track.clocks
                ],
            }
        return body

    return app


def _clock_view(clock: Clock, calendar: BusinessCalendar, row: db.ClockRow | None, now: datetime) -> dict[str, Any]:
    state = "closed" if not clock.is_open else ("running" if clock.is_running else "paused")
    deadline = clock.deadline(calendar)
    return {
        "clock_id": clock.clock_id,
        "department": clock.department,
        "clock": clock.kind.value,
        "episode": clock.episode,
        "state": state,
        "target_seconds": clock.target.total_seconds(),
        "used_seconds": round(clock.used(calendar, now).total_seconds(), 3),
        "opened_at": clock.opened_at.isoformat(),
        "closed_at": _iso(clock.closed_at),
        "close_reason": clock.close_reason,
        "deadline": _iso(deadline),
        "breached": clock.breached(calendar, now),
        "warned": clock.warned,
        "escalated": clock.escalated,
        "warning_timer_at": _iso(row.warn_at) if row is not None else None,
        "breach_timer_at": _iso(row.deadline_at) if row is not None else None,
    }


def _iso(value: datetime | None) -> str | None:
    aware = db.aware(value)
    return aware.isoformat() if aware is not None else None


async def _db_ok(database: db.Database) -> bool:
    try:
        return await database.ping()
    except Exception:
        log.warning("database not reachable", exc_info=True)
        return False
