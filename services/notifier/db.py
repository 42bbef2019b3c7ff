"""Notifier's own database: the per-request projection, the events applied, the outbox, digests,
department preferences, webhook subscriptions and webhook deliveries.

SQLAlchemy 2 (async). SQLite is the embedded default, PostgreSQL the production database.
Applying an event is one transaction: the projection moves, the event is recorded as
processed, every notification it causes is written to the outbox, and every webhook delivery
it causes is queued; publishing and delivering follow. The schema is made and changed by the
Alembic migrations in ``services/notifier/migrations`` (:func:`create_schema`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs import migrations as schema
from libs.contracts.database import (
    PendingInserts,
    make_engine,
    update_guarded,
    write_lock,
    write_transaction,
)

from .domain import Delivery, Projection
from .migrations import migrations
from .webhooks import delivery_id, wants


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ProjectionRow(Base):
    """The notifier's view of one request (see :class:`domain.Projection`)."""

    __tablename__ = "projections"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    requester_department: Mapped[str] = mapped_column(String(32))
    holder_department: Mapped[str | None] = mapped_column(String(32))
    past_holders: Mapped[list[str]] = mapped_column(JSON, default=list)
    watchers: Mapped[list[str]] = mapped_column(JSON, default=list)
    title: Mapped[str] = mapped_column(String(200))
    eta: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delay_count: Mapped[int] = mapped_column(Integer, default=0)
    last_sequence: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    reopen_count: Mapped[int | None] = mapped_column(Integer, default=0)
    notices: Mapped[list[str] | None] = mapped_column(JSON, default=list)

    def to_projection(self) -> Projection:
        return Projection(
            request_id=self.request_id,
            requester_department=self.requester_department,
            holder_department=self.holder_department,
            past_holders=tuple(self.past_holders),
            watchers=tuple(self.watchers),
            title=self.title,
            eta=aware(self.eta),
            delay_count=self.delay_count,
            last_sequence=self.last_sequence,
            reopen_count=self.reopen_count or 0,
            notices=tuple(self.notices or ()),
        )


_PROJECTIONS = Base.metadata.tables[ProjectionRow.__tablename__]


class ProcessedEventRow(Base):
    """Every canonical event applied to a projection: what makes the consumer idempotent."""

    __tablename__ = "processed_events"
    __table_args__ = (UniqueConstraint("request_id", "sequence", name="uq_processed_request_sequence"),)

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64))
    sequence: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OutboxRow(Base):
    """One notification, exactly as published (``body``); republished as is on redelivery."""

    __tablename__ = "outbox"

    notification_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), index=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer, default=0)  # publish order within the event
    department: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(16))
    type: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(256))
    body: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: None or "immediate": published on its own; "hourly"/"daily": held for the department's digest.
    delivery: Mapped[str | None] = mapped_column(String(16))
    digest_id: Mapped[str | None] = mapped_column(String(80))

    @property
    def immediate(self) -> bool:
        return self.delivery in (None, Delivery.IMMEDIATE.value)


Index("ix_outbox_digest_pending", OutboxRow.department, OutboxRow.delivery, OutboxRow.digest_id)

_PROCESSED = Base.metadata.tables[ProcessedEventRow.__tablename__]
_OUTBOX = Base.metadata.tables[OutboxRow.__tablename__]


def add_processed(
    writes: PendingInserts, *, event_id: str, request_id: str, sequence: int, type: str, processed_at: datetime
) -> None:
    """Record an applied event (a ``ProcessedEventRow``), inserted with the transaction's other new rows."""
    writes.add(
        _PROCESSED,
        {
            "event_id": event_id,
            "request_id": request_id,
            "sequence": sequence,
            "type": type,
            "processed_at": processed_at,
        },
    )


