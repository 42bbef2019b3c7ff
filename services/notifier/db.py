"""Notifier's own database: the per-request projection, the events applied, and the outbox.

SQLAlchemy 2 (async). SQLite is the embedded default, PostgreSQL the production database.
Applying an event is one transaction: the projection moves, the event is recorded as
processed and every notification it causes is written to the outbox; publishing follows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, Text, UniqueConstraint, event, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .domain import Projection


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

    def to_projection(self) -> Projection:
        return Projection(
            request_id=self.request_id,
            requester_department=self.requester_department,
            holder_department=self.holder_department,
            past_holders=tuple(self.past_holders),
            watchers=tuple(self.watchers),
            title=self.title,
            eta=_aware(self.eta),
            delay_count=self.delay_count,
            last_sequence=self.last_sequence,
        )


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


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything Baton stores is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def make_engine(url: str) -> AsyncEngine:
    """An engine for ``url``; for SQLite the parent folder is created and WAL mode enabled."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


class Database:
    """The engine plus a session factory; one per service process."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.is_postgres = self.engine.dialect.name == "postgresql"

    async def start(self) -> None:
        await create_schema(self.engine)

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session, session.begin():
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
    stmt = select(ProjectionRow).where(ProjectionRow.request_id == request_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def save_projection(session: AsyncSession, row: ProjectionRow | None, new: Projection, now: datetime) -> None:
    """Insert or update the projection, guarded by the sequence it was read at (optimistic concurrency)."""
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
            )
        )
        return
    result = await session.execute(
        update(ProjectionRow)
        .where(ProjectionRow.request_id == new.request_id, ProjectionRow.last_sequence == row.last_sequence)
        .values(
            holder_department=new.holder_department,
            past_holders=list(new.past_holders),
            watchers=list(new.watchers),
            eta=new.eta,
            delay_count=new.delay_count,
            last_sequence=new.last_sequence,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 1) != 1:
        raise ConcurrentUpdate(new.request_id)


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
