"""Alembic migrations of a service's own database: one runner for the four services.

Each service keeps its own Alembic environment in ``services/<name>/migrations`` (``env.py`` calls
:func:`run_env`; ``versions/`` holds its revisions) and its own version table
(``alembic_version_<name>``). This module runs them programmatically, from a service's start
(``BATON_<SERVICE>_MIGRATE_ON_START``) and from ``baton migrate``:

- Replicas starting together do not race: on PostgreSQL the upgrade holds a transaction-level
  advisory lock (one key per service) and runs in one transaction (PostgreSQL DDL is
  transactional); on SQLite it runs inside ``BEGIN IMMEDIATE``, which takes the write lock first
  (others wait up to the busy timeout). The loser of the race then finds the database at head.
- A database created before migrations existed (the services' former ``create_all``: tables, but
  no version table) is stamped at the service's baseline revision and then upgraded.

Shared by the services like ``libs.contracts``; it knows no service (each passes its
:class:`Migrations`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alembic import command, context
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = logging.getLogger("baton.migrations")

T = TypeVar("T")


@dataclass(frozen=True)
class Migrations:
    """One service's migrations: where its revisions are, the metadata they build, its version table."""

    service: str
    directory: Path
    metadata: MetaData
    #: The revision a database created by the former ``create_all`` is at (stamped, then upgraded).
    baseline: str = "0001"

    @property
    def version_table(self) -> str:
        return f"alembic_version_{self.service}"

    @property
    def lock_key(self) -> int:
        """PostgreSQL advisory lock key: "baton" in the high bytes, the service in the low 32 bits."""
        return (0x6261746F6E << 24) ^ zlib.crc32(self.service.encode())

    def config(self, *, url: str | None = None, connection: Connection | None = None) -> Config:
        cfg = Config(output_buffer=io.StringIO())
        cfg.set_main_option("script_location", str(self.directory))
        cfg.set_main_option("path_separator", "os")
        cfg.set_main_option("version_locations", str(self.directory / "versions"))
        if url is not None:
            cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        cfg.attributes["migrations"] = self
        if connection is not None:
            cfg.attributes["connection"] = connection
        return cfg

    def script(self) -> ScriptDirectory:
        return ScriptDirectory.from_config(self.config())

    def head(self) -> str:
        head = self.script().get_current_head()
        assert head is not None, f"{self.service} has no revisions"
        return head


class SchemaNotReady(RuntimeError):
    """The database is not at the revision this code needs, and migrating on start is off."""


# --- env.py -------------------------------------------------------------------------------
def _configure(migrations: Migrations, **kwargs: Any) -> None:
    context.configure(
        target_metadata=migrations.metadata,
        version_table=migrations.version_table,
        render_as_batch=True,  # SQLite: ALTERs become copy-and-move of the table
        compare_type=True,
        compare_server_default=True,
        include_name=_own_tables(migrations),
        **kwargs,
    )