def add_notification(
    writes: PendingInserts,
    *,
    notification_id: str,
    event_id: str,
    request_id: str,
    sequence: int,
    position: int,
    department: str,
    role: str,
    type: str,
    subject: str,
    body: str,
    text: str,
    created_at: datetime,
    delivery: str,
) -> None:
    """Store a notification in the outbox (an ``OutboxRow``, unpublished, in no digest), inserted with the
    transaction's other new rows."""
    writes.add(
        _OUTBOX,
        {
            "notification_id": notification_id,
            "event_id": event_id,
            "request_id": request_id,
            "sequence": sequence,
            "position": position,
            "department": department,
            "role": role,
            "type": type,
            "subject": subject,
            "body": body,
            "text": text,
            "created_at": created_at,
            "delivery": delivery,
        },
    )


class PreferenceRow(Base):
    """A department's delivery choice per event type (absent = immediate)."""

    __tablename__ = "preferences"

    department: Mapped[str] = mapped_column(String(32), primary_key=True)
    digest: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # event type -> "hourly" | "daily"
    daily_at: Mapped[int] = mapped_column(Integer, default=8)  # hour of the daily digest, department time
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DigestRow(Base):
    """One digest, exactly as published on ``baton.notify.<dept>.digest``."""

    __tablename__ = "digests"

    digest_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    department: Mapped[str] = mapped_column(String(32), index=True)
    period: Mapped[str] = mapped_column(String(16))
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    count: Mapped[int] = mapped_column(Integer)
    subject: Mapped[str] = mapped_column(String(256))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookRow(Base):
    """A department's HTTP endpoint: which notification types it wants, in which format, signed with ``secret``."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    department: Mapped[str] = mapped_column(String(32), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(String(200))
    event_types: Mapped[list[str]] = mapped_column(JSON, default=list)  # empty = every type
    format: Mapped[str] = mapped_column(String(16), default="baton")
    description: Mapped[str] = mapped_column(String(200), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeliveryStatus:
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


class DeliveryRow(Base):
    """One notification (or digest) to POST to one webhook, with its retry state: the durable delivery queue."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_deliveries_due", "status", "subscription_id", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    subscription_id: Mapped[str] = mapped_column(String(40))
    department: Mapped[str] = mapped_column(String(32), index=True)
    notification_id: Mapped[str] = mapped_column(String(80))
    type: Mapped[str] = mapped_column(String(32))
    request_id: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    traceparent: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dead_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything Baton stores is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


async def create_schema(engine: AsyncEngine, *, migrate: bool = True) -> None:
    """Migrate the database to head (services/notifier/migrations), or with ``migrate=False`` only check
    that it is there. Safe when several replicas start at once (libs.migrations locks the upgrade)."""
    if migrate:
        await schema.upgrade(engine, migrations())
    else:
        await schema.require_head(engine, migrations())


class Database:
    """The engine plus a session factory; one per service process. On SQLite its write transactions take the
    process's ``write_lock``, one at a time (libs/contracts/database.py)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._lock = write_lock(self.engine)

    async def start(self, *, migrate: bool = True) -> None:
        await create_schema(self.engine, migrate=migrate)

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A write transaction: on SQLite one at a time in this process, its statements on the event loop
        (``write_transaction`` in libs/contracts/database.py)."""
        async with write_transaction(self.sessions, self._lock) as session:
            yield session

    async def ping(self) -> bool:
        async with self.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")
        return True


class ConcurrentUpdate(RuntimeError):
    """Another writer advanced the projection first; the caller retries from a fresh read."""


async def find_processed(session: AsyncSession, event_id: str) -> ProcessedEventRow | None:
    return await session.get(ProcessedEventRow, event_id)


async def load_projection(session: AsyncSession, request_id: str, *, for_update: bool) -> ProjectionRow | None:
    # populate_existing: a batch applies several events of a request on one session, and the UPDATE in
    # save_projection bypasses the identity map: always read the row as the database has it now.
    stmt = select(ProjectionRow).where(ProjectionRow.request_id == request_id).execution_options(populate_existing=True)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def save_projection(session: AsyncSession, row: ProjectionRow | None, new: Projection, now: datetime) -> None:
    """Insert or update the projection, guarded by the sequence it was read at (optimistic concurrency)."""
    await save_projections(session, [(row, new, now)])


