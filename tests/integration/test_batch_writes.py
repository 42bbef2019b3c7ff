"""A batch's row updates on a real database (SQLite, and PostgreSQL in CI).

* intake's request rows and the notifier's projections are written back guarded by the sequence each was read
  at (``libs.contracts.database.update_guarded``). On SQLite a batch's updates go in one executemany (its
  summed row count checks every guard); on PostgreSQL (asyncpg reports no such count) one UPDATE each. A row
  that another writer advanced meanwhile fails the whole batch, which then changes nothing.
* routing writes a stored SLA clock back only when it changed, and clears the dirty flags of the armed
  clocks in one statement, each guarded by the version it was read at; it inserts a batch's emitted events in
  one statement, their ids in emission order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from baton.demo import envelope
from libs.contracts.envelope import Actor
from libs.contracts.events import Priority, Routed, SlaClock
from libs.contracts.subjects import inbound_subject
from services.intake import db as intake_db
from services.intake.domain import RequestState, State
from services.intake.handlers import Inbound as IntakeInbound
from services.intake.handlers import IntakeProcessor
from services.intake.handlers import Outcome as IntakeOutcome
from services.notifier import db as notifier_db
from services.notifier.domain import Projection
from services.routing import db as routing_db
from services.routing.tracking import Clock, Phase, TimerKind, TimerSpec, Track
from tests.conftest import MakeDatabaseUrl

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
IDS = [f"REQ-0000000{n}" for n in (1, 2, 3)]


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[tuple[str, bool]]]:
    """Every statement the engine sends while the block runs, as ``(sql, executemany)``."""
    seen: list[tuple[str, bool]] = []

    def note(_conn: Any, _cursor: Any, sql: str, _params: Any, _context: Any, executemany: bool) -> None:
        seen.append((" ".join(sql.split()), executemany))

    event.listen(engine.sync_engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", note)


def updates_of(seen: list[tuple[str, bool]], table: str) -> list[bool]:
    """The UPDATEs of ``table`` among ``seen``: one entry per statement sent, True for an executemany."""
    return [many for sql, many in seen if sql.startswith(f"UPDATE {table} ")]


def one_statement_per_batch(engine: AsyncEngine) -> list[bool]:
    """What a batch of three updates sends: one executemany on SQLite, three UPDATEs on PostgreSQL."""
    return [True] if engine.dialect.name == "sqlite" else [False, False, False]


def request(request_id: str, sequence: int) -> RequestState:
    return RequestState(
        request_id=request_id,
        state=State.ROUTED if sequence > 1 else State.CREATED,
        requester_department="it",
        holder_department="finance" if sequence > 1 else None,
        last_sequence=sequence,
        eta=None,
        delay_count=0,
        title="Laptop",
        trace_id=None,
    )


async def test_intake_updates_a_batch_of_requests_guarded_in_one_statement(make_database_url: MakeDatabaseUrl) -> None:
    database = intake_db.Database(make_database_url("intake_batch"))
    await database.start()
    try:
        async with database.transaction() as session:
            await intake_db.save_states(session, [(None, request(rid, 1), T0, None) for rid in IDS])

        async with database.transaction() as session:
            rows = await intake_db.load_requests(session, IDS, for_update=database.is_postgres)
            changes = [(rows[rid], request(rid, 2), T0 + timedelta(minutes=1), None) for rid in IDS]
            with statements(database.engine) as seen:
                await intake_db.save_states(session, changes)
        assert updates_of(seen, "requests") == one_statement_per_batch(database.engine)

        async with database.transaction() as session:
            stored = await intake_db.load_requests(session, IDS, for_update=False)
        assert {rid: (row.state, row.holder_department, row.last_sequence) for rid, row in stored.items()} == {
            rid: ("routed", "finance", 2) for rid in IDS
        }
    finally:
        await database.close()


async def test_intake_batch_with_one_request_advanced_meanwhile_changes_nothing(
    make_database_url: MakeDatabaseUrl,
) -> None:
    database = intake_db.Database(make_database_url("intake_stale"))
    await database.start()
    try:
        async with database.transaction() as session:
            await intake_db.save_states(session, [(None, request(rid, 1), T0, None) for rid in IDS])
        async with database.transaction() as session:  # the batch's read: every row at sequence 1
            stale = await intake_db.load_requests(session, IDS, for_update=False)
            session.expunge_all()
        async with database.transaction() as session:  # another writer advances the second request
            await intake_db.save_states(session, [(stale[IDS[1]], request(IDS[1], 2), T0, None)])

        async def save_the_batch() -> None:
            async with database.transaction() as session:
                changes = [(stale[rid], replace(request(rid, 2), delay_count=9), T0, None) for rid in IDS]
                await intake_db.save_states(session, changes)

        with pytest.raises(intake_db.ConcurrentUpdate):
            await save_the_batch()

        async with database.transaction() as session:
            stored = await intake_db.load_requests(session, IDS, for_update=False)
        assert {rid: (row.last_sequence, row.delay_count) for rid, row in stored.items()} == {
            IDS[0]: (1, 0),
            IDS[1]: (2, 0),
            IDS[2]: (1, 0),
        }
    finally:
        await database.close()


def projection(request_id: str, sequence: int) -> Projection:
    return Projection(
        request_id=request_id,
        requester_department="it",
        holder_department="finance" if sequence > 1 else None,
        past_holders=("finance",) if sequence > 1 else (),
        watchers=("it",),
        title="Laptop",
        eta=None,
        delay_count=0,
        last_sequence=sequence,
        notices=(f"n{sequence}",),
    )


async def test_notifier_updates_a_batch_of_projections_guarded(make_database_url: MakeDatabaseUrl) -> None:
    database = notifier_db.Database(make_database_url("notifier_batch"))
    await database.start()
    try:
        async with database.transaction() as session:
            await notifier_db.save_projections(session, [(None, projection(rid, 1), T0) for rid in IDS])
        async with database.transaction() as session:
            stale = await notifier_db.load_projections(session, IDS, for_update=False)
            session.expunge_all()

        async with database.transaction() as session:
            with statements(database.engine) as seen:
                await notifier_db.save_projections(session, [(stale[rid], projection(rid, 2), T0) for rid in IDS])
        assert updates_of(seen, "projections") == one_statement_per_batch(database.engine)

        # The same stale rows again: every guard fails now, and nothing is written.
        async def save_again() -> None:
            async with database.transaction() as session:
                changes = [(stale[rid], replace(projection(rid, 3), watchers=("x",)), T0) for rid in IDS]
                await notifier_db.save_projections(session, changes)

        with pytest.raises(notifier_db.ConcurrentUpdate):
            await save_again()

        async with database.transaction() as session:
            stored = await notifier_db.load_projections(session, IDS, for_update=False)
        assert {rid: row.to_projection() for rid, row in stored.items()} == {rid: projection(rid, 2) for rid in IDS}
    finally:
        await database.close()


def track(clocks: list[Clock]) -> Track:
    return Track(
        request_id=IDS[0],
        requester="it",
        category="hardware",
        priority=Priority.NORMAL,
        title="Laptop",
        attributes={},
        requested_provider=None,
        phase=Phase.ROUTED,
        holder="finance",
        chain=["finance"],
        clocks=clocks,
    )


def timers(clocks: list[Clock]) -> list[TimerSpec]:
    return [
        TimerSpec(c.clock_id, c.request_id, c.department, c.kind, c.episode, TimerKind.BREACH, T0 + timedelta(hours=4))
        for c in clocks
        if c.is_open
    ]


async def test_routing_writes_only_changed_clocks_and_clears_dirty_flags_by_version(
    make_database_url: MakeDatabaseUrl,
) -> None:
    database = routing_db.Database(make_database_url("routing_clocks"))
    await database.start()
    clocks = [
        Clock(IDS[0], "finance", kind, 1, timedelta(hours=4), opened_at=T0, running_since=T0)
        for kind in (SlaClock.ACCEPT, SlaClock.RESOLVE)
    ]
    accept, resolve = (c.clock_id for c in clocks)
    try:
        async with database.transaction() as session:
            _, stored = await routing_db.load_track(session, IDS[0])
            assert routing_db.save_track(session, track(clocks), stored, timers(clocks), T0) == [accept, resolve]

        # Saved again unchanged (a later event of the request): no clock is written.
        async with database.transaction() as session:
            found, stored = await routing_db.load_track(session, IDS[0])
            assert found is not None
            assert found.clocks == clocks
            with statements(database.engine) as seen:
                assert routing_db.save_track(session, found, stored, timers(clocks), T0 + timedelta(minutes=1)) == []
                await session.flush()
        assert updates_of(seen, "sla_clocks") == []

        # Both clocks change the same way (paused, their timers kept): written in one executemany. (A batch's
        # changed clocks go in one statement per set of changed columns, on PostgreSQL too: the flush does not
        # check a clock's row count. The dirty flag adds a column.)
        changed = [replace(c, consumed=timedelta(minutes=5), running_since=None) for c in clocks]
        async with database.transaction() as session:
            found, stored = await routing_db.load_track(session, IDS[0])
            assert found is not None
            with statements(database.engine) as seen:
                routing_db.save_track(session, track(changed), stored, timers(changed), T0 + timedelta(minutes=5))
                await session.flush()
        assert updates_of(seen, "sla_clocks") == [True]

        # The relay armed both at version 1, but the accept clock changed again (version 2) meanwhile: only
        # the resolve clock is marked clean.
        async with database.transaction() as session:
            await routing_db.mark_dirty(session, [accept])
        async with database.transaction() as session:
            with statements(database.engine) as seen:
                await routing_db.mark_scheduled(session, [(accept, 1), (resolve, 1)])
        assert len(updates_of(seen, "sla_clocks")) == 1

        async with database.transaction() as session:
            found, _stored = await routing_db.load_track(session, IDS[0])
            rows = (await session.execute(select(routing_db.ClockRow).order_by(routing_db.ClockRow.clock_id))).scalars()
            flags = {row.clock_id: (row.schedule_dirty, row.schedule_version) for row in rows}
        assert found is not None
        assert found.clocks == changed
        assert flags == {accept: (True, 2), resolve: (False, 1)}
    finally:
        await database.close()


def routed(request_id: str, number: int) -> Routed:
    return Routed(
        event_id=f"evt-routed-{request_id}-{number}",
        request_id=request_id,
        occurred_at=T0,
        actor=Actor(department="baton", person="routing"),
        provider_department="finance",
        rule="category:laptop",
        caused_by=f"evt-created-{request_id}",
    )


async def test_routing_inserts_a_batch_of_emitted_events_in_one_statement_in_emission_order(
    make_database_url: MakeDatabaseUrl,
) -> None:
    """The outbox's ``id`` orders a request's emitted events (``outbox_of``, ``outbox_caused_by``): a batch's rows
    go in one INSERT (``event_id`` is the insert sentinel), and each gets the id the database gave it, in the
    order they were emitted."""
    database = routing_db.Database(make_database_url("routing_outbox"))
    await database.start()
    emitted = [routed(IDS[n % 3], n) for n in range(7)]  # three requests, interleaved
    try:
        async with database.transaction() as session:
            with statements(database.engine) as seen:
                rows = [
                    row
                    for n, event in enumerate(emitted)
                    for row in routing_db.add_outbox(session, [event], f"cause-{n % 2}", T0)
                ]
                await session.flush()
            ids = {row.event_id: row.id for row in rows}
        assert [sql.split(" (")[0] for sql, _ in seen] == ["INSERT INTO routing_outbox"]

        async with database.transaction() as session:
            stored = (await session.execute(select(routing_db.OutboxRow))).scalars().all()
            by_cause = [row.event_id for row in await routing_db.outbox_caused_by(session, "cause-1")]
            of_request = [row.event_id for row in await routing_db.outbox_of(session, IDS[1])]
        assert {row.event_id: row.id for row in stored} == ids
        assert [row.event_id for row in sorted(stored, key=lambda row: row.id)] == [e.event_id for e in emitted]
        assert by_cause == [e.event_id for n, e in enumerate(emitted) if n % 2 == 1]
        assert of_request == [e.event_id for e in emitted if e.request_id == IDS[1]]
    finally:
        await database.close()


async def test_intake_answers_a_duplicate_later_in_the_batch_from_the_event_it_appended(
    make_database_url: MakeDatabaseUrl,
) -> None:
    """A batch's appended events are inserted at its end (``PendingInserts``): a second copy of an event later
    in the same batch is a duplicate with the first copy's canonical bytes, and another payload under the same
    event_id is refused, without either reaching the database twice."""
    database = intake_db.Database(make_database_url("intake_duplicates"))
    await database.start()
    sent: list[tuple[str, bytes, str]] = []

    async def publish(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        sent.append((subject, body, msg_id))

    processor = IntakeProcessor(database, publish)
    created = envelope("created", "REQ-DUPLICATE1", "finance", person="Ana") | {
        "title": "Laptop",
        "category": "hardware",
        "priority": "normal",
        "requester": {"department": "finance", "person": "Ana"},
    }
    conflicting = created | {"title": "Another laptop"}
    batch = [
        IntakeInbound(inbound_subject("finance", "created"), orjson.dumps(doc), {}, seq, 1)
        for seq, doc in enumerate([created, created, conflicting], start=1)
    ]
    try:
        outcomes = await processor.process_batch(batch, lambda _msg, _anchor: nullcontext())
        assert outcomes == [IntakeOutcome.APPLIED, IntakeOutcome.DUPLICATE, IntakeOutcome.REJECTED]
        canonical = [body for subject, body, _ in sent if subject.startswith("baton.events.")]
        assert len(canonical) == 1  # the duplicate's copy is the same message (same Nats-Msg-Id), sent once
        async with database.transaction() as session:
            stored = (await session.execute(select(intake_db.EventRow))).scalars().all()
        assert [(row.event_id, row.canonical.encode()) for row in stored] == [(created["event_id"], canonical[0])]
    finally:
        await database.close()
