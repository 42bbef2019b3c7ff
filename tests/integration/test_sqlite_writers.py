"""Concurrent writers inside one service process on its SQLite file (the embedded default).

Each service writes from several tasks at once: its event consumer, and the notifier's webhook and digest
workers, routing's timers and reconciler, intake's HTTP submissions and outbox relay, the APIs. On SQLite a
statement that meets another transaction's write lock on the event loop (busy timeout 0 there) waits for it
in aiosqlite's thread (libs/contracts/database.py), and the writers on the loop keep taking the lock first: it
starved until its busy timeout of 30 s and failed with "database is locked". Seen in the notifier as a webhook
attempt whose result was lost (the delivery retried only when its lease ran out, 30 s later) and as batches
falling back to one message at a time (tests/integration/test_notifier_webhooks.py, now and then). Each
service's ``Database.transaction()`` therefore takes one transaction at a time within the process on SQLite.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from libs.contracts import database as database_module
from services.intake import db as intake_db
from services.metrics import db as metrics_db
from services.notifier import db as notifier_db
from services.routing import db as routing_db

pytestmark = pytest.mark.integration

WRITERS = 20
ROUNDS = 15
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)

SERVICES: dict[str, tuple[Callable[[str], Any], type, Callable[[int, int], Any]]] = {
    "intake": (
        intake_db.Database,
        intake_db.RejectionRow,
        lambda n, r: intake_db.RejectionRow(
            source_key=f"writer-{n}-{r}", subject="baton.in.it.created", code="x", message="x", rejected_at=NOW
        ),
    ),
    "routing": (
        routing_db.Database,
        routing_db.ProcessedEventRow,
        lambda n, r: routing_db.ProcessedEventRow(
            event_id=f"evt-writer-{n:04d}-{r:02d}", request_id="REQ-00000001", event_type="created", processed_at=NOW
        ),
    ),
    "notifier": (
        notifier_db.Database,
        notifier_db.PreferenceRow,
        lambda n, r: notifier_db.PreferenceRow(department=f"dept-{n:02d}-{r:02d}", updated_at=NOW),
    ),
    "metrics": (
        metrics_db.Database,
        metrics_db.PartyRow,
        lambda n, r: metrics_db.PartyRow(request_id=f"REQ-{n:04d}{r:04d}", department="it", role="provider"),
    ),
}


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_writers_in_one_process_neither_fail_nor_starve(
    service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many tasks each writing in a loop, a read before each write, as the consumers and workers do. Without the
    process's lock most of them fail here (a busy timeout of 0.3 s instead of 30 s, so that it shows at once)."""
    monkeypatch.setattr(database_module, "BUSY_TIMEOUT_MS", 300)
    make_database, table, make_row = SERVICES[service]
    database = make_database(f"sqlite+aiosqlite:///{tmp_path / service}.db")
    await database.start()

    async def writer(n: int) -> None:
        for round_ in range(ROUNDS):
            async with database.transaction() as session:
                await session.execute(select(func.count()).select_from(table))
                session.add(make_row(n, round_))

    try:
        results = await asyncio.gather(*(writer(n) for n in range(WRITERS)), return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        async with database.transaction() as session:
            assert await session.scalar(select(func.count()).select_from(table)) == WRITERS * ROUNDS
    finally:
        await database.close()
