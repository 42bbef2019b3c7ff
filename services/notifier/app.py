"""Notifier's whole wiring: settings -> telemetry -> middlewares -> broker -> routers -> HTTP app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path as FilePath
from typing import Annotated, Any

import nats
from fastapi import FastAPI, HTTPException, Path
from faststream.nats import NatsBroker
from faststream.prometheus import PrometheusMiddleware
from nats.js.errors import NotFoundError
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.responses import JSONResponse

from libs.contracts import Catalog
from libs.contracts.broker_metrics import bounded_labels
from libs.contracts.catalog_file import load_catalog
from libs.contracts.envelope import ID_PATTERN
from libs.contracts.publishing import jetstream_publish_many, sequential_publish_many
from libs.contracts.subjects import CONSUMER_NOTIFIER, STREAM_EVENTS
from libs.contracts.tokens import TokenRegistry
from libs.contracts.tracing import make_tracer_provider, send_span
from libs.contracts.watchdog import watch, watch_subscriptions

from . import db
from .api import FeedSource, build_api
from .domain import Directory
from .handlers import CONSUMER_SPEC, NotifierMetrics, NotifierProcessor, build_router
from .settings import NotifierSettings
from .webhooks import RetryPolicy
from .workers import DigestWorker, WebhookWorker

SERVICE_NAME = "baton-notifier"
log = logging.getLogger("baton.notifier")


async def require_consumer(
    servers: list[str], stream: str, durable: str, options: dict[str, Any] | None = None
) -> None:
    """Fail fast, with the fix, when the durable consumer was not provisioned (services never create one)."""
    nc = await nats.connect(
        servers, connect_timeout=5, max_reconnect_attempts=3, name=f"{SERVICE_NAME}-check", **(options or {})
    )
    try:
        await nc.jetstream().consumer_info(stream, durable)
    except NotFoundError as exc:
        raise RuntimeError(f"consumer {stream}/{durable} does not exist: run `baton provision` first") from exc
    finally:
        await nc.close()


def create_app(
    settings: NotifierSettings, *, catalog: Catalog | None = None, tracer_provider: TracerProvider | None = None
) -> FastAPI:
    """The notifier service; ``catalog`` overrides reading ``settings.catalog_path`` (tests)."""
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE_NAME)
    tracer = tracer_provider.get_tracer("baton.notifier")
    registry = CollectorRegistry()
    servers = [s.strip() for s in settings.nats_url.split(",") if s.strip()]
    directory = Directory(catalog if catalog is not None else load_catalog(settings.catalog_path))

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

    metrics = NotifierMetrics(registry)
    webhooks = WebhookWorker(
        database,
        policy=RetryPolicy(
            base=settings.webhook_backoff_base,
            cap=settings.webhook_backoff_max,
            give_up_after=settings.webhook_retry_for,
        ),
        timeout=settings.webhook_timeout,
        poll_interval=settings.webhook_poll_interval,
        concurrency=settings.webhook_concurrency,
        per_subscription=settings.webhook_per_subscription,
        tracer=tracer,
        on_outcome=lambda outcome: metrics.webhook_attempts.labels(outcome).inc(),
    )
    digests = DigestWorker(database, publish, directory, interval=settings.digest_interval, on_deliveries=webhooks.wake)
    tokens = TokenRegistry(FilePath(settings.tokens_path) if settings.tokens_path else None)
    feed = FeedSource(servers, nats_options)

    processor = NotifierProcessor(
        database,
        publish,
        directory,
        max_deliver=CONSUMER_SPEC.max_deliver,
        gap_delay=settings.gap_delay,
        gap_max_delay=settings.gap_max_delay,
        metrics=metrics,
        on_deliveries=webhooks.wake,
        publish_many=jetstream_publish_many(
            lambda: broker.config.broker_config.connection_state.stream, tracer, sequential_publish_many(publish)
        ),
    )
    broker.include_router(
        build_router(
            processor,
            batch_size=settings.fetch_batch,
            fetch_timeout=settings.fetch_timeout,
            retry_delay=settings.retry_delay,
            inbox_prefix=settings.subscriber_inbox_prefix(),
            metrics=metrics,
            tracer=tracer,
        )
    )
    # A batch handed over as soon as anything arrived, and a stall watchdog per subscription (libs/contracts).
    watchdogs = watch_subscriptions(broker, registry, "notifier", idle=settings.fetch_timeout)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await database.start(migrate=settings.migrate_on_start)
        await require_consumer(servers, STREAM_EVENTS, CONSUMER_NOTIFIER, nats_options)
        await broker.start()
        await feed.start()
        workers = [
            asyncio.create_task(webhooks.run(), name="notifier-webhooks"),
            asyncio.create_task(digests.run(), name="notifier-digests"),
        ]
        watchdog = asyncio.create_task(watch(watchdogs), name="notifier-subscription-watchdog")
        log.info("notifier consuming %s/%s", STREAM_EVENTS, CONSUMER_NOTIFIER)
        try:
            yield
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            await broker.stop()
            await webhooks.stop()
            await digests.stop()
            await asyncio.wait(workers, timeout=settings.graceful_timeout)
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await feed.close()
            await database.close()
            tracer_provider.shutdown()

    app = FastAPI(title="Baton notifier", version="1.0.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.broker = broker
    app.state.watchdogs = watchdogs
    app.state.database = database
    app.state.processor = processor
    app.state.webhooks = webhooks
    app.state.digests = digests
    app.state.tokens = tokens
    app.mount("/metrics", make_asgi_app(registry))
    app.include_router(
        build_api(database, tokens, directory, feed, heartbeat=settings.feed_heartbeat, on_requeue=webhooks.wake)
    )

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        checks = {"nats": await broker.ping(timeout=2), "database": await _db_ok(database)}
        return JSONResponse(
            {"ready": all(checks.values()), "checks": checks}, status_code=200 if all(checks.values()) else 503
        )

    @app.get("/v1/requests/{request_id}/notifications", tags=["requests"])
    async def request_notifications(request_id: Annotated[str, Path(pattern=ID_PATTERN)]) -> list[dict[str, Any]]:
        """Every notification sent (or about to be sent) for a request, in event order."""
        async with database.transaction() as session:
            if await db.load_projection(session, request_id, for_update=False) is None:
                raise HTTPException(404, f"request {request_id} not found")
            rows = await db.request_notifications(session, request_id)
        return [
            {
                "notification_id": r.notification_id,
                "department": r.department,
                "role": r.role,
                "type": r.type,
                "sequence": r.sequence,
                "text": r.text,
                "published": r.published_at is not None,
                "delivery": r.delivery or "immediate",
                "digest_id": r.digest_id,
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
