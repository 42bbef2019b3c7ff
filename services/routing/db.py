"""Routing's own database: the requests it follows, their SLA clocks, the events it emitted, the
events it has processed and every routing decision it made.

SQLAlchemy 2 (async). SQLite (WAL) is the embedded default, PostgreSQL the production database.
Every event routing emits is stored (``routing_outbox``, exact JSON) in the transaction that
decides it, before it is published: a redelivery or a restart republishes the same bytes
instead of building a new event. A clock row also records the timers it wants armed
(``warn_at`` / ``deadline_at``) and whether they still have to be (re)scheduled on NATS
(``schedule_dirty``): that flag is the outbox of the durable timers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import BigInteger, Boolean, DateTime, Integer, String, Text, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.orm.attributes import flag_modified

from libs import migrations as schema
from libs.contracts import Envelope, Priority, Routed, dumps
from libs.contracts.database import PendingInserts, make_engine, write_lock, write_transaction
from libs.contracts.events import DelayReasonCode, SlaClock

from .migrations import migrations
from .tracking import Clock, Decline, Phase, TimerKind, TimerSpec, Track, Wait


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


class OutboxRow(Base):
    """An event routing emitted (exact JSON), stored before it is published; ``caused_by`` is the canonical
    event_id or timer (``timer:<clock_id>:<kind>``) that produced it.

    ``event_id`` is the insert sentinel: unique and set by routing, it lets SQLAlchemy match the ``id`` each
    new row got to its row, so that a batch's rows are inserted in one statement on SQLite too (without it,
    SQLite's RETURNING order is not promised and the ORM inserts one row per statement). A sentinel is only
    a hint to SQLAlchemy: the table is unchanged."""

    __tablename__ = "routing_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True, insert_sentinel=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    event_type: Mapped[str] = mapped_column(String(32))
    caused_by: Mapped[str] = mapped_column(String(200), index=True)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RequestRow(Base):
    """What routing follows about one request (see ``tracking.Track``); lists are JSON."""

    __tablename__ = "routing_requests"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    requester: Mapped[str] = mapped_column(String(32))
    category: Mapped[str] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(String(200))
    attributes: Mapped[str] = mapped_column(Text, default="{}")
    requested_provider: Mapped[str | None] = mapped_column(String(32))
    phase: Mapped[str] = mapped_column(String(16))
    holder: Mapped[str | None] = mapped_column(String(32))
    chain: Mapped[str] = mapped_column(Text, default="[]")
    declines: Mapped[str] = mapped_column(Text, default="[]")
    waits: Mapped[str] = mapped_column(Text, default="[]")
    accepted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_sequence: Mapped[int] = mapped_column(Integer, default=0)
    last_stream_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    #: W3C traceparent of routing's span of the request's ``created``: the parent of timer spans and
    #: schedules that no live span caused (re-armed by the reconciler), so they stay in the request's trace.
    trace_parent: Mapped[str | None] = mapped_column(String(55))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ClockRow(Base):
    """One SLA clock (see ``tracking.Clock``), with the timers it wants armed and whether they still must be."""

    __tablename__ = "sla_clocks"

    clock_id: Mapped[str] = mapped_column(String(160), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    department: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    episode: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)  # order within the request
    target_us: Mapped[int] = mapped_column(BigInteger)
    consumed_us: Mapped[int] = mapped_column(BigInteger, default=0)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    running_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    close_reason: Mapped[str | None] = mapped_column(String(32))
    breach_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    warned: Mapped[bool] = mapped_column(Boolean, default=False)
    escalated: Mapped[bool] = mapped_column(Boolean, default=False)
    warn_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    schedule_dirty: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    schedule_version: Mapped[int] = mapped_column(Integer, default=0)


def aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything Baton stores is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _must(value: datetime | None) -> datetime:
    out = aware(value)
    if out is None:  # pragma: no cover - columns declared NOT NULL
        raise ValueError("missing timestamp")
    return out


def _us(value: timedelta) -> int:
    return (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


class Database:
    """The engine plus a session factory; one per service process. On SQLite its write transactions take the
    process's ``write_lock``, one at a time (libs/contracts/database.py); PostgreSQL serialises per request with
    ``SELECT ... FOR UPDATE`` instead."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._lock = write_lock(self.engine)

    async def start(self, *, migrate: bool = True) -> None:
        """Migrate the database to head (services/routing/migrations), or with ``migrate=False`` only
        check that it is there. Safe when several replicas start at once (libs.migrations locks it)."""
        if migrate:
            await schema.upgrade(self.engine, migrations())
        else:
            await schema.require_head(self.engine, migrations())

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


