"""CPU per SQLAlchemy statement on SQLite: through aiosqlite's thread vs on the event loop (``LoopConnection``).

Run: ``.venv/bin/python scripts/bench_sqlite_loop.py``. Each run makes 200 transactions of 10 rows; per row an ORM
insert, a flush and a select by key (2 statements); one commit (an fsync, in the thread either way) per
transaction. Prints wall and CPU microseconds per statement; the numbers in docs/performance.md ("Waves and
SQLite on the event loop") come from it.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from sqlalchemy import Integer, String, insert, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs.contracts.database import inline_statements, make_engine


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))


async def run(mode: str, path: Path) -> None:
    url = f"sqlite+aiosqlite:///{path}"
    # "thread": aiosqlite as SQLAlchemy opens it; "loop": Baton's engine inside inline_statements().
    engine = create_async_engine(url) if mode == "thread" else make_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        await conn.exec_driver_sql("PRAGMA synchronous=FULL")
    statements = 0
    wall, cpu = time.perf_counter(), time.process_time()
    with inline_statements():
        for batch in range(200):
            async with engine.begin() as conn:
                for i in range(10):
                    key = batch * 10 + i
                    await conn.execute(insert(Row).values(id=key, name="x" * 20))
                    (await conn.execute(select(Row).where(Row.id == key))).one()
                    statements += 2
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{mode:6s} {wall / statements * 1e6:6.0f} µs wall, {cpu / statements * 1e6:6.0f} µs CPU per statement")
    await engine.dispose()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for n, mode in enumerate(("thread", "loop", "thread", "loop")):
            asyncio.run(run(mode, Path(tmp) / f"bench-{n}.db"))


if __name__ == "__main__":
    main()
