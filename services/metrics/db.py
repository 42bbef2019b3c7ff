"""Metrics' own database: every canonical event it projected, and who is party to which request.

SQLAlchemy 2 (async). SQLite is the embedded default, PostgreSQL the production database.
The projection is insert-only: an event is stored once (unique ``event_id`` and unique
``(request_id, sequence)``); timelines are computed from the stored events at read time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, String, Text, UniqueConstraint, event, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs.contracts.notifications import Role

from .domain import Canonical


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class EventRow(Base):
    """One canonical event, with the exact JSON read from the log."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("request_id", "sequence", name="uq_metrics_events_request_sequence"),)

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor_department: Mapped[str] = mapped_column(String(32))
    actor_person: Mapped[str] = mapped_column(String(200))
    trace_id: Mapped[str | None] = mapped_column(String(32))
    canonical: Mapped[str] = mapped_column(Text)
    stream_sequence: Mapped[int | None] = mapped_column(BigInteger)
    projected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PartyRow(Base):
    """A department is party to a request (requester, provider or watcher): for per-department lists."""

    __tablename__ = "parties"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    department: Mapped[str] = mapped_column(String(32), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(16), primary_key=True)


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
        self.dialect = self.engine.dialect.name

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


class Stored(StrEnum):
    INSERTED = "inserted"
    DUPLICATE = "duplicate"  # the same event_id at the same (request_id, sequence): a redelivery
    CONFLICT = "conflict"  # the event_id or the (request_id, sequence) is taken by something else


def _insert(session: AsyncSession, table: Any) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for the session's dialect (SQLite or PostgreSQL)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite_insert(table).on_conflict_do_nothing()
    raise NotImplementedError(f"unsupported database dialect {dialect!r}")  # pragma: no cover


async def insert_event(session: AsyncSession, row: dict[str, Any]) -> Stored:
    """Store one event if absent; say whether it was new, a redelivery, or a conflict."""
    result = await session.execute(_insert(session, EventRow.__table__).values(**row))
    if getattr(result, "rowcount", 0) == 1:
        return Stored.INSERTED
    existing = await session.get(EventRow, row["event_id"])
    if existing is not None and (existing.request_id, existing.sequence) == (row["request_id"], row["sequence"]):
        return Stored.DUPLICATE
    return Stored.CONFLICT


async def add_parties(session: AsyncSession, request_id: str, parties: Iterable[tuple[str, Role]]) -> None:
    rows = [{"request_id": request_id, "department": dept, "role": role.value} for dept, role in sorted(parties)]
    if rows:
        await session.execute(_insert(session, PartyRow.__table__).values(rows))


async def request_events(session: AsyncSession, request_id: str) -> list[EventRow]:
    stmt = select(EventRow).where(EventRow.request_id == request_id).order_by(EventRow.sequence)
    return list((await session.execute(stmt)).scalars())


async def events_of(session: AsyncSession, request_ids: Sequence[str]) -> dict[str, list[EventRow]]:
    """The stored events of several requests, each list in sequence order."""
    out: dict[str, list[EventRow]] = {rid: [] for rid in request_ids}
    if not request_ids:
        return out
    stmt = select(EventRow).where(EventRow.request_id.in_(request_ids)).order_by(EventRow.sequence)
    for row in (await session.execute(stmt)).scalars():
        out[row.request_id].append(row)
    return out


async def recent_requests(session: AsyncSession, department: str | None, limit: int) -> list[str]:
    """Request ids, most recently recorded first; only those ``department`` is party to, when given."""
    last = func.max(EventRow.recorded_at)
    stmt = select(EventRow.request_id).group_by(EventRow.request_id).order_by(last.desc(), EventRow.request_id)
    if department is not None:
        stmt = stmt.where(EventRow.request_id.in_(select(PartyRow.request_id).where(PartyRow.department == department)))
    return list((await session.execute(stmt.limit(limit))).scalars())


def event_values(checked: Canonical, canonical: str, stream_sequence: int | None, now: datetime) -> dict[str, Any]:
    """The values of one ``events`` row (times stored in UTC)."""
    event = checked.event
    return {
        "event_id": event.event_id,
        "request_id": event.request_id,
        "sequence": checked.sequence,
        "type": event.type,
        "occurred_at": event.occurred_at.astimezone(UTC),
        "recorded_at": checked.recorded_at.astimezone(UTC),
        "actor_department": event.actor.department,
        "actor_person": event.actor.person,
        "trace_id": event.trace_id,
        "canonical": canonical,
        "stream_sequence": stream_sequence,
        "projected_at": now,
    }