# --- processed events and decisions --------------------------------------------------------------
async def is_processed(session: AsyncSession, event_id: str) -> bool:
    return await session.get(ProcessedEventRow, event_id) is not None


async def decision_for(session: AsyncSession, caused_by: str) -> DecisionRow | None:
    stmt = select(DecisionRow).where(DecisionRow.caused_by == caused_by)
    return (await session.execute(stmt)).scalar_one_or_none()


async def decisions_of(session: AsyncSession, request_id: str) -> Sequence[DecisionRow]:
    stmt = select(DecisionRow).where(DecisionRow.request_id == request_id).order_by(DecisionRow.decided_at)
    return (await session.execute(stmt)).scalars().all()


_PROCESSED = Base.metadata.tables[ProcessedEventRow.__tablename__]
_DECISIONS = Base.metadata.tables[DecisionRow.__tablename__]


def add_processed(writes: PendingInserts, *, event_id: str, request_id: str, event_type: str, at: datetime) -> None:
    """Record a canonical event routing acted on (a ``ProcessedEventRow``), with the transaction's new rows."""
    writes.add(
        _PROCESSED, {"event_id": event_id, "request_id": request_id, "event_type": event_type, "processed_at": at}
    )


def add_decision(writes: PendingInserts, routed: Routed) -> None:
    """Record a routing decision and its exact ``routed`` event (a ``DecisionRow``), with the transaction's new
    rows."""
    writes.add(
        _DECISIONS,
        {
            "event_id": routed.event_id,
            "caused_by": routed.caused_by,
            "request_id": routed.request_id,
            "provider_department": routed.provider_department,
            "rule": routed.rule,
            "reason": routed.reason,
            "accept_by": routed.accept_by,
            "resolve_by": routed.resolve_by,
            "routed": dumps(routed).decode(),
            "decided_at": routed.occurred_at,
        },
    )


# --- the outbox ---------------------------------------------------------------------------------
def add_outbox(session: AsyncSession, events: Sequence[Envelope], caused_by: str, at: datetime) -> list[OutboxRow]:
    rows = [
        OutboxRow(
            event_id=e.event_id,
            request_id=e.request_id,
            event_type=str(getattr(e, "type", "")),
            caused_by=caused_by,
            body=dumps(e).decode(),
            created_at=at,
        )
        for e in events
    ]
    session.add_all(rows)
    return rows


async def outbox_caused_by(session: AsyncSession, caused_by: str) -> Sequence[OutboxRow]:
    stmt = select(OutboxRow).where(OutboxRow.caused_by == caused_by).order_by(OutboxRow.id)
    return (await session.execute(stmt)).scalars().all()


async def outbox_event(session: AsyncSession, event_id: str) -> OutboxRow | None:
    stmt = select(OutboxRow).where(OutboxRow.event_id == event_id)
    return (await session.execute(stmt)).scalar_one_or_none()


async def outbox_of(session: AsyncSession, request_id: str) -> Sequence[OutboxRow]:
    stmt = select(OutboxRow).where(OutboxRow.request_id == request_id).order_by(OutboxRow.id)
    return (await session.execute(stmt)).scalars().all()


# --- tracks -------------------------------------------------------------------------------------
class Stored:
    """A track as loaded, with its rows, so that saving it updates them in place."""

    def __init__(self, request: RequestRow | None, clocks: list[ClockRow]) -> None:
        self.request = request
        self.clocks = {row.clock_id: row for row in clocks}


