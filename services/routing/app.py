"""Routing's whole wiring: settings -> catalog -> telemetry -> middlewares -> broker -> routers -> HTTP app."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import nats
from fastapi import FastAPI, HTTPException, Path
from faststream.nats import NatsBroker
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.prometheus import NatsPrometheusMiddleware
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.responses import JSONResponse

from libs.contracts import Catalog, loads
from libs.contracts.catalog_file import load_catalog
from libs.contracts.envelope import ID_PATTERN
from libs.contracts.subjects import CONSUMER_ROUTING, STREAM_EVENTS

from . import db
from .handlers import DeliveryLimit, RoutingMetrics, RoutingProcessor, build_router
from .settings import RoutingSettings

SERVICE_NAME = "baton-routing"
log = logging.getLogger("baton.routing")


def make_tracer_provider(service_name: str) -> TracerProvider:
    """OpenTelemetry from the standard OTEL_* variables: OTLP export only when an endpoint is set."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


async def require_consumer(servers: list[str], stream: str, durable: str) -> ConsumerConfig:
    """The provisioned consumer's config; fail fast, with the fix, when it is missing (services never create one)."""
    nc = await nats.connect(servers, connect_timeout=5, max_reconnect_attempts=3, name=f"{SERVICE_NAME}-check")
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
    """The routing service. ``catalog`` defaults to the file at ``settings.catalog_path`` (loaded now: fail fast)."""
    catalog = catalog or load_catalog(settings.catalog_path)
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE_NAME)
    registry = CollectorRegistry()
    metrics = RoutingMetrics(registry)
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

    processor = RoutingProcessor(database, catalog, publish, metrics=metrics)
    limit = DeliveryLimit()
    broker.include_router(
        build_router(
            processor,
            batch_size=settings.fetch_batch,
            fetch_timeout=settings.fetch_timeout,
            retry_delay=settings.retry_delay,
            metrics=metrics,
            tracer=tracer_provider.get_tracer("baton.routing"),
            limit=limit,
        )
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await database.start()
        consumer = await require_consumer(servers, STREAM_EVENTS, CONSUMER_ROUTING)
        if consumer.max_deliver is not None:
            limit.max_deliver = consumer.max_deliver
        await broker.start()
        log.info(
            "routing consuming %s/%s (dead-letter on delivery %d) with %d departments (fallback %s)",
            STREAM_EVENTS,
            CONSUMER_ROUTING,
            limit.max_deliver,
            len(catalog.departments),
            catalog.fallback_department,
        )
        try:
            yield
        finally:
            await broker.stop()
            await database.close()
            tracer_provider.shutdown()

    app = FastAPI(title="Baton routing", version="1.0.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.catalog = catalog
    app.state.broker = broker
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
        return JSONResponse(
            {"ready": all(checks.values()), "checks": checks}, status_code=200 if all(checks.values()) else 503
        )

    @app.get("/v1/catalog", tags=["catalog"])
    async def get_catalog() -> dict[str, Any]:
        return {
            "version": catalog.version,
            "fallback_department": catalog.fallback_department,
            "departments": [
                {
                    "slug": d.slug,
                    "name": d.name,
                    "kind": d.kind.value,
                    "categories": list(d.categories),
                    "timezone": d.timezone,
                }
                for d in catalog.departments
            ],
        }

    @app.get("/v1/requests/{request_id}/routing", tags=["requests"])
    async def get_routing(request_id: Annotated[str, Path(pattern=ID_PATTERN)]) -> dict[str, Any]:
        async with database.transaction() as session:
            rows = await db.decisions_of(session, request_id)
        if not rows:
            raise HTTPException(404, f"no routing decision for request {request_id}")
        return {
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
        }

    return app


def _iso(value: datetime | None) -> str | None:
    aware = db.aware(value)
    return aware.isoformat() if aware is not None else None


async def _db_ok(database: db.Database) -> bool:
    try:
        return await database.ping()
    except Exception:
        log.warning("database not reachable", exc_info=True)
        return False