def run_env(fallback: Migrations) -> None:
    """The body of every service's ``env.py``: offline (``--sql``), on a given connection, or from a URL."""
    cfg = context.config
    migrations: Migrations = cfg.attributes.get("migrations", fallback)
    if context.is_offline_mode():
        _configure(migrations, url=cfg.get_main_option("sqlalchemy.url"), literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection: Connection | None = cfg.attributes.get("connection")
    if connection is not None:
        _run_on(connection, migrations)
        return
    url = cfg.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url: use `baton migrate --database-url ...`")

    async def run_async() -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        try:
            async with engine.connect() as conn:
                await conn.run_sync(_run_on, migrations)
                await conn.commit()
        finally:
            await engine.dispose()

    asyncio.run(run_async())


def _run_on(connection: Connection, migrations: Migrations) -> None:
    _configure(migrations, connection=connection)
    with context.begin_transaction():
        context.run_migrations()


# --- running them -------------------------------------------------------------------------
@asynccontextmanager
async def locked(engine: AsyncEngine, migrations: Migrations) -> AsyncIterator[AsyncConnection]:
    """One connection in one transaction that no other migrator of this service runs beside."""
    if engine.dialect.name == "sqlite":
        async with engine.connect() as raw:
            # The driver's own transaction handling off, so that BEGIN IMMEDIATE is ours to issue:
            # it takes the write lock now (waiting for another migrator), not at the first write.
            conn = await raw.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                await conn.exec_driver_sql("ROLLBACK")
                raise
            await conn.exec_driver_sql("COMMIT")
        return
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({migrations.lock_key})")
        yield conn


def _current(connection: Connection, migrations: Migrations) -> str | None:
    ctx = MigrationContext.configure(connection, opts={"version_table": migrations.version_table})
    return ctx.get_current_revision()


def _is_legacy(connection: Connection, migrations: Migrations) -> bool:
    """Tables of this service but no version table: created by the former ``create_all``."""
    tables = set(inspect(connection).get_table_names())
    return migrations.version_table not in tables and bool(tables & set(migrations.metadata.tables))


@dataclass(frozen=True)
class Outcome:
    before: str | None
    after: str | None
    #: The database had the service's tables but no version table: stamped at the baseline first.
    adopted: bool


async def upgrade(engine: AsyncEngine, migrations: Migrations, revision: str = "head") -> Outcome:
    """Upgrade to ``revision``; a legacy database is stamped at the baseline first."""

    def run(connection: Connection) -> Outcome:
        adopted = _is_legacy(connection, migrations)
        if adopted:
            log.warning(
                "%s: database has tables but no %s: stamping it at %s (created before migrations)",
                migrations.service,
                migrations.version_table,
                migrations.baseline,
            )
            command.stamp(migrations.config(connection=connection), migrations.baseline)
        before = _current(connection, migrations)
        command.upgrade(migrations.config(connection=connection), revision)
        after = _current(connection, migrations)
        if before != after:
            log.info("%s: database migrated from %s to %s", migrations.service, before or "empty", after)
        return Outcome(before=before, after=after, adopted=adopted)

    async with locked(engine, migrations) as conn:
        return await conn.run_sync(run)


async def downgrade(engine: AsyncEngine, migrations: Migrations, revision: str) -> str | None:
    """Downgrade to ``revision`` (``base``: no tables of this service left)."""

    def run(connection: Connection) -> str | None:
        command.downgrade(migrations.config(connection=connection), revision)
        return _current(connection, migrations)

    async with locked(engine, migrations) as conn:
        return await conn.run_sync(run)


async def stamp(engine: AsyncEngine, migrations: Migrations, revision: str) -> None:
    async with locked(engine, migrations) as conn:
        await conn.run_sync(lambda c: command.stamp(migrations.config(connection=c), revision))


async def current(engine: AsyncEngine, migrations: Migrations) -> str | None:
    """The database's revision (None: no version table, or an empty one)."""
    async with engine.connect() as conn:
        return await conn.run_sync(_current, migrations)


def is_behind(migrations: Migrations, revision: str | None) -> bool:
    """True when ``revision`` is missing or an ancestor of head: this code needs migrations applied.

    A revision this code does not know (a newer release migrated the database) is not "behind":
    migrations are additive within a release, so older code keeps working on it.
    """
    if revision is None:
        return True
    script = migrations.script()
    if revision == migrations.head():
        return False
    known = {rev.revision for rev in script.walk_revisions()}
    return revision in known


async def require_head(engine: AsyncEngine, migrations: Migrations) -> str | None:
    """For ``MIGRATE_ON_START=false``: refuse to start on a database that still needs migrating."""
    revision = await current(engine, migrations)
    if is_behind(migrations, revision):
        raise SchemaNotReady(
            f"{migrations.service}: the database is at {revision or 'no revision'}, this release needs "
            f"{migrations.head()}: run `baton migrate --service {migrations.service}` "
            f"(or set BATON_{migrations.service.upper()}_MIGRATE_ON_START=true)"
        )
    if revision != migrations.head():
        log.warning("%s: database at %s, unknown to this release (newer?)", migrations.service, revision)
    return revision


async def differences(engine: AsyncEngine, migrations: Migrations) -> list[Any]:
    """What autogenerate would write: the models against the database (empty when they match)."""

    def run(connection: Connection) -> list[Any]:
        ctx = MigrationContext.configure(
            connection,
            opts={
                "version_table": migrations.version_table,
                "compare_type": True,
                "compare_server_default": True,
                "include_name": _own_tables(migrations),
            },
        )
        return list(compare_metadata(ctx, migrations.metadata))

    async with engine.connect() as conn:
        return await conn.run_sync(run)


def _own_tables(migrations: Migrations) -> Callable[[str | None, str, Any], bool]:
    """Autogenerate looks only at this service's tables (others may share the database)."""

    def include(name: str | None, type_: str, _parent: Any) -> bool:
        if type_ == "table":
            return name in migrations.metadata.tables
        return True

    return include


def offline_sql(migrations: Migrations, url: str, revision: str = "head", start: str | None = None) -> str:
    """The SQL an upgrade would run, for a DBA to review or apply (``baton migrate --sql``)."""
    cfg = migrations.config(url=url)
    target = f"{start}:{revision}" if start else revision
    command.upgrade(cfg, target, sql=True)
    buffer = cfg.output_buffer
    assert isinstance(buffer, io.StringIO)
    return buffer.getvalue()


def new_revision(migrations: Migrations, message: str, url: str) -> Path:
    """Autogenerate the next revision (``NNNN_<slug>.py``) from the models against ``url`` at head."""
    script = migrations.script()
    head = script.get_current_head()
    number = int(head) + 1 if head and head.isdigit() else 1
    cfg = migrations.config(url=url)
    result = command.revision(cfg, message=message, autogenerate=True, rev_id=f"{number:04d}")
    scripts = result if isinstance(result, list) else [result]
    first = scripts[0] if scripts else None
    if first is None:
        raise RuntimeError("alembic wrote no revision")
    return Path(first.path)
