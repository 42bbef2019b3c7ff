"""How every service opens its database (``make_engine``), SQLite statements on the event loop, and a
batch's guarded updates in one statement (``update_guarded``) and its new rows in one statement per table
(``PendingInserts``).

aiosqlite runs each DB-API call in the connection's own thread: the call is queued, the thread wakes and
runs it, then wakes the event loop through its self-pipe. SQLAlchemy makes up to four such calls per
statement (cursor, execute, fetchall, close), and for a small indexed statement the hand-offs cost more than
SQLite itself: a statement took 300 to 400 µs of CPU through the thread and 105 to 125 µs on the loop
(scripts/bench_sqlite_loop.py; docs/performance.md, "Waves and SQLite on the event loop").

``LoopConnection`` therefore runs the calls on the event loop while ``inline_statements()`` is active, which
each service's ``Database.transaction()`` turns on: the transactions of the consumers, timers and API, made
of small statements on indexed keys. It keeps in the thread:

* every call outside ``inline_statements()``: reads that may scan many rows (metrics' dashboards, scorecards
  and exports use ``Database.reading()``, which does not turn it on);
* every COMMIT: with ``synchronous=FULL`` it waits for an fsync, which must not stop the loop;
* a statement that finds the database locked by another process (``SQLITE_BUSY``). On the loop the busy
  timeout is 0, so the statement fails at once without any effect; it is then run again in the thread
  with the full busy timeout. The loop never waits for a lock.

Statements of one connection never overlap (SQLAlchemy awaits each one), so the loop and the worker thread
never use the sqlite3 connection at the same time. PostgreSQL (asyncpg) has no thread and is unchanged.

``write_transaction`` is every service's ``Database.transaction()``. On SQLite it also takes the process's
``write_lock``, one write transaction at a time: each service writes from several tasks at once (its
consumer, workers, timers and API), and a statement that met another transaction's write lock would wait for
it in the thread while the writers on the loop kept taking the lock first, until its busy timeout ran out
("database is locked" after 30 s; tests/integration/test_sqlite_writers.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite
from sqlalchemy import Table, bindparam, event, insert, make_url, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

#: How long a statement in the worker thread waits for another process's lock before "database is locked".
BUSY_TIMEOUT_MS = 30_000

_INLINE: contextvars.ContextVar[bool] = contextvars.ContextVar("baton_sqlite_inline", default=False)

#: Calls that always go to the worker thread (they wait for the disk).
_IN_THREAD = frozenset({"commit"})


@contextmanager
def inline_statements() -> Iterator[None]:
    """Within this block (and the tasks it starts), SQLite statements run on the event loop (see module doc)."""
    token = _INLINE.set(True)
    try:
        yield
    finally:
        _INLINE.reset(token)


def write_lock(engine: AsyncEngine) -> asyncio.Lock | None:
    """The lock a process's write transactions take one at a time on SQLite (see module doc); None elsewhere."""
    return asyncio.Lock() if engine.dialect.name == "sqlite" else None


@asynccontextmanager
async def write_transaction(
    sessions: async_sessionmaker[AsyncSession], lock: asyncio.Lock | None
) -> AsyncIterator[AsyncSession]:
    """A write transaction (a service's ``Database.transaction()``): on SQLite one at a time in the process,
    holding ``lock`` (``write_lock``), its statements on the event loop (``inline_statements``)."""
    with inline_statements():
        async with lock or nullcontext(), sessions() as session, session.begin():
            yield session


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY


