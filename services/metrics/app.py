"""Metrics' whole wiring: settings -> telemetry -> middlewares -> broker -> routers -> HTTP app.

HTTP: the JSON API under ``/v1`` (timelines, scorecards, the service map, post-mortems, exports) and
the dashboard (server-rendered pages). Both go through :mod:`services.metrics.access`: scorecards
for every signed-in department, request-level views only for the parties to the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path as FilePath
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

import nats
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from faststream.nats import NatsBroker
from faststream.prometheus import PrometheusMiddleware
from nats.js.errors import NotFoundError
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from libs.contracts.broker_metrics import bounded_labels
from libs.contracts.catalog import Catalog
from libs.contracts.catalog_file import CatalogError, load_catalog
from libs.contracts.envelope import ID_PATTERN, SLUG_PATTERN
from libs.contracts.publishing import jetstream_publish_many, sequential_publish_many
from libs.contracts.subjects import CONSUMER_METRICS, STREAM_EVENTS
from libs.contracts.tracing import make_tracer_provider, send_span
from libs.contracts.watchdog import watch, watch_subscriptions

from . import db, pages
from .access import COOKIE, Access, Viewer, safe_next
from .charts import swimlanes
from .domain import RequestSummary, Timeline
from .facts import RequestFacts, changes
from .handlers import MetricsProcessor, Outcome, build_router
from .kpis import Scorecard, Scorecards, ServiceMap, Trend, parse_window, to_csv
from .live import LiveFeed
from .postmortem import PostMortem, to_markdown
from .settings import MetricsSettings
from .views import Reader

SERVICE_NAME = "baton-metrics"
PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("baton.metrics")

ACCEPT_BUCKETS = (300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 432000, 864000)
RESOLVE_BUCKETS = (3600, 14400, 28800, 86400, 172800, 259200, 432000, 864000, 1728000)
WINDOWS = ("7d", "30d", "90d")


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


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


class CatalogHolder:
    """The department catalog, re-read when its file changes (an invalid edit keeps the last good one)."""

    def __init__(self, path: FilePath | None) -> None:
        self.path = path
        self._stamp: float | None = None
        self._catalog: Catalog | None = None

    def __call__(self) -> Catalog | None:
        if self.path is None:
            return None
        try:
            stamp = self.path.stat().st_mtime
        except OSError:
            return self._catalog
        if stamp != self._stamp:
            try:
                self._catalog = load_catalog(self.path)
            except CatalogError as exc:
                log.warning("keeping the last good catalog: %s", exc)
            self._stamp = stamp
        return self._catalog


class BusinessMetrics:
    """Baton's own Prometheus series, fed by the projection (first projection of each fact only)."""

    def __init__(self, registry: CollectorRegistry, database: db.Database) -> None:
        self.database = database
        self.open = Gauge(
            "baton_open_requests", "Open requests by the department holding them.", ["department"], registry=registry
        )
        self.accept = Histogram(
            "baton_time_to_accept_seconds",
            "Wall-clock seconds from a handoff to its acceptance, by department.",
            ["department"],
            buckets=ACCEPT_BUCKETS,
            registry=registry,
        )
        self.resolve = Histogram(
            "baton_time_to_resolve_seconds",
            "Wall-clock seconds from a handoff to its resolution, by department.",
            ["department"],
            buckets=RESOLVE_BUCKETS,
            registry=registry,
        )
        self.delays = Counter(
            "baton_delays", "Delays by department and reason code.", ["department", "reason"], registry=registry
        )
        self.escalations = Counter(
            "baton_escalations", "SLA escalations by department and clock.", ["department", "clock"], registry=registry
        )
        self._departments: set[str] = set()
        self._open_stale = False

    async def on_facts(self, before: RequestFacts | None, after: RequestFacts) -> None:
        try:
            change = changes(before, after)
            for dept, seconds in change.accepted:
                self.accept.labels(dept).observe(seconds)
            for dept, seconds in change.resolved:
                self.resolve.labels(dept).observe(seconds)
            for dept, reason in change.delays:
                self.delays.labels(dept, reason).inc()
            for dept, clock in change.escalations:
                self.escalations.labels(dept, clock).inc()
            if before is None or before.holder != after.holder or before.state != after.state:
                self._open_stale = True  # recounted once per batch, by settle()
        except Exception:  # metrics about metrics must never fail the projection
            log.warning("could not update business metrics", exc_info=True)

    async def settle(self) -> None:
        """After a batch's facts changed: recount the open requests once (a query over every request)."""
        if not self._open_stale:
            return
        self._open_stale = False
        try:
            await self.refresh_open()
        except Exception:  # metrics about metrics must never fail the projection
            log.warning("could not update business metrics", exc_info=True)

    async def refresh_open(self) -> None:
        async with self.database.reading() as session:
            counts = await db.open_by_holder(session)
        for dept in self._departments | set(counts):
            self.open.labels(dept).set(counts.get(dept, 0))
        self._departments |= set(counts)


