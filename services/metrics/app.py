"""Metrics' whole wiring: settings -> telemetry -> middlewares -> broker -> routers -> HTTP app."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Annotated, Any

import nats
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from faststream.nats import NatsBroker
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.prometheus import NatsPrometheusMiddleware
from nats.js.errors import NotFoundError
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, Counter, make_asgi_app
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse

from libs.contracts import parse_event
from libs.contracts.envelope import ID_PATTERN, SLUG_PATTERN
from libs.contracts.subjects import CONSUMER_METRICS, STREAM_EVENTS

from . import db, pages
from .domain import RequestSummary, Timeline, build_timeline, summary_of
from .handlers import MetricsProcessor, Outcome, build_router
from .settings import MetricsSettings

SERVICE_NAME = "baton-metrics"
PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("baton.metrics")


def make_tracer_provider(service_name: str) -> TracerProvider:
    """OpenTelemetry from the standard OTEL_* variables: OTLP export only when an endpoint is set."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


async def require_consumer(servers: list[str], stream: str, durable: str) -> None:
    """Fail fast, with the fix, when the durable consumer was not provisioned (services never create one)."""
    nc = await nats.connect(servers, connect_timeout=5, max_reconnect_attempts=3, name=f"{SERVICE_NAME}-check")
    try:
        await nc.jetstream().consumer_info(stream, durable)
    except NotFoundError as exc:
        raise RuntimeError(f"consumer {stream}/{durable} does not exist: run `baton provision` first") from exc
    finally:
        await nc.close()


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def create_app(
    settings: MetricsSettings,
    *,
    tracer_provider: TracerProvider | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> FastAPI:
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE_NAME)
    registry = CollectorRegistry()
    servers = [s.strip() for s in settings.nats_url.split(",") if s.strip()]

    broker = NatsBroker(
        servers,
        name=SERVICE_NAME,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        graceful_timeout=settings.graceful_timeout,
        log_level=logging.DEBUG,
        middlewares=[
            NatsTelemetryMiddleware(tracer_provider=tracer_provider),
            NatsPrometheusMiddleware(registry=registry, app_name=SERVICE_NAME),
        ],
    )
    database = db.Database(settings.database_url)

    projected = Counter(
        "baton_metrics_events_projected",
        "Canonical events stored into the timeline projection (first delivery only), by event type.",
        ["type"],
        registry=registry,
    )
    handled = Counter(
        "baton_metrics_messages",
        "Messages read from the canonical log, by event type and outcome (projected, duplicate, dead_lettered).",
        ["type", "outcome"],
        registry=registry,
    )

    def observe(event_type: str, outcome: Outcome) -> None:
        handled.labels(event_type, outcome.value).inc()
        if outcome is Outcome.PROJECTED:
            projected.labels(event_type).inc()

    async def publish(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        await broker.publish(body, subject, headers={"Nats-Msg-Id": msg_id}, stream=stream, timeout=10)

    processor = MetricsProcessor(database, publish, observe=observe, clock=clock)
    broker.include_router(
        build_router(
            processor,
            batch_size=settings.fetch_batch,
            fetch_timeout=settings.fetch_timeout,
            retry_delay=settings.retry_delay,
        )
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await database.start()
        await require_consumer(servers, STREAM_EVENTS, CONSUMER_METRICS)
        await broker.start()
        log.info("metrics consuming %s/%s", STREAM_EVENTS, CONSUMER_METRICS)
        try:
            yield
        finally:
            await broker.stop()
            await database.close()
            tracer_provider.shutdown()

    app = FastAPI(title="Baton metrics", version="1.0.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.broker = broker
    app.state.database = database
    app.state.processor = processor
    app.mount("/metrics", make_asgi_app(registry))

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, _reason(exc.status_code), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_problem(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "code": e.get("type", ""), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        return problem(422, "Unprocessable Content", "the request is not valid", errors=errors)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        checks = {"nats": await broker.ping(timeout=2), "database": await _db_ok(database)}
        return JSONResponse(
            {"ready": all(checks.values()), "checks": checks}, status_code=200 if all(checks.values()) else 503
        )

    @app.get(
        "/v1/requests/{request_id}/timeline",
        tags=["requests"],
        response_model=Timeline,
        responses={404: {"description": "Unknown request (problem JSON)."}},
    )
    async def timeline(request_id: Annotated[str, Path(pattern=ID_PATTERN)]) -> Timeline | JSONResponse:
        async with database.transaction() as session:
            rows = await db.request_events(session, request_id)
        if not rows:
            return problem(404, "Not Found", f"request {request_id} not found", request_id=request_id)
        return build_timeline((parse_event(r.canonical) for r in rows), clock())

    @app.get("/v1/requests", tags=["requests"], response_model=list[RequestSummary])
    async def requests(
        department: Annotated[
            str | None, Query(pattern=SLUG_PATTERN, description="Only requests it is party to.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> list[RequestSummary]:
        async with database.transaction() as session:
            ids = await db.recent_requests(session, department, limit)
            events = await db.events_of(session, ids)
        now = clock()
        return [summary_of(build_timeline((parse_event(r.canonical) for r in events[rid]), now)) for rid in ids]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(
        department: Annotated[str | None, Query(pattern=SLUG_PATTERN)] = None,
    ) -> HTMLResponse:
        summaries = await requests(department=department, limit=100)
        return HTMLResponse(pages.render("index.html", requests=summaries, department=department, refresh=5))

    @app.get("/requests/{request_id}", response_class=HTMLResponse, include_in_schema=False)
    async def request_page(request_id: Annotated[str, Path(pattern=ID_PATTERN)]) -> HTMLResponse:
        async with database.transaction() as session:
            rows = await db.request_events(session, request_id)
        if not rows:
            raise StarletteHTTPException(404, f"request {request_id} not found")
        line = build_timeline((parse_event(r.canonical) for r in rows), clock())
        return HTMLResponse(pages.render("request.html", t=line, refresh=10))

    return app


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _db_ok(database: db.Database) -> bool:
    try:
        return await database.ping()
    except Exception:
        log.warning("database not reachable", exc_info=True)
        return False