class LoopConnection(aiosqlite.Connection):
    """An aiosqlite connection that runs calls on the event loop inside ``inline_statements()``."""

    _busy_ms: int | None = None  # the connection's busy timeout as last set here (None: not yet)

    def _busy_timeout(self, ms: int) -> None:
        if self._busy_ms != ms:
            self._conn.execute(f"PRAGMA busy_timeout={int(ms)}")
            self._busy_ms = ms

    def _in_thread(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self._busy_timeout(BUSY_TIMEOUT_MS)
            return fn(*args, **kwargs)

        return call

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not _INLINE.get() or getattr(fn, "__name__", "") in _IN_THREAD or self._connection is None:
            return await super()._execute(self._in_thread(fn), *args, **kwargs)  # type: ignore[no-untyped-call]
        if not self._running:
            raise ValueError("Connection closed")
        self._busy_timeout(0)
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
        # Locked by another process: the statement did nothing; wait for the lock in the thread instead.
        return await super()._execute(self._in_thread(fn), *args, **kwargs)  # type: ignore[no-untyped-call]


def make_engine(url: str) -> AsyncEngine:
    """An engine for ``url``. For SQLite: the parent folder is created, WAL mode and ``synchronous=FULL`` are
    set on every connection, and file databases use ``LoopConnection``."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    in_memory = not parsed.database or parsed.database == ":memory:"
    if in_memory:
        engine = create_async_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    else:
        Path(parsed.database or "").parent.mkdir(parents=True, exist_ok=True)
        args, kwargs = parsed.get_dialect()().create_connect_args(parsed)
        connector = partial(sqlite3.connect, *args, **{**kwargs, "timeout": BUSY_TIMEOUT_MS / 1000})

        async def connect() -> aiosqlite.Connection:
            connection = LoopConnection(connector, 64)
            connection._thread.daemon = True  # as SQLAlchemy does for its own aiosqlite connections
            return await connection

        engine = create_async_engine(url, async_creator=connect)

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the message is acked, also across a power loss (NORMAL under WAL
        # survives a process crash only). Costs one fsync per commit, i.e. per fetched batch: see
        # docs/performance.md ("Durability").
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.close()

    return engine


async def update_guarded(
    session: AsyncSession, table: Table, key: str, guard: str, rows: Sequence[tuple[Any, Any, dict[str, Any]]]
) -> int:
    """Update rows guarded by optimistic concurrency; returns how many of them were updated.

    Each of ``rows`` is ``(key value, guard value, new values)``: the row whose ``key`` column holds the key
    value is updated only if its ``guard`` column still holds the guard value (the one it was read at). All
    rows must set the same columns. A caller that needs every row updated compares the result with
    ``len(rows)`` and rolls back on a difference.

    Where the driver reports the summed row count of an executemany (SQLite), the rows go in one executemany.
    Where it does not (asyncpg), one UPDATE each, so the count stays exact.
    """
    if not rows:
        return 0
    stmt = update(table).where(table.c[key] == bindparam("b_key"), table.c[guard] == bindparam("b_guard"))
    params = [{"b_key": key_value, "b_guard": guard_value, **values} for key_value, guard_value, values in rows]
    if len(params) > 1 and session.get_bind().dialect.supports_sane_multi_rowcount:
        result = await session.execute(stmt, params)
        return int(getattr(result, "rowcount", 0))
    updated = 0
    for one in params:
        result = await session.execute(stmt, one)
        updated += int(getattr(result, "rowcount", 0))
    return updated


class PendingInserts:
    """A transaction's new rows, kept as plain column values and inserted with one executemany per table
    (SQLAlchemy's insertmanyvalues: for a batch, one INSERT per table), instead of as ORM objects through the
    unit of work, which builds and tracks an object per row.

    ``write(session)`` sends them: the caller does so before its commit, and before any read in the same
    transaction that must see them (the session's autoflush does not know these rows). The rows of one table
    must all set the same columns; column defaults apply as on any insert. Order across tables is the order
    in which each table first received a row.
    """

    def __init__(self) -> None:
        self._rows: dict[Table, list[dict[str, Any]]] = {}

    def add(self, table: Table, values: dict[str, Any]) -> None:
        self._rows.setdefault(table, []).append(values)

    async def write(self, session: AsyncSession) -> None:
        pending, self._rows = self._rows, {}
        for table, rows in pending.items():
            await session.execute(insert(table), rows)
