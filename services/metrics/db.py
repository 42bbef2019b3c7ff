"""Metrics' own database: every canonical event it projected, who is party to which request, and the
per-request facts the KPIs are computed from.

SQLAlchemy 2 (async). SQLite is the embedded default, PostgreSQL the production database.
The event store is insert-only: an event is stored once (unique ``event_id`` and unique
``(request_id, sequence)``); timelines are computed from the stored events at read time. The
``facts`` row of a request is recomputed from all of its stored events whenever one is added, in
the same transaction, so it never depends on the order in which the events arrived.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs import migrations as schema
from libs.contracts import parse_event
from libs.contracts.database import make_engine, write_lock, write_transaction
from libs.contracts.notifications import Role

from .domain import Canonical
from .facts import TERMINAL_STATES, RequestFacts, build_facts
from .migrations import migrations


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


class FactsRow(Base):
    """The facts of one request (``services.metrics.facts.RequestFacts`` as JSON), derived from its events."""

    __tablename__ = "facts"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    requester: Mapped[str | None] = mapped_column(String(32), index=True)
    holder: Mapped[str | None] = mapped_column(String(32), index=True)
    state: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_event_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    derived_through: Mapped[int] = mapped_column(Integer)
    facts: Mapped[str] = mapped_column(Text)


#: An open request with a holder: the rows of the open-requests gauge. The same terms are the WHERE of the
#: partial index ``ix_facts_open_holder`` and of ``open_by_holder``, with the states as literals: SQLite uses a
#: partial index only for a query whose WHERE holds the index's terms, and a bound parameter does not match.
_OPEN_WITH_HOLDER: ColumnElement[bool] = and_(
    FactsRow.holder.is_not(None),
    FactsRow.state.not_in(bindparam("terminal_states", sorted(TERMINAL_STATES), expanding=True, literal_execute=True)),
)

# The gauge recounts the open requests after every batch: through this index it reads the open ones only,
# not every request ever made (migration 0002).
Index("ix_facts_open_holder", FactsRow.holder, sqlite_where=_OPEN_WITH_HOLDER, postgresql_where=_OPEN_WITH_HOLDER)


async def create_schema(engine: AsyncEngine, *, migrate: bool = True) -> None:
    """Migrate the database to head (services/metrics/migrations), or with ``migrate=False`` only check
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
        self.dialect = self.engine.dialect.name
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

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """A session for reads that may scan many rows (dashboards, scorecards, exports, the open-requests
        gauge): on SQLite its statements stay in aiosqlite's thread, off the event loop."""
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


async def lock_request(session: AsyncSession, request_id: str) -> None:
    """PostgreSQL: hold a per-request advisory lock until the transaction ends (SQLite writes are serial anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(f"metrics:{request_id}", 0))))


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


async def insert_events(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> list[Stored]:
    """:func:`insert_event` for a whole batch, in two statements: one multi-row ``INSERT ... ON CONFLICT DO
    NOTHING RETURNING event_id``, then one read of the rows that were not new. One result per row, in order
    (the same event twice in a batch: the first is inserted, the second a duplicate)."""
    if not rows:
        return []
    table = EventRow.__table__
    # executemany with RETURNING: SQLAlchemy sends it as multi-row INSERTs (insertmanyvalues), compiled once.
    result = await session.execute(_insert(session, table).returning(table.c.event_id), list(rows))
    inserted = set(result.scalars())
    firsts: set[str] = set()
    others: set[str] = set()
    for row in rows:
        eid = row["event_id"]
        if eid in inserted and eid not in firsts:
            firsts.add(eid)
        else:
            others.add(eid)
    existing: dict[str, tuple[str, int]] = {}
    if others:
        stmt = select(EventRow.event_id, EventRow.request_id, EventRow.sequence).where(
            EventRow.event_id.in_(sorted(others))
        )
        existing = {eid: (rid, seq) for eid, rid, seq in (await session.execute(stmt)).all()}
    out: list[Stored] = []
    taken: set[str] = set()
    for row in rows:
        eid = row["event_id"]
        if eid in inserted and eid not in taken:
            taken.add(eid)
            out.append(Stored.INSERTED)
        elif existing.get(eid) == (row["request_id"], row["sequence"]):
            out.append(Stored.DUPLICATE)
        else:
            out.append(Stored.CONFLICT)
    return out


async def add_parties_many(session: AsyncSession, rows: Iterable[tuple[str, str, Role]]) -> None:
    """Every ``(request_id, department, role)`` of a batch in one statement (already known ones ignored)."""
    values = [{"request_id": rid, "department": dept, "role": role.value} for rid, dept, role in sorted(set(rows))]
    if values:
        await session.execute(_insert(session, PartyRow.__table__), values)


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


# --- the facts projection -------------------------------------------------------------------
def facts_values(facts: RequestFacts) -> dict[str, Any]:
    return {
        "request_id": facts.request_id,
        "requester": facts.requester,
        "holder": facts.holder,
        "state": facts.state,
        "created_at": facts.created_at,
        "last_event_at": facts.last_event_at,
        "derived_through": facts.derived_through,
        "facts": facts.model_dump_json(),
    }


async def refresh_facts(session: AsyncSession, request_id: str) -> tuple[RequestFacts | None, RequestFacts]:
    """Recompute a request's facts from all of its stored events; returns ``(before, after)``."""
    rows = await request_events(session, request_id)
    after = build_facts(parse_event(r.canonical) for r in rows)
    existing = await session.get(FactsRow, request_id)
    before = RequestFacts.model_validate_json(existing.facts) if existing is not None else None
    values = facts_values(after)
    if existing is None:
        session.add(FactsRow(**values))
    else:
        for key, value in values.items():
            setattr(existing, key, value)
    await session.flush()
    return before, after