async def load_track(session: AsyncSession, request_id: str, *, lock: bool = False) -> tuple[Track | None, Stored]:
    stmt = select(RequestRow).where(RequestRow.request_id == request_id)
    if lock:
        stmt = stmt.with_for_update()
    row = (await session.execute(stmt)).scalar_one_or_none()
    if row is None:
        return None, Stored(None, [])
    clock_stmt = select(ClockRow).where(ClockRow.request_id == request_id).order_by(ClockRow.position)
    clock_rows = list((await session.execute(clock_stmt)).scalars().all())
    return _track(row, clock_rows), Stored(row, clock_rows)


async def processed_among(session: AsyncSession, event_ids: Collection[str]) -> set[str]:
    """Which of these events were processed already (one query for a whole batch)."""
    if not event_ids:
        return set()
    stmt = select(ProcessedEventRow.event_id).where(ProcessedEventRow.event_id.in_(sorted(event_ids)))
    return set((await session.execute(stmt)).scalars())


async def load_tracks(session: AsyncSession, request_ids: Collection[str], *, lock: bool) -> dict[str, Stored]:
    """The rows of these requests and of their clocks (two queries for a whole batch)."""
    if not request_ids:
        return {}
    ids = sorted(request_ids)
    stmt = select(RequestRow).where(RequestRow.request_id.in_(ids)).order_by(RequestRow.request_id)
    if lock:
        stmt = stmt.with_for_update()
    requests = {row.request_id: row for row in (await session.execute(stmt)).scalars()}
    clocks: dict[str, list[ClockRow]] = {rid: [] for rid in requests}
    clock_stmt = select(ClockRow).where(ClockRow.request_id.in_(ids)).order_by(ClockRow.request_id, ClockRow.position)
    for crow in (await session.execute(clock_stmt)).scalars():
        clocks.setdefault(crow.request_id, []).append(crow)
    return {rid: Stored(row, clocks[rid]) for rid, row in requests.items()}


def track_of(stored: Stored) -> Track | None:
    """The track held by ``stored`` (rows as loaded, or as ``save_track`` left them in this session)."""
    if stored.request is None:
        return None
    return _track(stored.request, sorted(stored.clocks.values(), key=lambda c: c.position))


def _track(row: RequestRow, clock_rows: list[ClockRow]) -> Track:
    return Track(
        request_id=row.request_id,
        requester=row.requester,
        category=row.category,
        priority=Priority(row.priority),
        title=row.title,
        attributes=dict(orjson.loads(row.attributes)),
        requested_provider=row.requested_provider,
        phase=Phase(row.phase),
        holder=row.holder,
        chain=list(orjson.loads(row.chain)),
        declines=[Decline(**d) for d in orjson.loads(row.declines)],
        accepted_at=aware(row.accepted_at),
        last_sequence=row.last_sequence,
        last_stream_seq=row.last_stream_seq,
        clocks=[_clock(c) for c in clock_rows],
        waits=[
            Wait(
                holder=w["holder"],
                charged_to=w["charged_to"],
                reason_code=DelayReasonCode(w["reason_code"]),
                started_at=_must(_dt(w["started_at"])),
                caused_by=w["caused_by"],
                ended_at=_dt(w.get("ended_at")),
            )
            for w in orjson.loads(row.waits)
        ],
    )


def _clock(row: ClockRow) -> Clock:
    return Clock(
        request_id=row.request_id,
        department=row.department,
        kind=SlaClock(row.kind),
        episode=row.episode,
        target=timedelta(microseconds=row.target_us),
        opened_at=_must(aware(row.opened_at)),
        consumed=timedelta(microseconds=row.consumed_us),
        running_since=aware(row.running_since),
        closed_at=aware(row.closed_at),
        close_reason=row.close_reason,
        breach_at=aware(row.breach_at),
        warned=row.warned,
        escalated=row.escalated,
    )