# --- who is asking ----------------------------------------------------------------------------
async def signed_in(request: Request) -> Viewer:
    """The viewer behind the request's bearer token or sign-in cookie; 401 without a valid one."""
    access: Access = request.app.state.access
    viewer = access.viewer(request.headers.get("authorization"), request.cookies.get(COOKIE))
    if viewer is None:
        raise StarletteHTTPException(401, "sign in with a department token (Authorization: Bearer <token>)")
    request.state.viewer = viewer
    return viewer


Who = Annotated[Viewer, Depends(signed_in)]
RequestId = Annotated[str, Path(pattern=ID_PATTERN)]
Dept = Annotated[str, Path(pattern=SLUG_PATTERN)]
WindowQ = Annotated[str | None, Query(pattern=r"^[0-9dhm ]{1,16}$", description="e.g. 7d, 30d, 12h")]


def create_app(
    settings: MetricsSettings,
    *,
    tracer_provider: TracerProvider | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> FastAPI:
    tracer_provider = tracer_provider or make_tracer_provider(SERVICE_NAME)
    tracer = tracer_provider.get_tracer("baton.metrics")
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
            PrometheusMiddleware(settings_provider_factory=bounded_labels, registry=registry, app_name=SERVICE_NAME),
        ],
    )
    database = db.Database(settings.database_url)
    business = BusinessMetrics(registry, database)
    catalog = CatalogHolder(settings.catalog_path)
    access = Access(settings.tokens_path)
    reader = Reader(database, catalog, clock)
    default_window = parse_window(settings.default_window)

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
        with send_span(tracer, subject, body, {"Nats-Msg-Id": msg_id}) as headers:
            await broker.publish(body, subject, headers=headers, stream=stream, timeout=10)

    live_feed = LiveFeed()

    async def on_facts(before: Any, after: Any) -> None:
        await business.on_facts(before, after)
        await live_feed.bump()

    processor = MetricsProcessor(
        database,
        publish,
        observe=observe,
        on_facts=on_facts,
        on_batch=business.settle,
        clock=clock,
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
            tracer=tracer,
            inbox_prefix=settings.subscriber_inbox_prefix(),
        )
    )
    # A batch handed over as soon as anything arrived, and a stall watchdog per subscription (libs/contracts).
    watchdogs = watch_subscriptions(broker, registry, "metrics", idle=settings.fetch_timeout)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if access.open:
            log.warning(
                "BATON_METRICS_TOKENS_PATH is not set: OPEN ACCESS, every visitor sees every request. "
                "Set it to a token file (baton tokens) for any shared deployment."
            )
        await database.start(migrate=settings.migrate_on_start)
        await business.refresh_open()
        await require_consumer(servers, STREAM_EVENTS, CONSUMER_METRICS, nats_options)
        await broker.start()
        log.info("metrics consuming %s/%s", STREAM_EVENTS, CONSUMER_METRICS)
        watchdog = asyncio.create_task(watch(watchdogs), name="metrics-subscription-watchdog")
        try:
            yield
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            await broker.stop()
            await database.close()
            tracer_provider.shutdown()

    app = FastAPI(title="Baton metrics", version="1.0.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.broker = broker
    app.state.watchdogs = watchdogs
    app.state.database = database
    app.state.processor = processor
    app.state.access = access
    app.state.registry = registry
    app.state.reader = reader
    app.mount("/metrics", make_asgi_app(registry))

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request: Request, exc: StarletteHTTPException) -> Response:
        if _wants_html(request) and exc.status_code in {401, 404}:
            if exc.status_code == 401:
                return RedirectResponse(f"/login?next={quote(_here(request), safe='/')}", status_code=303)
            viewer = getattr(request.state, "viewer", None)
            body = pages.render("error.html", viewer=viewer, open_access=access.open, status=404, message=exc.detail)
            return HTMLResponse(body, status_code=404)
        headers = {"WWW-Authenticate": 'Bearer realm="baton"'} if exc.status_code == 401 else None
        response = problem(exc.status_code, _reason(exc.status_code), str(exc.detail))
        if headers:
            response.headers.update(headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_problem(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "code": e.get("type", ""), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        return problem(422, "Unprocessable Content", "the request is not valid", errors=errors)

    def window_of(text: str | None) -> timedelta:
        if text is None:
            return default_window
        try:
            return parse_window(text)
        except ValueError as exc:
            raise StarletteHTTPException(422, f"window: {exc}") from exc

    async def visible_request(viewer: Viewer, request_id: str) -> Any:
        view = await reader.request(viewer, request_id)
        if view is None:
            raise StarletteHTTPException(404, f"request {request_id} not found")
        return view

    # --- operations ----------------------------------------------------------------------
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        checks = {"nats": await broker.ping(timeout=2), "database": await _db_ok(database)}
        return JSONResponse(
            {"ready": all(checks.values()), "checks": checks}, status_code=200 if all(checks.values()) else 503
        )

    # --- JSON API --------------------------------------------------------------------------
    @app.get("/v1/whoami", tags=["access"])
    async def whoami(viewer: Who) -> dict[str, Any]:
        return {
            "department": viewer.department,
            "operator": viewer.operator,
            "open_access": viewer.open_access,
            "token_id": viewer.token_id,
        }

    @app.get(
        "/v1/requests/{request_id}/timeline",
        tags=["requests"],
        response_model=Timeline,
        responses={404: {"description": "Unknown request, or one the caller is not party to (problem JSON)."}},
    )
    async def timeline(request_id: RequestId, viewer: Who) -> Timeline:
        view = await visible_request(viewer, request_id)
        result: Timeline = view.timeline
        return result

    @app.get("/v1/requests/{request_id}/postmortem", tags=["requests"], response_model=PostMortem)
    async def postmortem_json(request_id: RequestId, viewer: Who) -> PostMortem:
        view = await visible_request(viewer, request_id)
        if view.postmortem is None:
            raise StarletteHTTPException(404, f"request {request_id} has no post-mortem (not resolved, or went well)")
        result: PostMortem = view.postmortem
        return result

    @app.get("/v1/requests/{request_id}/postmortem.md", tags=["requests"], response_class=PlainTextResponse)
    async def postmortem_markdown(request_id: RequestId, viewer: Who) -> Response:
        pm = await postmortem_json(request_id, viewer)
        return PlainTextResponse(
            to_markdown(pm),
            media_type="text/markdown; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="postmortem-{request_id}.md"'},
        )

    @app.get("/v1/requests", tags=["requests"], response_model=list[RequestSummary])
    async def requests(
        viewer: Who,
        department: Annotated[
            str | None, Query(pattern=SLUG_PATTERN, description="Only requests it is party to.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> list[RequestSummary]:
        return await reader.recent(viewer, department, limit)

    @app.get("/v1/scorecards", tags=["kpis"], response_model=Scorecards)
    async def scorecards_json(viewer: Who, window: WindowQ = None) -> Scorecards:
        cards, _trends, _map = await reader.scorecards(reader.window(window_of(window)))
        return cards

    @app.get("/v1/scorecards.csv", tags=["kpis"], response_class=PlainTextResponse)
    async def scorecards_csv(viewer: Who, window: WindowQ = None) -> Response:
        cards, _trends, _map = await reader.scorecards(reader.window(window_of(window)))
        name = f"baton-scorecards-{cards.window.end:%Y%m%d}-{window or settings.default_window}.csv".replace(" ", "")
        return PlainTextResponse(
            to_csv(cards),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @app.get("/v1/departments/{department}/scorecard", tags=["kpis"], response_model=Scorecard)
    async def department_scorecard(department: Dept, viewer: Who, window: WindowQ = None) -> Scorecard:
        cards, _trends, _map = await reader.scorecards(reader.window(window_of(window)))
        card = next((c for c in cards.departments if c.department == department), None)
        if card is None:
            raise StarletteHTTPException(404, f"department {department} is unknown")
        return card

    @app.get("/v1/trends", tags=["kpis"], response_model=dict[str, Trend])
    async def trends_json(viewer: Who, window: WindowQ = None) -> dict[str, Trend]:
        _cards, trend, _map = await reader.scorecards(reader.window(window_of(window)))
        return trend

    @app.get("/v1/service-map", tags=["kpis"], response_model=ServiceMap)
    async def service_map_json(viewer: Who, window: WindowQ = None) -> ServiceMap:
        _cards, _trends, smap = await reader.scorecards(reader.window(window_of(window)))
        return smap

    @app.get("/v1/live", tags=["ops"])
    async def live(viewer: Who) -> dict[str, object]:
        return await reader.live()

    @app.get("/v1/live/stream", tags=["ops"], response_class=StreamingResponse)
    async def live_stream(viewer: Who, request: Request) -> StreamingResponse:
        """Server-Sent Events: ``projected`` each time the projection changes (the data is only a version)."""
        server = getattr(request.app.state, "server", None)
        disconnected = False

        def stop() -> bool:
            return disconnected or bool(server is not None and server.should_exit)

        async def frames() -> AsyncIterator[str]:
            nonlocal disconnected
            async for frame in live_feed.stream(stop):
                yield frame
                disconnected = await request.is_disconnected()

        return StreamingResponse(
            frames(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    # --- the dashboard -------------------------------------------------------------------
    def page(template: str, viewer: Viewer, **context: Any) -> HTMLResponse:
        return HTMLResponse(
            pages.render(
                template,
                viewer=viewer,
                open_access=access.open,
                poll=settings.live_poll_seconds,
                windows=WINDOWS,
                **context,
            )
        )

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_form(next: str | None = None, failed: bool = False) -> HTMLResponse:
        body = pages.render("login.html", next=safe_next(next), failed=failed, open_access=access.open, viewer=None)
        return HTMLResponse(body, status_code=401 if failed else 200)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body())[:4096].decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        target = safe_next((form.get("next") or ["/"])[0])
        if access.viewer(f"Bearer {token}", None) is None or access.open:
            return RedirectResponse(f"/login?failed=1&next={quote(target, safe='/')}", status_code=303)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=settings.secure_cookie,
            max_age=12 * 3600,
            path="/",
        )
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(viewer: Who, window: WindowQ = None) -> HTMLResponse:
        length = window_of(window)
        cards, trend, smap = await reader.scorecards(reader.window(length))
        recent = await reader.recent(viewer, None, 15)
        return page(
            "index.html",
            viewer,
            cards=cards,
            trends=trend,
            smap=smap,
            requests=recent,
            window=window or settings.default_window,
        )

    @app.get("/departments/{department}", response_class=HTMLResponse, include_in_schema=False)
    async def department_page(department: Dept, viewer: Who, window: WindowQ = None) -> HTMLResponse:
        win = reader.window(window_of(window))
        cards, trend, _map = await reader.scorecards(win)
        card = next((c for c in cards.departments if c.department == department), None)
        if card is None:
            raise StarletteHTTPException(404, f"department {department} is unknown")
        dept_view = await reader.department(viewer, department, win)
        return page(
            "department.html",
            viewer,
            card=card,
            view=dept_view,
            trend=trend.get(department),
            window=window or settings.default_window,
            now=clock(),
        )

    @app.get("/requests/{request_id}", response_class=HTMLResponse, include_in_schema=False)
    async def request_page(request_id: RequestId, viewer: Who) -> HTMLResponse:
        view = await visible_request(viewer, request_id)
        lanes = swimlanes(view.timeline, view.facts, clock())
        trace_url = None
        if settings.jaeger_url and view.timeline.trace_id:
            trace_url = f"{settings.jaeger_url.rstrip('/')}/trace/{view.timeline.trace_id}"
        return page("request.html", viewer, t=view.timeline, lanes=lanes, pm=view.postmortem, trace_url=trace_url)

    @app.get("/requests/{request_id}/postmortem", response_class=HTMLResponse, include_in_schema=False)
    async def postmortem_page(request_id: RequestId, viewer: Who) -> HTMLResponse:
        pm = await postmortem_json(request_id, viewer)
        return page("postmortem.html", viewer, pm=pm)

    return app


def _wants_html(request: Request) -> bool:
    path = request.url.path
    return not path.startswith("/v1/") and not path.startswith("/metrics") and request.method == "GET"


def _here(request: Request) -> str:
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{request.url.path}{query}"


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