async def refresh_facts_many(
    session: AsyncSession, request_ids: Sequence[str]
) -> list[tuple[RequestFacts | None, RequestFacts]]:
    """:func:`refresh_facts` for every request a batch touched: their events and facts read in two queries."""
    if not request_ids:
        return []
    events = await events_of(session, request_ids)
    stmt = select(FactsRow).where(FactsRow.request_id.in_(sorted(set(request_ids))))
    existing = {row.request_id: row for row in (await session.execute(stmt)).scalars()}
    out: list[tuple[RequestFacts | None, RequestFacts]] = []
    for request_id in request_ids:
        after = build_facts(parse_event(r.canonical) for r in events[request_id])
        row = existing.get(request_id)
        before = RequestFacts.model_validate_json(row.facts) if row is not None else None
        values = facts_values(after)
        if row is None:
            session.add(FactsRow(**values))
        else:
            for key, value in values.items():
                setattr(row, key, value)
        out.append((before, after))
    return out


async def load_facts(session: AsyncSession, since: datetime | None = None) -> list[RequestFacts]:
    """Facts of every request with an event at or after ``since``, plus every open request (all when None)."""
    stmt = select(FactsRow.facts).order_by(FactsRow.request_id)
    if since is not None:
        stmt = stmt.where(
            or_(FactsRow.last_event_at >= since, FactsRow.state.is_(None), FactsRow.state.not_in(TERMINAL_STATES))
        )
    return [RequestFacts.model_validate_json(text) for text in (await session.execute(stmt)).scalars()]


async def facts_of(session: AsyncSession, request_id: str) -> RequestFacts | None:
    row = await session.get(FactsRow, request_id)
    return None if row is None else RequestFacts.model_validate_json(row.facts)


async def is_party(session: AsyncSession, request_id: str, department: str) -> bool:
    stmt = select(PartyRow.request_id).where(PartyRow.request_id == request_id, PartyRow.department == department)
    return (await session.execute(stmt.limit(1))).first() is not None


async def party_requests(session: AsyncSession, department: str, request_ids: Iterable[str]) -> set[str]:
    """Which of ``request_ids`` the department is party to."""
    ids = list(request_ids)
    if not ids:
        return set()
    stmt = select(PartyRow.request_id).where(PartyRow.department == department, PartyRow.request_id.in_(ids))
    return set((await session.execute(stmt)).scalars())


_OPEN_BY_HOLDER = select(FactsRow.holder, func.count()).where(_OPEN_WITH_HOLDER).group_by(FactsRow.holder)


async def open_by_holder(session: AsyncSession) -> dict[str, int]:
    """Open requests per holding department (for the Prometheus gauge), read through ``ix_facts_open_holder``."""
    rows = (await session.execute(_OPEN_BY_HOLDER)).all()
    return {str(holder): int(count) for holder, count in rows}


# --- snapshots: comparing and replacing a whole projection (``baton metrics rebuild``) -------
#: Columns that say when or through which message something was projected, not what: left out of comparisons.
VOLATILE = {"projected_at", "stream_sequence"}
TABLES: tuple[type[Base], ...] = (EventRow, PartyRow, FactsRow)


def _key(table: type[Base], row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c.name] for c in table.__table__.primary_key.columns)  # type: ignore[attr-defined]


def _normal(value: Any) -> Any:
    """Datetimes in UTC, aware (SQLite hands back naive UTC, PostgreSQL aware values)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return value


async def snapshot(
    session: AsyncSession, *, volatile: bool = False
) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """Every row of the projection, by table and primary key (without the volatile columns unless asked)."""
    out: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for table in TABLES:
        columns = [c for c in table.__table__.columns if volatile or c.name not in VOLATILE]  # type: ignore[attr-defined]
        rows = (await session.execute(select(*columns))).mappings()
        out[table.__tablename__] = {_key(table, dict(r)): {k: _normal(v) for k, v in r.items()} for r in rows}
    return out


def differences(
    left: dict[str, dict[tuple[Any, ...], dict[str, Any]]], right: dict[str, dict[tuple[Any, ...], dict[str, Any]]]
) -> dict[str, dict[str, int]]:
    """Per table: rows only on the left, only on the right, and rows that differ."""
    out: dict[str, dict[str, int]] = {}
    for name in sorted(set(left) | set(right)):
        a, b = left.get(name, {}), right.get(name, {})
        out[name] = {
            "only_live": len(a.keys() - b.keys()),
            "only_rebuilt": len(b.keys() - a.keys()),
            "different": sum(1 for k in a.keys() & b.keys() if a[k] != b[k]),
        }
    return out


async def replace_all(session: AsyncSession, rows: dict[str, list[dict[str, Any]]]) -> None:
    """Replace the whole projection with ``rows`` (every column, by table name) in the caller's transaction."""
    for table in reversed(TABLES):
        await session.execute(delete(table))
    for table in TABLES:
        batch = rows.get(table.__tablename__, [])
        for start in range(0, len(batch), 500):
            await session.execute(table.__table__.insert(), batch[start : start + 500])  # type: ignore[attr-defined]


async def dump_all(session: AsyncSession) -> dict[str, list[dict[str, Any]]]:
    """Every row of every projection table, every column (for :func:`replace_all`)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for table in TABLES:
        result = await session.execute(select(*table.__table__.columns))  # type: ignore[attr-defined]
        out[table.__tablename__] = [{k: _normal(v) for k, v in r.items()} for r in result.mappings()]
    return out


async def fingerprint(session: AsyncSession) -> tuple[int, datetime | None]:
    """How many events are projected and when the last one was (changes whenever the projection does)."""
    count, last = (await session.execute(select(func.count(), func.max(EventRow.projected_at)))).one()
    return int(count), _normal(last)