def save_track(
    session: AsyncSession,
    track: Track,
    stored: Stored,
    timers: Sequence[TimerSpec],
    at: datetime,
    *,
    rearm: frozenset[str] = frozenset(),
) -> list[str]:
    """Write ``track`` back; set each clock's wanted timers and mark it dirty when they changed (or it is in
    ``rearm``). Returns the ids of the clocks whose timers must be (re)scheduled."""
    request: dict[str, Any] = {
        "requester": track.requester,
        "category": track.category,
        "priority": track.priority.value,
        "title": track.title,
        "attributes": orjson.dumps(track.attributes).decode(),
        "requested_provider": track.requested_provider,
        "phase": track.phase.value,
        "holder": track.holder,
        "chain": orjson.dumps(track.chain).decode(),
        "declines": orjson.dumps([d.__dict__ for d in track.declines]).decode(),
        "waits": orjson.dumps(
            [
                {
                    "holder": w.holder,
                    "charged_to": w.charged_to,
                    "reason_code": w.reason_code.value,
                    "started_at": _iso(w.started_at),
                    "ended_at": _iso(w.ended_at),
                    "caused_by": w.caused_by,
                }
                for w in track.waits
            ]
        ).decode(),
        "accepted_at": track.accepted_at,
        "last_sequence": track.last_sequence,
        "last_stream_seq": track.last_stream_seq,
        "updated_at": at,
    }
    if stored.request is None:
        stored.request = RequestRow(request_id=track.request_id, **request)
        session.add(stored.request)
    else:
        _write_changed(stored.request, request)

    wanted: dict[str, dict[TimerKind, datetime]] = {}
    for spec in timers:
        wanted.setdefault(spec.clock_id, {})[spec.kind] = spec.due_at
    dirty: list[str] = []
    for position, clock in enumerate(track.clocks):
        due = wanted.get(clock.clock_id, {})
        warn_at, deadline_at = due.get(TimerKind.WARNING), due.get(TimerKind.BREACH)
        values = {
            "request_id": clock.request_id,
            "department": clock.department,
            "kind": clock.kind.value,
            "episode": clock.episode,
            "position": position,
            "target_us": _us(clock.target),
            "consumed_us": _us(clock.consumed),
            "opened_at": clock.opened_at,
            "running_since": clock.running_since,
            "closed_at": clock.closed_at,
            "close_reason": clock.close_reason,
            "breach_at": clock.breach_at,
            "warned": clock.warned,
            "escalated": clock.escalated,
            "warn_at": warn_at,
            "deadline_at": deadline_at,
        }
        crow = stored.clocks.get(clock.clock_id)
        if crow is None:
            crow = ClockRow(clock_id=clock.clock_id, schedule_version=0, schedule_dirty=False, **values)
            session.add(crow)
            stored.clocks[clock.clock_id] = crow
            changed = True
        else:
            changed = aware(crow.warn_at) != warn_at or aware(crow.deadline_at) != deadline_at
            _write_changed(crow, values)
        if (changed or clock.clock_id in rearm) and (warn_at is not None or deadline_at is not None):
            crow.schedule_dirty = True
            crow.schedule_version = (crow.schedule_version or 0) + 1
            dirty.append(clock.clock_id)
        elif warn_at is None and deadline_at is None:
            crow.schedule_dirty = False
    return dirty


def _write_changed(row: RequestRow | ClockRow, values: dict[str, Any]) -> None:
    """Write a stored row back only when it changed, and then every one of ``values``' columns.

    An unchanged row (most clocks of a request, for most of its events) costs no UPDATE. A changed one sets the
    same columns as every other changed row of its table, so the flush sends one executemany for all of a
    batch's changed rows of a table instead of one UPDATE per combination of changed columns. (SQLite returns
    naive datetimes: compared as UTC.) A clock's ``schedule_dirty`` and ``schedule_version`` are not among
    ``values``: only written where the caller changes them, as the timer relay clears the flag in its own
    transaction, guarded by the version.
    """
    if all(
        (aware(current) if isinstance(current := getattr(row, key), datetime) else current) == value
        for key, value in values.items()
    ):
        return
    for key, value in values.items():
        setattr(row, key, value)
        flag_modified(row, key)


