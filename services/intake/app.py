"""Intake's whole wiring: settings -> telemetry -> middlewares -> broker -> routers -> HTTP app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
from fastapi import FastAPI
from faststream.nats import NatsBroker
from faststream.nats.prometheus import NatsPrometheusMiddleware
from nats.js.errors import NotFoundError
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.responses import JSONResponse

from libs.contracts.subjects import CONSUMER_ADVISORIES, CONSUMER_INTAKE, STREAM_ADVISORIES, STREAM_IN
from libs.contracts.tokens import TokenRegistry
from libs.contracts.tracing import make_tracer_provider, send_span

from . import api, db
from .advisories import AdvisoryProcessor, build_advisory_router, jetstream_getter
from .handlers import IntakeProcessor, build_router
from .settings import IntakeSettings

SERVICE_NAME = "baton-intake"
log = logging.getLogger("baton.intake")


async def require_consumer(servers: list[str], stream: str, durable: str, options: dict[str, Any] | None = None) -> int:
    """Fail fast, with the fix, when the durable consumer was not provisioned (services never create one).

    Returns the consumer's provisioned ``max_deliver`` (the handler dead-letters on that delivery)."""
    nc = await nats.connect(
        servers, connect_timeout=5, max_reconnect_attempts=3, name=f"{SERVICE_NAME}-check", **(options or {})
    )
    try:
        info = await nc.jetstream().consumer_info(stream, durable)
        return int(info.config.max_deliver or -1)
    except NotFoundError as exc:
        raise RuntimeError(f"consumer {stream}/{durable} does not exist: run `baton provision` first") from exc
    finally:
        await nc.close()


def create_app(settings: IntakeSettings, *, tracer_provider: TracerProvider | None = None) -> FastAPI:
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE_NAME)
    tracer = tracer_provider.get_tracer("baton.intake")
    registry = CollectorRegistry()
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
            NatsPrometheusMiddleware(registry=registry, app_name=SERVICE_NAME),
        ],
    )
    database = db.Database(settings.database_url)

    async def publish(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        with send_span(tracer, subject, body, {"Nats-Msg-Id": msg_id}) as headers:
            await broker.publish(body, subject, headers=headers, stream=stream, timeout=10)

    processor = IntakeProcessor(database, publish)
    tokens = TokenRegistry(settings.tokens_path)
    if settings.tokens_path is None:
        log.warning("no token file (BATON_INTAKE_TOKENS_PATH): the HTTP API refuses every call")
    limits: dict[str, int] = {}
    broker.include_router(
        build_router(
            processor,
            tracer=tracer,
            batch_size=settings.fetch_batch,
            fetch_timeout=settings.fetch_timeout,
            retry_delay=settings.retry_delay,
            max_deliver=lambda: limits.get("max_deliver"),
            inbox_prefix=settings.subscriber_inbox_prefix(),
        )
    )
    # Dead letters from JetStream's give-up advisories, for every service consumer (docs/reliability.md).
    advisories = AdvisoryProcessor(
        jetstream_getter(lambda *a, **kw: broker.connection.jsm().get_msg(*a, **kw)), publish
    )
    broker.include_router(
        build_advisory_router(
            advisories,
            batch_size=settings.fetch_batch,
            fetch_timeout=settings.fetch_timeout,
            retry_delay=settings.retry_delay,
            inbox_prefix=settings.subscriber_inbox_prefix(),
        )
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await database.start(migrate=settings.migrate_on_start)
        limits["max_deliver"] = await require_consumer(servers, STREAM_IN, CONSUMER_INTAKE, nats_options)
        await require_consumer(servers, STREAM_ADVISORIES, CONSUMER_ADVISORIES, nats_options)
        await broker.start()
        log.info("intake consuming %s/%s", STREAM_IN, CONSUMER_INTAKE)
        outbox = asyncio.create_task(_drain_outbox(processor, settings.outbox_interval), name="intake-outbox")
        try:
            yield
        finally:
            outbox.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await outbox
            await broker.stop()
            await database.close()
            tracer_provider.shutdown()

    app = FastAPI(title="Baton intake", version="1.0.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.broker = broker
    app.state.database = database
    app.state.processor = processor
    app.state.tracer = tracer
    app.state.tokens = tokens
    app.mount("/metrics", make_asgi_app(registry))
    app.include_router(api.router)
    api.install_error_handlers(app)
    api.install_openapi(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        checks = {"nats": await broker.ping(timeout=2), "database": await _db_ok(database)}
        return JSONResponse(
            {"ready": all(checks.values()), "checks": checks}, status_code=200 if all(checks.values()) else 503
        )

    return app


async def _drain_outbox(processor: IntakeProcessor, interval: float) -> None:
    """Publish what HTTP submissions committed but could not confirm (NATS down, a crash)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await processor.publish_pending(older_than=interval)
        except Exception:
            log.warning("outbox: publishing pending canonical events failed; retrying", exc_info=True)


async def _db_ok(database: db.Database) -> bool:
    try:
        return await database.ping()
    except Exception:
        log.warning("database not reachable", exc_info=True)
        return False
