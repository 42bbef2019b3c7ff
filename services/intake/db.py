"""Intake's own database: request state, the events it appended, and every refusal.

SQLAlchemy 2 (async). SQLite is the embedded default, PostgreSQL the production database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, overload

from sqlalchemy import JSON, DateTime, Integer, String, Text, UniqueConstraint, delete, select
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

from .domain import RequestState, State
from .migrations import migrations


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class RequestRow(Base):
    __tablename__ = "requests"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    requester_department: Mapped[str] = mapped_column(String(32), index=True)
    holder_department: Mapped[str | None] = mapped_column(String(32), index=True)
    last_sequence: Mapped[int] = mapped_column(Integer)
    eta: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delay_count: Mapped[int] = mapped_column(Integer, default=0)
    title: Mapped[str] = mapped_column(String(200))
    trace_id: Mapped[str | None] = mapped_column(String(32))
    #: W3C traceparent of the span that created the request: later events' spans are its children.
    trace_parent: Mapped[str | None] = mapped_column(String(55))
    declined_by: Mapped[list[str]] = mapped_column(JSON, default=list)
    reopen_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def to_state(self) -> RequestState:
        return RequestState(
            request_id=self.request_id,
            state=State(self.state),
            requester_department=self.requester_department,
            holder_department=self.holder_department,
            last_sequence=self.last_sequence,
            eta=aware(self.eta),
            delay_count=self.delay_count,
            title=self.title,
            trace_id=self.trace_id,
            declined_by=tuple(self.declined_by or ()),
            reopen_count=self.reopen_count or 0,
        )


_REQUESTS = Base.metadata.tables[RequestRow.__tablename__]


class EventRow(Base):
    """Every event intake appended, with the exact canonical bytes it published."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("request_id", "sequence", name="uq_events_request_sequence"),)

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    payload_hash: Mapped[str] = mapped_column(String(64))
    canonical: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


_EVENTS = Base.metadata.tables[EventRow.__tablename__]


@dataclass(frozen=True)
class NewEvent:
    """An event appended in this transaction and inserted with its other new rows (``add_event``): what a later
    message of the same batch needs to know about it (its duplicate is answered from it)."""

    event_id: str
    request_id: str
    sequence: int
    type: str
    payload_hash: str
    canonical: str
    recorded_at: datetime


def add_event(writes: PendingInserts, event: NewEvent) -> None:
    """Append ``event`` (an ``EventRow``) with the transaction's other new rows."""
    writes.add(
        _EVENTS,
        {
            "event_id": event.event_id,
            "request_id": event.request_id,
            "sequence": event.sequence,
            "type": event.type,
            "payload_hash": event.payload_hash,
            "canonical": event.canonical,
            "recorded_at": event.recorded_at,
        },
    )


class RejectionRow(Base):
    """Every refusal, whatever its source; ``source_key`` makes recording it idempotent."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source_key: Mapped[str] = mapped_column(String(128), unique=True)
    department: Mapped[str | None] = mapped_column(String(32), index=True)
    subject: Mapped[str] = mapped_column(String(256))
    event_id: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64))
    event_type: Mapped[str | None] = mapped_column(String(32))
    code: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    rejected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PendingPublish(Base):
    """The outbox of the HTTP path: canonical events committed but not yet confirmed by a PubAck.

    (Over NATS the inbound message is only acked after the PubAck, so redelivery repairs a lost one.)
    """

    __tablename__ = "pending_publish"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


@overload
def aware(value: datetime) -> datetime: ...
@overload
def aware(value: None) -> None: ...
def aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything Baton stores is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


async def create_schema(engine: AsyncEngine, *, migrate: bool = True) -> None:
    """Migrate the database to head (services/intake/migrations), or with ``migrate=False`` only check
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


async def find_event(session: AsyncSession, event_id: str) -> EventRow | None:
    return await session.get(EventRow, event_id)


async def find_events(session: AsyncSession, event_ids: Collection[str]) -> dict[str, EventRow]:
    """The stored events among these ids (one query for a whole batch)."""
    if not event_ids:
        return {}
    stmt = select(EventRow).where(EventRow.event_id.in_(sorted(event_ids)))
    return {row.event_id: row for row in (await session.execute(stmt)).scalars()}


async def load_requests(
    session: AsyncSession, request_ids: Collection[str], *, for_update: bool
) -> dict[str, RequestRow]:
    """The rows of these requests (one query for a whole batch; locked in one order on PostgreSQL)."""
    if not request_ids:
        return {}
    stmt = (
        select(RequestRow)
        .where(RequestRow.request_id.in_(sorted(request_ids)))
        .order_by(RequestRow.request_id)
        .execution_options(populate_existing=True)
    )
    if for_update:
        stmt = stmt.with_for_update()
    return {row.request_id: row for row in (await session.execute(stmt)).scalars()}