# --- timers to (re)schedule -------------------------------------------------------------------------
def timer_specs(row: ClockRow) -> list[TimerSpec]:
    """The timers a clock row wants armed."""
    out = []
    for kind, due in ((TimerKind.WARNING, aware(row.warn_at)), (TimerKind.BREACH, aware(row.deadline_at))):
        if due is not None:
            out.append(
                TimerSpec(row.clock_id, row.request_id, row.department, SlaClock(row.kind), row.episode, kind, due)
            )
    return out


async def trace_parents(session: AsyncSession, request_ids: Sequence[str]) -> dict[str, str]:
    """The stored ``trace_parent`` of each request that has one."""
    if not request_ids:
        return {}
    stmt = select(RequestRow.request_id, RequestRow.trace_parent).where(
        RequestRow.request_id.in_(sorted(set(request_ids))), RequestRow.trace_parent.is_not(None)
    )
    return {rid: tp for rid, tp in (await session.execute(stmt)).all() if tp}


async def dirty_clocks(session: AsyncSession, request_id: str | None = None, limit: int = 500) -> Sequence[ClockRow]:
    stmt = select(ClockRow).where(ClockRow.schedule_dirty.is_(True))
    if request_id is not None:
        stmt = stmt.where(ClockRow.request_id == request_id)
    return (await session.execute(stmt.order_by(ClockRow.clock_id).limit(limit))).scalars().all()


async def dirty_clocks_of(session: AsyncSession, request_ids: Sequence[str]) -> Sequence[ClockRow]:
    """The dirty clocks of these requests (one query for a whole batch)."""
    if not request_ids:
        return []
    stmt = select(ClockRow).where(ClockRow.schedule_dirty.is_(True), ClockRow.request_id.in_(list(request_ids)))
    return (await session.execute(stmt.order_by(ClockRow.clock_id))).scalars().all()


async def overdue_clocks(session: AsyncSession, before: datetime, limit: int = 500) -> Sequence[ClockRow]:
    """Open clocks whose armed warning or breach time is older than ``before`` and has not been acted on."""
    stmt = (
        select(ClockRow)
        .where(ClockRow.closed_at.is_(None), ClockRow.schedule_dirty.is_(False))
        .where(
            ((ClockRow.deadline_at.is_not(None)) & (ClockRow.deadline_at < before) & ClockRow.escalated.is_(False))
            | ((ClockRow.warn_at.is_not(None)) & (ClockRow.warn_at < before) & ClockRow.warned.is_(False))
        )
        .order_by(ClockRow.clock_id)
        .limit(limit)
    )
    return (await session.execute(stmt)).scalars().all()


async def mark_scheduled(session: AsyncSession, done: Sequence[tuple[str, int]]) -> None:
    """Clear the dirty flag of each ``(clock_id, version)`` unless the clock changed again since that version
    was read: one executemany for all of them, without synchronizing the session's loaded rows (the callers'
    transactions end here)."""
    if done:
        table = Base.metadata.tables[ClockRow.__tablename__]
        await session.execute(
            update(table)
            .where(table.c.clock_id == bindparam("b_clock_id"), table.c.schedule_version == bindparam("b_version"))
            .values(schedule_dirty=False),
            [{"b_clock_id": clock_id, "b_version": version} for clock_id, version in done],
        )


async def mark_dirty(session: AsyncSession, clock_ids: Sequence[str]) -> None:
    if clock_ids:
        await session.execute(
            update(ClockRow)
            .where(ClockRow.clock_id.in_(list(clock_ids)))
            .values(schedule_dirty=True, schedule_version=ClockRow.schedule_version + 1)
            .execution_options(synchronize_session=False)
        )


async def clocks_of(session: AsyncSession, request_id: str) -> Sequence[ClockRow]:
    stmt = select(ClockRow).where(ClockRow.request_id == request_id).order_by(ClockRow.position)
    return (await session.execute(stmt)).scalars().all()
