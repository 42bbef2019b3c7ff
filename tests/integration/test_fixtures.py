"""The shared fixtures themselves: the session NATS server and the per-test databases answer."""

from __future__ import annotations

import nats
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import MakeDatabaseUrl

pytestmark = pytest.mark.integration


async def test_session_nats_has_jetstream(nats_url: str) -> None:
    async with await nats.connect(nats_url) as nc:
        info = await nc.jsm().account_info()
    assert info.limits is not None


async def test_make_database_url_gives_a_fresh_database(
    make_database_url: MakeDatabaseUrl, database_backend: str
) -> None:
    url = make_database_url("fixture check")
    assert make_database_url("fixture check") == url  # same name, same database within a test
    assert make_database_url("other") != url
    assert url.startswith("postgresql+asyncpg://" if database_backend == "postgresql" else "sqlite+aiosqlite:///")
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE probe (id INTEGER PRIMARY KEY)"))
            await conn.execute(text("INSERT INTO probe (id) VALUES (1)"))
            assert (await conn.execute(text("SELECT count(*) FROM probe"))).scalar_one() == 1
    finally:
        await engine.dispose()