async def save_projections(
    session: AsyncSession, changes: Sequence[tuple[ProjectionRow | None, Projection, datetime]]
) -> None:
    """:func:`save_projection` for a batch's requests: the new ones inserted at the flush, the known ones
    updated in one guarded statement (``update_guarded``); raises :class:`ConcurrentUpdate` if any of them
    was advanced by another writer since it was read."""
    guarded: list[tuple[Any, Any, dict[str, Any]]] = []
    for row, new, now in changes:
        if row is None:
            session.add(
                ProjectionRow(
                    request_id=new.request_id,
                    requester_department=new.requester_department,
                    holder_department=new.holder_department,
                    past_holders=list(new.past_holders),
                    watchers=list(new.watchers),
                    title=new.title,
                    eta=new.eta,
                    delay_count=new.delay_count,
                    last_sequence=new.last_sequence,
                    updated_at=now,
                    reopen_count=new.reopen_count,
                    notices=list(new.notices),
                )
            )
            continue
        values = {
            "holder_department": new.holder_department,
            "past_holders": list(new.past_holders),
            "watchers": list(new.watchers),
            "eta": new.eta,
            "delay_count": new.delay_count,
            "last_sequence": new.last_sequence,
            "updated_at": now,
            "reopen_count": new.reopen_count,
            "notices": list(new.notices),
        }
        guarded.append((new.request_id, row.last_sequence, values))
    if await update_guarded(session, _PROJECTIONS, "request_id", "last_sequence", guarded) != len(guarded):
        raise ConcurrentUpdate(", ".join(str(request_id) for request_id, _seq, _values in guarded))


async def event_outbox(session: AsyncSession, event_id: str) -> list[OutboxRow]:
    stmt = select(OutboxRow).where(OutboxRow.event_id == event_id).order_by(OutboxRow.position)
    return list((await session.execute(stmt)).scalars())


async def mark_published(session: AsyncSession, notification_ids: Sequence[str], now: datetime) -> None:
    if notification_ids:
        await session.execute(
            update(OutboxRow)
            .where(OutboxRow.notification_id.in_(list(notification_ids)), OutboxRow.published_at.is_(None))
            .values(published_at=now)
            .execution_options(synchronize_session=False)
        )


async def request_notifications(session: AsyncSession, request_id: str) -> list[OutboxRow]:
    stmt = select(OutboxRow).where(OutboxRow.request_id == request_id).order_by(OutboxRow.sequence, OutboxRow.position)
    return list((await session.execute(stmt)).scalars())


# --- preferences -------------------------------------------------------------------------------------


async def preferences(session: AsyncSession, departments: Sequence[str]) -> dict[str, PreferenceRow]:
    if not departments:
        return {}
    stmt = select(PreferenceRow).where(PreferenceRow.department.in_(list(departments)))
    return {row.department: row for row in (await session.execute(stmt)).scalars()}


# --- webhooks ----------------------------------------------------------------------------------------


async def active_webhooks(session: AsyncSession, departments: Sequence[str]) -> list[WebhookRow]:
    if not departments:
        return []
    stmt = (
        select(WebhookRow)
        .where(WebhookRow.department.in_(list(departments)), WebhookRow.active.is_(True))
        .order_by(WebhookRow.created_at, WebhookRow.id)
    )
    return list((await session.execute(stmt)).scalars())


async def department_webhooks(session: AsyncSession, department: str) -> list[WebhookRow]:
    stmt = select(WebhookRow).where(WebhookRow.department == department).order_by(WebhookRow.created_at)
    return list((await session.execute(stmt)).scalars())


