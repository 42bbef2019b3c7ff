"""The services' Alembic migrations (libs/migrations.py, services/<name>/migrations) on a real database.

SQLite by default; PostgreSQL with $BATON_TEST_DATABASE_URL (as in CI). Per service: an empty database
upgrades to head; the models match head (the tripwire for a model changed without a migration); a
database made by the former ``create_all`` is stamped at the baseline and upgraded; downgrade to base
and back; concurrent upgrades. Intake: a database at 0001 holding a request upgrades with its data.
"""

from __future__ import annotations

import asyncio
import importlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, MetaData, String, insert, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from libs import migrations as schema
from tests.conftest import MakeDatabaseUrl

pytestmark = pytest.mark.integration

SERVICES = ["intake", "routing", "notifier", "metrics"]
HEADS = {"intake": "0002", "routing": "0002", "notifier": "0002", "metrics": "0002"}


def service(name: str) -> tuple[Any, schema.Migrations]:
    db = importlib.import_module(f"services.{name}.db")
    migrations: schema.Migrations = importlib.import_module(f"services.{name}.migrations").migrations()
    return db, migrations


async def tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def columns(engine: AsyncEngine, table: str) -> set[str]:
    async with engine.connect() as conn:
        return {c["name"] for c in await conn.run_sync(lambda c: inspect(c).get_columns(table))}


async def create_all_like_before(engine: AsyncEngine, metadata: MetaData) -> None:
    """What every service did at start until migrations: ``create_all``, no version table."""
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


# --- (a) (b) an empty database upgrades to head, and head is what the models say ------------
@pytest.mark.parametrize("name", SERVICES)
async def test_an_empty_database_upgrades_to_head_and_matches_the_models(
    name: str, make_database_url: MakeDatabaseUrl
) -> None:
    db, migrations = service(name)
    database = db.Database(make_database_url(f"mig_empty_{name}"))
    try:
        outcome = await schema.upgrade(database.engine, migrations)
        assert outcome == schema.Outcome(before=None, after=HEADS[name], adopted=False)
        assert migrations.head() == HEADS[name]
        assert set(migrations.metadata.tables) | {migrations.version_table} == await tables(database.engine)
        # The tripwire: a model changed without a migration (or a migration that does not build the
        # models' schema) shows here. Fix: `make migration SERVICE=<name> MSG="..."`, then review it.
        assert await schema.differences(database.engine, migrations) == []
        again = await schema.upgrade(database.engine, migrations)
        assert again == schema.Outcome(before=HEADS[name], after=HEADS[name], adopted=False)
    finally:
        await database.close()


async def test_a_model_change_without_a_migration_is_caught(make_database_url: MakeDatabaseUrl) -> None:
    """The tripwire above can fail: the same check on models with one more column finds it."""
    db, migrations = service("intake")
    changed = MetaData()
    for table in migrations.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["requests"].append_column(Column("priority_hint", String(16), nullable=True))
    database = db.Database(make_database_url("mig_tripwire"))
    try:
        await schema.upgrade(database.engine, migrations)
        diffs = await schema.differences(
            database.engine,
            schema.Migrations(service="intake", directory=migrations.directory, metadata=changed),
        )
        assert [(d[0], d[2], d[3].name) for d in diffs] == [("add_column", "requests", "priority_hint")]
    finally:
        await database.close()