async def load_request(session: AsyncSession, request_id: str, *, for_update: bool) -> RequestRow | None:
    # populate_existing: a batch decides several events of a request on one session, and the UPDATE in
    # save_state bypasses the identity map: always read the row as the database has it now.
    stmt = select(RequestRow).where(RequestRow.request_id == request_id).execution_options(populate_existing=True)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


def _insert(new: RequestState, created_at: datetime, trace_parent: str | None) -> RequestRow:
    return RequestRow(
        request_id=new.request_id,
        state=new.state.value,
        requester_department=new.requester_department,
        holder_department=new.holder_department,
        last_sequence=new.last_sequence,
        eta=new.eta,
        delay_count=new.delay_count,
        title=new.title,
        trace_id=new.trace_id,
        trace_parent=trace_parent,
        declined_by=list(new.declined_by),
        reopen_count=new.reopen_count,
        created_at=created_at,
        updated_at=created_at,
    )


def _changes(new: RequestState, updated_at: datetime) -> dict[str, Any]:
    return {
        "state": new.state.value,
        "holder_department": new.holder_department,
        "last_sequence": new.last_sequence,
        "eta": new.eta,
        "delay_count": new.delay_count,
        "declined_by": list(new.declined_by),
        "reopen_count": new.reopen_count,
        "updated_at": updated_at,
    }


async def save_state(
    session: AsyncSession,
    row: RequestRow | None,
    new: RequestState,
    created_at: datetime,
    *,
    trace_parent: str | None = None,
) -> None:
    """Insert or update the request row, guarded by the sequence it was read at (optimistic concurrency).

    ``trace_parent`` (W3C traceparent of the span that created the request) is only written on insert."""
    await save_states(session, [(row, new, created_at, trace_parent)])


async def save_states(
    session: AsyncSession, changes: Sequence[tuple[RequestRow | None, RequestState, datetime, str | None]]
) -> None:
    """:func:`save_state` for a batch's requests: the new ones inserted at the flush, the known ones updated
    in one guarded statement (``update_guarded``); raises :class:`ConcurrentUpdate` if any of them was
    advanced by another writer since it was read."""
    guarded: list[tuple[Any, Any, dict[str, Any]]] = []
    for row, new, at, trace_parent in changes:
        if row is None:
            session.add(_insert(new, at, trace_parent))
        else:
            guarded.append((new.request_id, row.last_sequence, _changes(new, at)))
    if await update_guarded(session, _REQUESTS, "request_id", "last_sequence", guarded) != len(guarded):
        raise ConcurrentUpdate(", ".join(str(request_id) for request_id, _seq, _values in guarded))


async def trace_anchor(session: AsyncSession, request_id: str) -> tuple[str | None, str | None]:
    """``(trace_parent, trace_id)`` of a request; ``(None, None)`` when it is unknown."""
    stmt = select(RequestRow.trace_parent, RequestRow.trace_id).where(RequestRow.request_id == request_id)
    found = (await session.execute(stmt)).first()
    return (found[0], found[1]) if found is not None else (None, None)


async def clear_pending(session: AsyncSession, event_id: str) -> None:
    await session.execute(delete(PendingPublish).where(PendingPublish.event_id == event_id))


async def pending_events(session: AsyncSession, older_than: datetime, limit: int = 500) -> list[EventRow]:
    """Outbox entries older than ``older_than``, as their canonical events, in per-request order."""
    stmt = (
        select(EventRow)
        .join(PendingPublish, PendingPublish.event_id == EventRow.event_id)
        .where(PendingPublish.created_at < older_than)
        .order_by(EventRow.request_id, EventRow.sequence)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


class ConcurrentUpdate(RuntimeError):
    """Another writer advanced the request first; the caller retries from a fresh read."""


async def request_events(session: AsyncSession, request_id: str) -> list[EventRow]:
    stmt = select(EventRow).where(EventRow.request_id == request_id).order_by(EventRow.sequence)
    return list((await session.execute(stmt)).scalars())


async def recent_rejections(session: AsyncSession, department: str | None, limit: int = 50) -> list[RejectionRow]:
    stmt = select(RejectionRow).order_by(RejectionRow.id.desc()).limit(limit)
    if department is not None:
        stmt = stmt.where(RejectionRow.department == department)
    return list((await session.execute(stmt)).scalars())