async def due_subscriptions(session: AsyncSession, now: datetime) -> list[str]:
    """Subscriptions with at least one delivery due now (pending, past its time, not leased)."""
    stmt = (
        select(DeliveryRow.subscription_id)
        .where(
            DeliveryRow.status == DeliveryStatus.PENDING,
            DeliveryRow.next_attempt_at <= now,
            or_(DeliveryRow.lease_until.is_(None), DeliveryRow.lease_until < now),
        )
        .distinct()
    )
    return list((await session.execute(stmt)).scalars())


async def due_deliveries(session: AsyncSession, subscription_id: str, now: datetime, limit: int) -> list[DeliveryRow]:
    stmt = (
        select(DeliveryRow)
        .where(
            DeliveryRow.subscription_id == subscription_id,
            DeliveryRow.status == DeliveryStatus.PENDING,
            DeliveryRow.next_attempt_at <= now,
            or_(DeliveryRow.lease_until.is_(None), DeliveryRow.lease_until < now),
        )
        .order_by(DeliveryRow.next_attempt_at, DeliveryRow.created_at)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def lease_delivery(session: AsyncSession, row: DeliveryRow, now: datetime, until: datetime) -> bool:
    """Claim a delivery for one attempt (so that two notifier replicas never POST it at the same time)."""
    result = await session.execute(
        update(DeliveryRow)
        .where(
            DeliveryRow.id == row.id,
            DeliveryRow.status == DeliveryStatus.PENDING,
            DeliveryRow.attempts == row.attempts,
            or_(DeliveryRow.lease_until.is_(None), DeliveryRow.lease_until < now),
        )
        .values(lease_until=until)
        .execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1


async def record_attempt(session: AsyncSession, delivery_id: str, **values: Any) -> None:
    await session.execute(
        update(DeliveryRow)
        .where(DeliveryRow.id == delivery_id)
        .values(lease_until=None, **values)
        .execution_options(synchronize_session=False)
    )


async def failed_deliveries(session: AsyncSession, department: str | None, limit: int = 200) -> list[DeliveryRow]:
    stmt = select(DeliveryRow).where(DeliveryRow.status == DeliveryStatus.DEAD)
    if department is not None:
        stmt = stmt.where(DeliveryRow.department == department)
    stmt = stmt.order_by(DeliveryRow.dead_at.desc()).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def delivery_counts(session: AsyncSession, department: str | None = None) -> dict[str, int]:
    stmt = select(DeliveryRow.status, func.count()).group_by(DeliveryRow.status)
    if department is not None:
        stmt = stmt.where(DeliveryRow.department == department)
    return {status: int(count) for status, count in (await session.execute(stmt)).all()}


# --- digests -----------------------------------------------------------------------------------------


async def digest_pending(session: AsyncSession) -> list[OutboxRow]:
    """Notifications held for a digest that no digest took yet."""
    stmt = (
        select(OutboxRow)
        .where(OutboxRow.delivery.in_(["hourly", "daily"]), OutboxRow.digest_id.is_(None))
        .order_by(OutboxRow.department, OutboxRow.created_at, OutboxRow.sequence, OutboxRow.position)
    )
    return list((await session.execute(stmt)).scalars())


async def claim_for_digest(session: AsyncSession, notification_ids: Sequence[str], digest_id: str) -> int:
    result = await session.execute(
        update(OutboxRow)
        .where(OutboxRow.notification_id.in_(list(notification_ids)), OutboxRow.digest_id.is_(None))
        .values(digest_id=digest_id)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0))


async def unpublished_digests(session: AsyncSession) -> list[DigestRow]:
    stmt = select(DigestRow).where(DigestRow.published_at.is_(None)).order_by(DigestRow.created_at)
    return list((await session.execute(stmt)).scalars())


def queue_deliveries(
    session: AsyncSession,
    webhooks: Sequence[WebhookRow],
    *,
    department: str,
    notification_id: str,
    kind: str,
    request_id: str | None,
    body: str,
    traceparent: str | None,
    now: datetime,
    digest_types: frozenset[str] = frozenset(),
) -> int:
    """Queue one delivery per matching subscription of ``department`` (in the caller's transaction)."""
    queued = 0
    for hook in webhooks:
        if hook.department != department or not hook.active or not wants(hook.event_types, kind, digest_types):
            continue
        session.add(
            DeliveryRow(
                id=delivery_id(hook.id, notification_id),
                subscription_id=hook.id,
                department=department,
                notification_id=notification_id,
                type=kind,
                request_id=request_id,
                body=body,
                traceparent=traceparent,
                status=DeliveryStatus.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        queued += 1
    return queued


async def drop_pending_deliveries(session: AsyncSession, subscription_id: str) -> None:
    await session.execute(
        delete(DeliveryRow).where(
            DeliveryRow.subscription_id == subscription_id, DeliveryRow.status == DeliveryStatus.PENDING
        )
    )


async def unpublished_before(session: AsyncSession, request_id: str, sequence: int) -> list[OutboxRow]:
    """Immediate notifications of earlier events of the request that were not confirmed published."""
    stmt = (
        select(OutboxRow)
        .where(
            OutboxRow.request_id == request_id,
            OutboxRow.sequence < sequence,
            OutboxRow.published_at.is_(None),
            or_(OutboxRow.delivery.is_(None), OutboxRow.delivery == Delivery.IMMEDIATE.value),
        )
        .order_by(OutboxRow.sequence, OutboxRow.position)
    )
    return list((await session.execute(stmt)).scalars())


# --- a batch's reads, one query per table ----------------------------------------------------------


async def processed_among(session: AsyncSession, event_ids: Collection[str]) -> set[str]:
    """Which of these events were applied already."""
    if not event_ids:
        return set()
    stmt = select(ProcessedEventRow.event_id).where(ProcessedEventRow.event_id.in_(sorted(event_ids)))
    return set((await session.execute(stmt)).scalars())


async def load_projections(
    session: AsyncSession, request_ids: Collection[str], *, for_update: bool
) -> dict[str, ProjectionRow]:
    if not request_ids:
        return {}
    stmt = (
        select(ProjectionRow)
        .where(ProjectionRow.request_id.in_(sorted(request_ids)))
        .order_by(ProjectionRow.request_id)  # one lock order for every replica (PostgreSQL)
        .execution_options(populate_existing=True)
    )
    if for_update:
        stmt = stmt.with_for_update()
    return {row.request_id: row for row in (await session.execute(stmt)).scalars()}


async def unpublished_of(session: AsyncSession, request_ids: Collection[str]) -> dict[str, list[OutboxRow]]:
    """Immediate notifications of these requests not confirmed published, in sequence order per request."""
    if not request_ids:
        return {}
    stmt = (
        select(OutboxRow)
        .where(
            OutboxRow.request_id.in_(sorted(request_ids)),
            OutboxRow.published_at.is_(None),
            or_(OutboxRow.delivery.is_(None), OutboxRow.delivery == Delivery.IMMEDIATE.value),
        )
        .order_by(OutboxRow.sequence, OutboxRow.position)
    )
    out: dict[str, list[OutboxRow]] = {}
    for row in (await session.execute(stmt)).scalars():
        out.setdefault(row.request_id, []).append(row)
    return out


async def all_preferences(session: AsyncSession) -> dict[str, PreferenceRow]:
    """Every department's delivery choices (one row per department that made one)."""
    return {row.department: row for row in (await session.execute(select(PreferenceRow))).scalars()}


async def all_active_webhooks(session: AsyncSession) -> list[WebhookRow]:
    stmt = select(WebhookRow).where(WebhookRow.active.is_(True)).order_by(WebhookRow.created_at, WebhookRow.id)
    return list((await session.execute(stmt)).scalars())
