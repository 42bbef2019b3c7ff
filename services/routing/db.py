"""Routing's own database: the events it has processed and every routing decision it made.

SQLAlchemy 2 (async). SQLite (WAL) is the embedded default, PostgreSQL the production database.
A decision row keeps the exact ``routed`` JSON that was published, so a redelivery republishes
the same bytes instead of building a new event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, String, Text, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ProcessedEventRow(Base):
    """A canonical event routing has acted on; its presence makes the consumer idempotent."""

    __tablename__ = "processed_events"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(32))
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DecisionRow(Base):
    """One routing decision and the exact ``routed`` event (JSON) published for it."""

    __tablename__ = "routing_decisions"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the routed event's id
    caused_by: Mapped[str] = mapped_column(String(64), unique=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    provider_department: Mapped[str] = mapped_column(String(32), index=True)
    rule: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(String(500))
    accept_by: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resolve_by: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    routed: Mapped[str] = mapped_column(Text)
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def aware(value: datetime | None) -> datetime | None:
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


class Database:
    """The engine plus a session factory; one per service process."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    async def start(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

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


async def is_processed(session: AsyncSession, event_id: str) -> bool:
    return await session.get(ProcessedEventRow, event_id) is not None


async def decision_for(session: AsyncSession, caused_by: str) -> DecisionRow | None:
    stmt = select(DecisionRow).where(DecisionRow.caused_by == caused_by)
    return (await session.execute(stmt)).scalar_one_or_none()


async def decisions_of(session: AsyncSession, request_id: str) -> Sequence[DecisionRow]:
    stmt = select(DecisionRow).where(DecisionRow.request_id == request_id).order_by(DecisionRow.decided_at)
    return (await session.execute(stmt)).scalars().all()
