"""Notifier's department-facing HTTP API: webhooks, failed deliveries, digest preferences, the live feed.

Every route here needs ``Authorization: Bearer <token>`` (``libs.contracts.tokens``). A department's
token reaches only that department's routes; an operator token reaches every department's.

No ``from __future__ import annotations`` here: FastAPI resolves the route signatures' ``Annotated``
dependency aliases, which are local to :func:`build_api`, at runtime.
"""

import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import httpx
import nats
import nats.errors
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import StreamingResponse

from libs.contracts.envelope import SLUG_PATTERN
from libs.contracts.events import EVENT_MODELS
from libs.contracts.subjects import STREAM_NOTIFY, notify_filter
from libs.contracts.tokens import Principal, TokenRegistry

from . import db
from .domain import Delivery, Directory
from .webhooks import Format, new_secret, new_webhook_id

log = logging.getLogger("baton.notifier.api")

#: What a webhook may filter on: every event type, and the digest.
FILTERABLE = frozenset(EVENT_MODELS) | {"digest"}
MAX_WEBHOOKS_PER_DEPARTMENT = 20


def _utcnow() -> datetime:
    return datetime.now(UTC)


# --- bodies --------------------------------------------------------------------------------------


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000, description="http(s) endpoint that receives a POST per notification.")
    event_types: list[str] = Field(default_factory=list, max_length=32, description="Empty: every type.")
    format: Format = Format.BATON
    description: str = Field(default="", max_length=200)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("event_types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - FILTERABLE)
        if unknown:
            raise ValueError(f"unknown event types {unknown}; choose from {sorted(FILTERABLE)}")
        return list(dict.fromkeys(value))


class WebhookOut(BaseModel):
    id: str
    department: str
    url: str
    event_types: list[str]
    format: str
    description: str
    active: bool
    created_at: datetime
    secret: str | None = Field(default=None, description="Shown once, when the webhook is created.")


class PreferencesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    digest: dict[str, Literal["immediate", "hourly", "daily"]] = Field(
        default_factory=dict, description="Event type -> immediate (default), hourly or daily."
    )
    daily_at: int = Field(default=8, ge=0, le=23, description="Hour of the daily digest, in the department's zone.")

    @field_validator("digest")
    @classmethod
    def _types(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(EVENT_MODELS))
        if unknown:
            raise ValueError(f"unknown event types {unknown}")
        return value


class PreferencesOut(BaseModel):
    department: str
    digest: dict[str, str]
    daily_at: int


class FailedDelivery(BaseModel):
    id: str
    department: str
    webhook_id: str
    notification_id: str
    type: str
    request_id: str | None
    attempts: int
    last_status: int | None
    last_error: str | None
    queued_at: datetime
    dead_at: datetime | None


def _webhook_out(row: db.WebhookRow, secret: str | None = None) -> WebhookOut:
    return WebhookOut(
        id=row.id,
        department=row.department,
        url=row.url,
        event_types=list(row.event_types or []),
        format=row.format,
        description=row.description,
        active=row.active,
        created_at=db.aware(row.created_at) or _utcnow(),
        secret=secret,
    )


# --- the live feed -------------------------------------------------------------------------------


class FeedSource:
    """Ephemeral ordered consumers on ``BATON_NOTIFY``, one per open feed (nothing to clean up on the server)."""

    def __init__(self, servers: list[str], options: dict[str, Any] | None = None) -> None:
        self.servers = servers
        self.options = dict(options or {})  # the notifier's NATS login (it may create these consumers)
        self.nc: NATS | None = None

    async def start(self) -> None:
        self.nc = await nats.connect(
            self.servers,
            name="baton-notifier-feed",
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            **self.options,
        )

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def subscribe(self, department: str, after: int | None) -> Any:
        if self.nc is None or not self.nc.is_connected:
            raise HTTPException(503, "NATS is not reachable; try again shortly")
        if after is None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1)
        return await self.nc.jetstream().subscribe(
            notify_filter(department), stream=STREAM_NOTIFY, ordered_consumer=True, config=config, idle_heartbeat=5
        )


def sse_frame(sequence: int, kind: str, data: bytes) -> bytes:
    """One Server-Sent Event: the stream sequence as ``id`` (so Last-Event-ID resumes exactly)."""
    return f"id: {sequence}\nevent: {kind}\ndata: ".encode() + data.replace(b"\n", b" ") + b"\n\n"


# --- the routes ----------------------------------------------------------------------------------