# --- (c) intake at the previous revision, with data -------------------------------------------
async def test_intake_at_0001_with_a_request_upgrades_to_head_and_keeps_it(make_database_url: MakeDatabaseUrl) -> None:
    db, migrations = service("intake")
    database = db.Database(make_database_url("mig_intake_0001"))
    created = datetime(2026, 11, 1, 9, 30, tzinfo=UTC)
    try:
        await schema.upgrade(database.engine, migrations, "0001")
        assert await schema.current(database.engine, migrations) == "0001"
        assert "trace_parent" not in await columns(database.engine, "requests")
        async with database.transaction() as session:
            await session.execute(
                insert(db.RequestRow.__table__).values(
                    request_id="req-0001",
                    state="routed",
                    requester_department="it",
                    holder_department="facilities",
                    last_sequence=3,
                    title="Broken chair",
                    trace_id="ab" * 16,
                    declined_by=["legal"],
                    created_at=created,
                    updated_at=created,
                )
            )
            await session.execute(
                insert(db.EventRow.__table__).values(
                    event_id="ev-1",
                    request_id="req-0001",
                    sequence=1,
                    type="submitted",
                    payload_hash="0" * 64,
                    canonical='{"event_id":"ev-1"}',
                    recorded_at=created,
                )
            )

        with pytest.raises(schema.SchemaNotReady, match=r"at 0001, this release needs 0002: run `baton migrate"):
            await database.start(migrate=False)

        outcome = await schema.upgrade(database.engine, migrations)
        assert outcome == schema.Outcome(before="0001", after="0002", adopted=False)
        assert await schema.differences(database.engine, migrations) == []
        await database.start(migrate=False)  # at head: starts

        async with database.transaction() as session:
            row = await db.load_request(session, "req-0001", for_update=False)
            assert row is not None
            assert row.trace_parent is None
            state = row.to_state()
            assert (state.title, state.holder_department, state.last_sequence) == ("Broken chair", "facilities", 3)
            assert state.declined_by == ("legal",)
            assert db.aware(row.created_at) == created
            event = await db.find_event(session, "ev-1")
            assert event is not None
            assert event.canonical == '{"event_id":"ev-1"}'
            row.trace_parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"  # the new column takes a traceparent
        async with database.transaction() as session:
            stored = (await session.execute(select(db.RequestRow.trace_parent))).scalar_one()
            assert stored == "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    finally:
        await database.close()


# --- (d) a database made by the former create_all ------------------------------------------------
@pytest.mark.parametrize("name", SERVICES)
async def test_a_database_created_before_migrations_is_stamped_and_upgraded(
    name: str, make_database_url: MakeDatabaseUrl
) -> None:
    db, migrations = service(name)
    database = db.Database(make_database_url(f"mig_legacy_{name}"))
    try:
        await create_all_like_before(database.engine, migrations.metadata)
        assert migrations.version_table not in await tables(database.engine)

        with pytest.raises(schema.SchemaNotReady, match="no revision"):
            await database.start(migrate=False)
        await database.start()  # what a service does at start by default

        assert await schema.current(database.engine, migrations) == HEADS[name]
        assert await schema.differences(database.engine, migrations) == []
    finally:
        await database.close()


async def test_an_intake_database_created_at_fa0a2ab_gets_trace_parent(make_database_url: MakeDatabaseUrl) -> None:
    """create_all of the models at git fa0a2ab (no requests.trace_parent), holding a request."""
    db, migrations = service("intake")
    database = db.Database(make_database_url("mig_legacy_fa0a2ab"))
    try:
        await create_all_like_before(database.engine, migrations.metadata)
        async with database.engine.begin() as conn:
            await conn.exec_driver_sql("ALTER TABLE requests DROP COLUMN trace_parent")
            await conn.execute(
                insert(db.RequestRow.__table__).values(
                    request_id="req-old", state="accepted", requester_department="it", last_sequence=2, title="Old"
                )
            )
        assert "trace_parent" not in await columns(database.engine, "requests")

        outcome = await schema.upgrade(database.engine, migrations)

        assert outcome == schema.Outcome(before="0001", after="0002", adopted=True)
        assert "trace_parent" in await columns(database.engine, "requests")
        assert await schema.differences(database.engine, migrations) == []
        async with database.transaction() as session:
            row = await db.load_request(session, "req-old", for_update=False)
            assert row is not None
            assert (row.title, row.state, row.trace_parent) == ("Old", "accepted", None)
    finally:
        await database.close()


# --- (e) down to base and up again ----------------------------------------------------------------
@pytest.mark.parametrize("name", SERVICES)
async def test_downgrade_to_base_and_upgrade_again(name: str, make_database_url: MakeDatabaseUrl) -> None:
    db, migrations = service(name)
    database = db.Database(make_database_url(f"mig_down_{name}"))
    try:
        await schema.upgrade(database.engine, migrations)
        # one step at a time where there are several
        for revision in [r.down_revision for r in migrations.script().walk_revisions() if r.down_revision]:
            assert await schema.downgrade(database.engine, migrations, str(revision)) == revision
        assert await schema.downgrade(database.engine, migrations, "base") is None
        assert await tables(database.engine) == {migrations.version_table}

        assert (await schema.upgrade(database.engine, migrations)).after == HEADS[name]
        assert await schema.differences(database.engine, migrations) == []
    finally:
        await database.close()


