"""SQLite statements on the event loop (libs/contracts/database.py), on a real SQLite file.

Inside ``inline_statements()`` a statement runs on the loop's thread; outside it, and for every COMMIT, in
aiosqlite's worker thread. A write that finds the database locked by another connection does not stop the
loop: it waits for the lock in the worker thread and then succeeds.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.contracts import database
from libs.contracts.database import inline_statements, make_engine

pytestmark = pytest.mark.integration


def noting_threads(engine: AsyncEngine) -> list[tuple[str, int]]:
    """(statement keyword, thread id) for every statement SQLite runs on the engine's connections opened from
    now on."""
    seen: list[tuple[str, int]] = []

    @event.listens_for(engine.sync_engine, "connect")
    def _trace(dbapi_conn: Any, _record: Any) -> None:
        raw: sqlite3.Connection = dbapi_conn.driver_connection._conn
        raw.set_trace_callback(lambda sql: seen.append((sql.split()[0].upper(), threading.get_ident())))

    return seen


async def test_statements_run_on_the_loop_only_inside_inline_statements_and_commits_never(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 't.db'}")
    seen = noting_threads(engine)
    loop_thread = threading.get_ident()
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
        seen.clear()

        with inline_statements():
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO t (id, v) VALUES (1, 'a')"))
                rows = (await conn.execute(text("SELECT v FROM t"))).all()
        assert rows == [("a",)]
        inline = {sql: tid for sql, tid in seen}
        assert inline["INSERT"] == loop_thread
        assert inline["SELECT"] == loop_thread
        assert inline["COMMIT"] != loop_thread, "the commit (an fsync) must not run on the loop"
        seen.clear()

        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1
        selects = [tid for sql, tid in seen if sql == "SELECT"]
        assert selects
        assert loop_thread not in selects, "a read outside inline_statements() runs in the worker thread"
    finally:
        await engine.dispose()


async def test_a_write_that_finds_the_database_locked_waits_in_the_thread_not_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lock wait on the loop would stop it for the whole busy timeout (10 s here): far longer than any gap
    # between the ticker's 10 ms sleeps, however loaded the machine.
    monkeypatch.setattr(database, "BUSY_TIMEOUT_MS", 10_000)
    path = tmp_path / "t.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))

        # Another process's writer (here a plain connection) holds the write lock.
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO t (id) VALUES (1)")

        ticks = 0
        longest_gap = 0.0

        async def tick() -> None:
            nonlocal ticks, longest_gap
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                longest_gap = max(longest_gap, time.monotonic() - before)
                ticks += 1

        async def write() -> None:
            with inline_statements():
                async with engine.begin() as conn:
                    await conn.execute(text("INSERT INTO t (id) VALUES (2)"))

        ticker = asyncio.create_task(tick())
        writer = asyncio.create_task(write())
        # The loop keeps running while the write waits for the lock ...
        while ticks < 20:
            await asyncio.sleep(0.01)
        assert not writer.done(), "the write got through although the lock was held"
        assert longest_gap < 5, f"the loop stood still for {longest_gap:.1f} s: the write waited for the lock on it"
        # ... and the write goes through once the other writer commits.
        other.execute("COMMIT")
        await asyncio.wait_for(writer, 30)
        ticker.cancel()
        other.close()

        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT id FROM t ORDER BY id"))).scalars().all() == [1, 2]
    finally:
        await engine.dispose()


async def test_an_error_inside_an_inline_transaction_rolls_it_back(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 't.db'}")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))

        async def twice() -> None:
            with inline_statements():
                async with engine.begin() as conn:
                    await conn.execute(text("INSERT INTO t (id) VALUES (1)"))
                    await conn.execute(text("INSERT INTO t (id) VALUES (1)"))

        with pytest.raises(Exception, match="UNIQUE"):
            await twice()
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 0
    finally:
        await engine.dispose()


async def test_metrics_dashboard_reads_stay_off_the_loop_and_its_transactions_on_it(tmp_path: Path) -> None:
    from services.metrics import db

    database = db.Database(f"sqlite+aiosqlite:///{tmp_path / 'metrics.db'}")
    await database.start()
    seen = noting_threads(database.engine)
    await database.engine.dispose()  # the next connections are traced
    loop_thread = threading.get_ident()
    try:
        async with database.reading() as session:
            await db.open_by_holder(session)
        assert seen
        assert loop_thread not in [tid for sql, tid in seen if sql == "SELECT"]
        seen.clear()
        async with database.transaction() as session:
            await db.open_by_holder(session)
        assert {tid for sql, tid in seen if sql == "SELECT"} == {loop_thread}
    finally:
        await database.close()