def build_api(
    database: db.Database,
    tokens: TokenRegistry,
    directory: Directory,
    feed: FeedSource,
    *,
    heartbeat: float = 15.0,
    on_requeue: Callable[[], None] | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/v1")
    bearer = HTTPBearer(auto_error=False, description="A department token (bt_<dept>_...) or an operator token.")

    def principal(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        who = tokens.verify(creds.credentials if creds is not None else None)
        if who is None:
            raise HTTPException(
                401, "a valid token is required: Authorization: Bearer bt_...", headers={"WWW-Authenticate": "Bearer"}
            )
        return who

    Who = Annotated[Principal, Depends(principal)]

    def department(dept: Annotated[str, Path(pattern=SLUG_PATTERN)], who: Who) -> str:
        if not who.operator and who.department != dept:
            raise HTTPException(403, f"this token speaks for {who.department}, not {dept}")
        if dept not in directory:
            raise HTTPException(404, f"department {dept} is not in the catalog")
        return dept

    Dept = Annotated[str, Depends(department)]

    # --- webhooks ---
    @router.post("/departments/{dept}/webhooks", status_code=201, tags=["webhooks"])
    async def add_webhook(dept: Dept, body: WebhookIn) -> WebhookOut:
        """Register an endpoint; the response carries the signing secret, shown only this once."""
        secret = new_secret()
        async with database.transaction() as session:
            existing = await db.department_webhooks(session, dept)
            if len(existing) >= MAX_WEBHOOKS_PER_DEPARTMENT:
                raise HTTPException(409, f"{dept} already has {MAX_WEBHOOKS_PER_DEPARTMENT} webhooks")
            row = db.WebhookRow(
                id=new_webhook_id(),
                department=dept,
                url=body.url,
                secret=secret,
                event_types=body.event_types,
                format=body.format.value,
                description=body.description,
                active=True,
                created_at=_utcnow(),
            )
            session.add(row)
        return _webhook_out(row, secret)

    @router.get("/departments/{dept}/webhooks", tags=["webhooks"])
    async def list_webhooks(dept: Dept) -> list[WebhookOut]:
        async with database.transaction() as session:
            return [_webhook_out(r) for r in await db.department_webhooks(session, dept)]

    @router.delete("/departments/{dept}/webhooks/{webhook_id}", status_code=204, tags=["webhooks"])
    async def remove_webhook(dept: Dept, webhook_id: str) -> Response:
        """Remove an endpoint and the deliveries still queued for it."""
        async with database.transaction() as session:
            row = await session.get(db.WebhookRow, webhook_id)
            if row is None or row.department != dept:
                raise HTTPException(404, f"no webhook {webhook_id} for {dept}")
            await session.delete(row)
            await db.drop_pending_deliveries(session, webhook_id)
        return Response(status_code=204)

    @router.get("/webhooks/failed", tags=["webhooks"])
    async def failed(
        who: Who, department: Annotated[str | None, Query(pattern=SLUG_PATTERN)] = None
    ) -> list[FailedDelivery]:
        """Dead-lettered deliveries, newest first: every department's for an operator, else the token's own."""
        if not who.operator:
            if department is not None and department != who.department:
                raise HTTPException(403, f"this token speaks for {who.department}, not {department}")
            department = who.department
        async with database.transaction() as session:
            rows = await db.failed_deliveries(session, department)
        return [
            FailedDelivery(
                id=r.id,
                department=r.department,
                webhook_id=r.subscription_id,
                notification_id=r.notification_id,
                type=r.type,
                request_id=r.request_id,
                attempts=r.attempts,
                last_status=r.last_status,
                last_error=r.last_error,
                queued_at=db.aware(r.created_at) or _utcnow(),
                dead_at=db.aware(r.dead_at),
            )
            for r in rows
        ]

    @router.post("/webhooks/deliveries/{delivery_id}/retry", tags=["webhooks"])
    async def retry(who: Who, delivery_id: str) -> dict[str, str]:
        """Put a dead-lettered delivery back in the queue (a fresh retry window starts now)."""
        now = _utcnow()
        async with database.transaction() as session:
            row = await session.get(db.DeliveryRow, delivery_id)
            if row is None or (not who.operator and row.department != who.department):
                raise HTTPException(404, f"no delivery {delivery_id}")
            if row.status != db.DeliveryStatus.DEAD:
                raise HTTPException(409, f"delivery {delivery_id} is {row.status}, not dead")
            row.status = db.DeliveryStatus.PENDING
            row.next_attempt_at = now
            row.created_at = now
            row.dead_at = None
            row.lease_until = None
        if on_requeue is not None:
            on_requeue()
        return {"id": delivery_id, "status": db.DeliveryStatus.PENDING}

    # --- digest preferences ---
    @router.get("/departments/{dept}/preferences", tags=["digests"])
    async def get_preferences(dept: Dept) -> PreferencesOut:
        async with database.transaction() as session:
            row = await session.get(db.PreferenceRow, dept)
        if row is None:
            return PreferencesOut(department=dept, digest={}, daily_at=8)
        return PreferencesOut(department=dept, digest=dict(row.digest or {}), daily_at=row.daily_at)

    @router.put("/departments/{dept}/preferences", tags=["digests"])
    async def put_preferences(dept: Dept, body: PreferencesIn) -> PreferencesOut:
        """Replace the department's choices: per event type, immediate (the default), hourly or daily digest."""
        digest: dict[str, str] = {k: v for k, v in sorted(body.digest.items()) if v != Delivery.IMMEDIATE.value}
        async with database.transaction() as session:
            row = await session.get(db.PreferenceRow, dept)
            if row is None:
                session.add(db.PreferenceRow(department=dept, digest=digest, daily_at=body.daily_at))
            else:
                row.digest = digest
                row.daily_at = body.daily_at
                row.updated_at = _utcnow()
        return PreferencesOut(department=dept, digest=digest, daily_at=body.daily_at)

    # --- the live feed ---
    @router.get(
        "/departments/{dept}/feed",
        tags=["feed"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def live_feed(
        dept: Dept, request: Request, last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None
    ) -> StreamingResponse:
        """Server-Sent Events: the department's notifications as they are published (``id`` = stream sequence;
        send ``Last-Event-ID`` to resume after it)."""
        after = int(last_event_id) if last_event_id and last_event_id.strip().isdigit() else None
        sub = await feed.subscribe(dept, after)

        async def frames() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 3000\n\n"
                while True:
                    try:
                        msg = await sub.next_msg(timeout=heartbeat)
                    except nats.errors.TimeoutError:
                        if await request.is_disconnected():
                            return
                        yield b": keepalive\n\n"
                        continue
                    yield sse_frame(msg.metadata.sequence.stream, msg.subject.rsplit(".", 1)[-1], msg.data or b"")
            finally:
                try:
                    await sub.unsubscribe()
                except Exception:
                    log.debug("feed unsubscribe failed", exc_info=True)

        return StreamingResponse(
            frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return router
