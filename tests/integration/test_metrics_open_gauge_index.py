"""The open-requests gauge's count (services/metrics/db.py: ``open_by_holder``) on a real database.

Metrics recounts it after every batch, so it must read the open requests only: on SQLite the query plan
uses the partial index ``ix_facts_open_holder`` (migration 0002), not every request ever made. The counts are
checked on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from services.metrics import db
from tests.conftest import MakeDatabaseUrl

pytestmark = pytest.mark.integration


def fact(request_id: str, holder: str | None, state: str | None) -> db.FactsRow:
    return db.FactsRow(request_id=request_id, holder=holder, state=state, derived_through=1, facts="{}")


async def test_open_requests_are_counted_per_holder_through_the_partial_index(
    make_database_url: MakeDatabaseUrl,
) -> None:
    database = db.Database(make_database_url("open_gauge"))
    await database.start()
    try:
        async with database.transaction() as session:
            session.add_all(
                [
                    fact("REQ-00000001", "it", "accepted"),
                    fact("REQ-00000002", "it", "delayed"),
                    fact("REQ-00000003", "it", "resolved"),
                    fact("REQ-00000004", "finance", "routed"),
                    fact("REQ-00000005", "finance", "closed"),
                    fact("REQ-00000006", "legal", "returned"),
                    fact("REQ-00000007", None, "created"),
                ]
            )
        async with database.reading() as session:
            assert await db.open_by_holder(session) == {"it": 2, "finance": 1}
        if database.engine.dialect.name == "sqlite":
            async with database.reading() as session:
                raw = (await (await session.connection()).get_raw_connection()).driver_connection
                assert raw is not None
                ran: list[str] = []
                raw._conn.set_trace_callback(ran.append)  # the SQL exactly as SQLite runs it
                await db.open_by_holder(session)
                raw._conn.set_trace_callback(None)
                plan = (await session.execute(text("EXPLAIN QUERY PLAN " + ran[-1]))).all()
            assert "ix_facts_open_holder" in " ".join(str(row) for row in plan), plan
    finally:
        await database.close()
