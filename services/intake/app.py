"""Intake's whole wiring: settings -> telemetry -> middlewares -> broker -> routers -> HTTP app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import nats
from fastapi import FastAPI
from faststream.nats import NatsBroker
from faststream.prometheus import PrometheusMiddleware
from nats.aio.client import Client as NATSClient
from nats.js.errors import NotFoundError
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter, make_asgi_app
from starlette.responses import JSONResponse

from libs.contracts.broker_metrics import bounded_labels
from libs.contracts.publishing import jetstream_publish_many, sequential_publish_many
from libs.contracts.pull import prompt_pull
from libs.contracts.subjects import CONSUMER_ADVISORIES, CONSUMER_INTAKE, STREAM_ADVISORIES, STREAM_IN
from libs.contracts.tokens import TokenRegistry
from libs.contracts.tracing import make_tracer_provider, send_span
from libs.contracts.watchdog import busy

from . import api, db
from .advisories import AdvisoryProcessor, build_advisory_router, jetstream_getter
from .handlers import IntakeProcessor, build_router
from .lease import Lease, wait_for_handover
from .settings import IntakeSettings

SERVICE_NAME = "baton-intake"
#: Seconds without a handled message, while messages wait, before the consumer watchdog resubscribes.
STALLED_AFTER = 10.0
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
    # Spans are made by Baton itself (libs/contracts/tracing.py), not by FastStream's middleware.
    middlewares = [
        PrometheusMiddleware(settings_provider_factory=bounded_labels, registry=registry, app_name=SERVICE_NAME)
    ]
    # Two connections: ``broker`` publishes (HTTP API, canonical log) in every replica; ``consumer``
    # runs the BATON_IN subscription, started only in the replica that holds the intake lease.
    broker = NatsBroker(
        servers,
        **settings.broker_options(),
        name=SERVICE_NAME,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        graceful_timeout=settings.graceful_timeout,
        log_level=logging.DEBUG,
        middlewares=middlewares,
    )
    consumer = NatsBroker(
        servers,
        **settings.broker_options(),
        name=f"{SERVICE_NAME}-consumer",
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        graceful_timeout=settings.graceful_timeout,
        log_level=logging.DEBUG,
        middlewares=middlewares,
    )
    database = db.Database(settings.database_url)

    async def publish(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        with send_span(tracer, subject, body, {"Nats-Msg-Id": msg_id}) as headers:
            await broker.publish(body, subject, headers=headers, stream=stream, timeout=10)

    processor = IntakeProcessor(
        database,
        publish,
        publish_many=jetstream_publish_many(
            lambda: broker.config.broker_config.connection_state.stream, tracer, sequential_publish_many(publish)
        ),
    )
    tokens = TokenRegistry(settings.tokens_path)
    if settings.tokens_path is None:
        log.warning("no token file (BATON_INTAKE_TOKENS_PATH): the HTTP API refuses every call")
    limits: dict[str, int] = {}
    resubscriptions = Counter(
        "baton_intake_resubscriptions",
        "Pull subscriptions restarted by the stall watchdog (messages waited, none was handled).",
        ["consumer"],
        registry=registry,
    )
    gate = ConsumerGate(
        consumer,
        before_open=lambda: wait_for_handover(broker.connection, STREAM_IN, CONSUMER_INTAKE),
        on_resubscribe=resubscriptions.labels(CONSUMER_INTAKE).inc,
    )
    consumer.include_router(
        build_router(
            processor,
            active=gate.handling,
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

    for sub in (*consumer.subscribers, *broker.subscribers):  # a batch handed over at once (libs/contracts/pull.py)
        prompt_pull(sub, idle=settings.fetch_timeout)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await database.start(migrate=settings.migrate_on_start)
        limits["max_deliver"] = await require_consumer(servers, STREAM_IN, CONSUMER_INTAKE, nats_options)
        await require_consumer(servers, STREAM_ADVISORIES, CONSUMER_ADVISORIES, nats_options)
        await broker.start()
        lease: Lease | None = None
        if settings.consumer_lease:
            lease = Lease(broker.connection, on_acquired=gate.open, on_lost=gate.close)
            await lease.start()
            log.info("intake: %s/%s consumed while holding lease %s", STREAM_IN, CONSUMER_INTAKE, lease.key)
        else:
            await gate.open()
            log.info("intake consuming %s/%s (no lease)", STREAM_IN, CONSUMER_INTAKE)
        app.state.lease = lease
        outbox = asyncio.create_task(_drain_outbox(processor, settings.outbox_interval), name="intake-outbox")
        watchdog = asyncio.create_task(gate.watch(broker.connection), name="intake-consumer-watchdog")
        try:
            yield
        finally:
            for task in (outbox, watchdog):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await gate.close()  # drains the batch in hand, then releases the lease for a standby
            if lease is not None:
                await lease.stop()
            await consumer.stop()
            await broker.stop()
            await database.close()
            tracer_provider.shutdown()

    app = FastAPI(title="Baton intake", version="1.0.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.broker = broker
    app.state.database = database
    app.state.processor = processor
    app.state.gate = gate
    app.state.registry = registry
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


class ConsumerGate:
    """Starts and stops the BATON_IN subscription as the lease comes and goes.

    Stopping lets the batch in hand finish (up to ``graceful_timeout``); the handler itself stops
    between messages once ``open`` is False (``build_router``'s ``still_consuming``).
    """

    def __init__(
        self,
        consumer: NatsBroker,
        before_open: Callable[[], Awaitable[object]] | None = None,
        on_resubscribe: Callable[[], object] | None = None,
    ) -> None:
        self.consumer = consumer
        self.before_open = before_open
        self.on_resubscribe = on_resubscribe
        self.is_open = False
        self.last_handled = 0.0
        self.opened_at = 0.0
        self.resubscriptions = 0
        self._started = False
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        async with self._lock:
            if self.is_open:
                return
            if self.before_open is not None:
                log.info("intake: lease held; waiting for the previous holder's deliveries")
                await self.before_open()
            self.is_open = True  # before the first fetch: the handler hands back what it fetches while closed
            try:
                if not self._started:
                    await self.consumer.start()
                    self._started = True
                else:
                    for sub in self.consumer.subscribers:
                        await sub.start()
            except BaseException:
                self.is_open = False
                raise
            self.opened_at = time.monotonic()
            log.info("intake: consuming %s/%s", STREAM_IN, CONSUMER_INTAKE)

    def handling(self) -> bool:
        """Called by the handler before each message: may it go on? (Also the watchdog's sign of life.)"""
        self.last_handled = time.monotonic()
        return self.is_open

    async def watch(self, nc: NATSClient, *, every: float = 5.0, stalled_after: float = STALLED_AFTER) -> None:
        """Resubscribe when the subscription stalls: open, messages waiting, none handled for ``stalled_after``.

        Seen after the NATS node leading the stream was killed: the client reconnected elsewhere, the pull
        loop kept fetching, but no message came any more. A fresh subscription gets them flowing again.
        """
        while True:
            await asyncio.sleep(every)
            if not self.is_open or time.monotonic() - max(self.last_handled, self.opened_at) < stalled_after:
                continue
            if any(busy(sub) for sub in self.consumer.subscribers):
                continue  # a batch in hand (maybe a long in-place retry): not stalled
            try:
                info = await nc.jetstream(timeout=2).consumer_info(STREAM_IN, CONSUMER_INTAKE)
            except Exception as exc:
                log.debug("watchdog: no consumer info: %s", exc)
                continue
            if info.num_pending or info.num_ack_pending:
                log.warning(
                    "intake: %d messages waiting (%d unacked), none handled for %.0fs: resubscribing to %s/%s",
                    info.num_pending,
                    info.num_ack_pending,
                    time.monotonic() - self.last_handled,
                    STREAM_IN,
                    CONSUMER_INTAKE,
                )
                self.resubscriptions += 1
                if self.on_resubscribe is not None:
                    self.on_resubscribe()
                await self.close()
                await self.open()

    async def close(self) -> None:
        async with self._lock:
            if not self.is_open:
                return
            self.is_open = False
            for sub in self.consumer.subscribers:
                try:
                    await sub.stop()
                except Exception:
                    # NATS unreachable: the subscription is gone with the connection anyway. Forget it, so
                    # that the next open() subscribes afresh instead of finding a dead one.
                    log.warning("intake: stopping the BATON_IN subscription failed", exc_info=True)
                    with contextlib.suppress(Exception):
                        sub.subscription = None  # type: ignore[attr-defined]


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
