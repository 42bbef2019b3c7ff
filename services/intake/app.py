"""Intake's whole wiring: settings -> telemetry -> middlewares -> broker -> routers -> HTTP app."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import nats
from fastapi import FastAPI, HTTPException, Path, Query
from faststream.nats import NatsBroker
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.prometheus import NatsPrometheusMiddleware
from nats.js.errors import NotFoundError
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.responses import JSONResponse

from libs.contracts import loads
from libs.contracts.envelope import ID_PATTERN, SLUG_PATTERN
from libs.contracts.subjects import CONSUMER_INTAKE, STREAM_IN

from . import db
from .handlers import IntakeProcessor, build_router
from .settings import IntakeSettings

SERVICE_NAME = "baton-intake"
log = logging.getLogger("baton.intake")


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


def create_app(settings: IntakeSettings, *, tracer_provider: TracerProvider | None = None) -> FastAPI:
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

    async def publish(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        await broker.publish(body, subject, headers={"Nats-Msg-Id": msg_id}, stream=stream, timeout=10)

    processor = IntakeProcessor(database, publish)
    broker.include_router(
        build_router(
            processor,
            tracer=tracer_provider.get_tracer("baton.intake"),
            batch_size=settings.fetch_batch,
            fetch_timeout=settings.fetch_timeout,
            retry_delay=settings.retry_delay,
        )
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await database.start()
        await require_consumer(servers, STREAM_IN, CONSUMER_INTAKE)
        await broker.start()
        log.info("intake consuming %s/%s", STREAM_IN, CONSUMER_INTAKE)
        try:
            yield
        finally:
            await broker.stop()
            await database.close()
            tracer_provider.shutdown()

    app = FastAPI(title="Baton intake", version="1.0.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.broker = broker
    app.state.database = database
    app.state.processor = processor
    app.mount("/metrics", make_asgi_app(registry))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        checks = {"nats": await broker.ping(timeout=2), "database": await _db_ok(database)}
        return JSONResponse(
            {"ready": all(checks.values()), "checks": checks}, status_code=200 if all(checks.values()) else 503
        )

    @app.get("/v1/requests/{request_id}", tags=["requests"])
    async def get_request(request_id: Annotated[str, Path(pattern=ID_PATTERN)]) -> dict[str, Any]:
        async with database.transaction() as session:
            row = await db.load_request(session, request_id, for_update=False)
            if row is None:
                raise HTTPException(404, f"request {request_id} not found")
            events = await db.request_events(session, request_id)
        state = row.to_state()
        return {
            "request_id": row.request_id,
            "state": row.state,
            "requester_department": row.requester_department,
            "holder_department": row.holder_department,
            "sequence": row.last_sequence,
            "eta": state.eta.isoformat() if state.eta else None,
            "delay_count": row.delay_count,
            "title": row.title,
            "trace_id": row.trace_id,
            "events": [loads(e.canonical) for e in events],
        }

    @app.get("/v1/rejections", tags=["rejections"])
    async def rejections(
        department: Annotated[str | None, Query(pattern=SLUG_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[dict[str, Any]]:
        async with database.transaction() as session:
            rows = await db.recent_rejections(session, department, limit)
        return [
            {
                "department": r.department,
                "subject": r.subject,
                "event_id": r.event_id,
                "request_id": r.request_id,
                "event_type": r.event_type,
                "code": r.code,
                "message": r.message,
                "errors": r.errors,
                "rejected_at": r.rejected_at.isoformat(),
            }
            for r in rows
        ]

    return app


async def _db_ok(database: db.Database) -> bool:
    try:
        return await database.ping()
    except Exception:
        log.warning("database not reachable", exc_info=True)
        return False