# --- (f) replicas starting together ------------------------------------------------------------
@pytest.mark.parametrize("name", SERVICES)
async def test_concurrent_upgrades_of_one_database_all_succeed(name: str, make_database_url: MakeDatabaseUrl) -> None:
    db, migrations = service(name)
    url = make_database_url(f"mig_race_{name}")
    databases = [db.Database(url) for _ in range(4)]
    try:
        outcomes = await asyncio.gather(*(schema.upgrade(d.engine, migrations) for d in databases))
        # exactly one replica migrated; the others waited for it and found the database at head
        assert sorted(o.before or "" for o in outcomes) == ["", HEADS[name], HEADS[name], HEADS[name]]
        assert {o.after for o in outcomes} == {HEADS[name]}
        assert await schema.differences(databases[0].engine, migrations) == []
    finally:
        for d in databases:
            await d.close()


# --- the CLI -----------------------------------------------------------------------------------
async def test_baton_migrate_and_status(make_database_url: MakeDatabaseUrl) -> None:
    from baton.cli import app as cli

    url = make_database_url("mig_cli_intake")
    runner = CliRunner()

    async def baton(*args: str, code: int = 0) -> str:
        result = await asyncio.to_thread(runner.invoke, cli, ["migrate", *args])
        assert result.exit_code == code, result.output
        return result.output

    # a PostgreSQL database made by make_database_url exists but is empty; a SQLite file does not exist yet
    before = await baton("status", "--service", "intake", "--database-url", url, "--check", code=1)
    assert "intake" in before
    assert ("empty" in before) or ("no database yet" in before)

    assert "intake: empty -> 0001" in await baton("--service", "intake", "--database-url", url, "--revision", "0001")
    behind = await baton("status", "-s", "intake", "--database-url", url, "--check", code=1)
    assert "0001     0002  behind: run `baton migrate`" in behind

    assert "intake: 0001 -> 0002" in await baton("--service", "intake", "--database-url", url)
    current = await baton("status", "-s", "intake", "--database-url", url, "--check")
    assert "0002     0002  up to date" in current
    assert "intake: at 0002, nothing to do" in await baton("-s", "intake", "--database-url", url)

    sql = await baton("-s", "intake", "--database-url", url, "--sql", "--revision", "0001:0002")
    assert "ALTER TABLE requests ADD COLUMN trace_parent VARCHAR(55)" in sql

    refused = await asyncio.to_thread(runner.invoke, cli, ["migrate", "--database-url", url])
    assert refused.exit_code == 2
    assert "--service" in refused.output


# --- the services' start ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", SERVICES)
async def test_a_service_migrates_at_start_unless_told_not_to_and_then_needs_head(
    name: str, provisioned_nats: str, make_database_url: MakeDatabaseUrl, catalog_path: Path
) -> None:
    _, migrations = service(name)
    app_module = importlib.import_module(f"services.{name}.app")
    settings_module = importlib.import_module(f"services.{name}.settings")
    settings_class = getattr(settings_module, f"{name.capitalize()}Settings")
    url = make_database_url(f"mig_app_{name}")

    def app(**values: Any) -> Any:
        if name != "intake":
            values["catalog_path"] = str(catalog_path)
        return app_module.create_app(settings_class(nats_url=provisioned_nats, database_url=url, **values))

    production = app(migrate_on_start=False)  # as in compose and Kubernetes, before `baton migrate` ran
    with pytest.raises(schema.SchemaNotReady, match=rf"{name}: the database is at no revision"):
        async with production.router.lifespan_context(production):
            pass
    await production.state.database.close()

    embedded = app()  # the default: migrate at start
    async with embedded.router.lifespan_context(embedded):
        assert await schema.current(embedded.state.database.engine, migrations) == HEADS[name]

    production = app(migrate_on_start=False)
    async with production.router.lifespan_context(production):
        assert await production.state.database.ping()
