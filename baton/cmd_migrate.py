"""``baton migrate``: the services' Alembic migrations (each service has its own, in ``services/<name>/migrations``).

    baton migrate                        every service's database to head
    baton migrate --service intake       one service; --database-url overrides its URL
    baton migrate --revision 0001        a given revision; --sql prints the SQL instead of running it
    baton migrate status [--check]       current revision against head, per service
    baton migrate downgrade --service intake --revision 0001
    baton migrate new --service intake --message "..."   autogenerate the next revision (development)

Database URLs default to what the services themselves use: ``BATON_<SERVICE>_DATABASE_URL``, else the
embedded SQLite files under ``.baton/data`` (``--data-dir`` for another ``baton up --data-dir``).
"""

from __future__ import annotations

import asyncio
import importlib
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from libs import migrations as schema
from libs.contracts.database import make_engine

SERVICES = ("intake", "routing", "notifier", "metrics")


class Service(StrEnum):
    intake = "intake"
    routing = "routing"
    notifier = "notifier"
    metrics = "metrics"
    all = "all"


ServiceOpt = Annotated[Service, typer.Option("--service", "-s", help="Which service's database.")]
UrlOpt = Annotated[
    str | None,
    typer.Option(help="Database URL (one service only); default BATON_<SERVICE>_DATABASE_URL or the embedded file."),
]
DataDirOpt = Annotated[
    Path | None, typer.Option(help="The embedded stack's data directory (`baton up --data-dir`), for SQLite URLs.")
]

migrate_app = typer.Typer(
    help="Database migrations of the four services (Alembic; one version table per service).",
    invoke_without_command=True,
)


@dataclass(frozen=True)
class Target:
    service: str
    url: str

    def migrations(self) -> schema.Migrations:
        module = importlib.import_module(f"services.{self.service}.migrations")
        result: schema.Migrations = module.migrations()
        return result

    def make_engine(self) -> Any:
        return make_engine(self.url)

    @property
    def shown_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def sqlite_missing(self) -> bool:
        parsed = make_url(self.url)
        return parsed.get_backend_name() == "sqlite" and not (
            parsed.database in (None, "", ":memory:") or Path(parsed.database or "").exists()
        )


def service_url(service: str, data_dir: Path | None) -> str:
    """The URL the service itself would use (its settings: environment, then the embedded default)."""
    if data_dir is not None:
        return f"sqlite+aiosqlite:///{data_dir / 'data' / f'{service}.db'}"
    module = importlib.import_module(f"services.{service}.settings")
    cls = next(v for k, v in vars(module).items() if k.endswith("Settings") and k != "BaseSettings")
    url: str = cls().database_url
    return url


def targets(service: Service, database_url: str | None, data_dir: Path | None) -> list[Target]:
    names = SERVICES if service is Service.all else (service.value,)
    if database_url is not None and len(names) > 1:
        raise typer.BadParameter("--database-url names one service's database: add --service", param_hint="--service")
    return [Target(name, database_url or service_url(name, data_dir)) for name in names]


@migrate_app.callback()
def migrate(
    ctx: typer.Context,
    service: ServiceOpt = Service.all,
    database_url: UrlOpt = None,
    revision: Annotated[str, typer.Option(help="Target revision (`head`, `0002`; with --sql also `0001:head`).")] = (
        "head"
    ),
    sql: Annotated[bool, typer.Option("--sql", help="Print the SQL instead of running it (for review by a DBA).")] = (
        False
    ),
    data_dir: DataDirOpt = None,
) -> None:
    """Upgrade the services' databases to head (or --revision). Safe to run again and beside starting replicas."""
    if ctx.invoked_subcommand is not None:
        return
    for target in targets(service, database_url, data_dir):
        migrations = target.migrations()
        if sql:
            typer.echo(f"-- {target.service}: {revision} ({make_url(target.url).get_backend_name()})")
            typer.echo(schema.offline_sql(migrations, target.url, revision))
            continue
        outcome = asyncio.run(_upgrade(target, migrations, revision))
        note = f" (no version table: stamped at {migrations.baseline} first)" if outcome.adopted else ""
        if outcome.before == outcome.after:
            typer.echo(f"{target.service}: at {outcome.after}, nothing to do{note}  [{target.shown_url}]")
        else:
            typer.echo(f"{target.service}: {outcome.before or 'empty'} -> {outcome.after}{note}  [{target.shown_url}]")


async def _upgrade(target: Target, migrations: schema.Migrations, revision: str) -> schema.Outcome:
    engine = target.make_engine()
    try:
        return await schema.upgrade(engine, migrations, revision)
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class Status:
    service: str
    url: str
    current: str | None
    head: str
    state: str

    @property
    def behind(self) -> bool:
        return self.state != "up to date" and not self.state.startswith("ahead")


async def _status(target: Target) -> Status:
    migrations = target.migrations()
    head = migrations.head()
    if target.sqlite_missing():
        return Status(target.service, target.shown_url, None, head, "no database yet")
    engine = target.make_engine()
    try:
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        current = await schema.current(engine, migrations)
    finally:
        await engine.dispose()
    if migrations.version_table not in tables:
        own = tables & set(migrations.metadata.tables)
        state = f"created before migrations: stamped at {migrations.baseline} on migrate" if own else "empty"
    elif current == head:
        state = "up to date"
    elif schema.is_behind(migrations, current):
        state = "behind: run `baton migrate`"
    else:
        state = "ahead: revision unknown to this release"
    return Status(target.service, target.shown_url, current, head, state)


@migrate_app.command("status")
def status(
    service: ServiceOpt = Service.all,
    database_url: UrlOpt = None,
    data_dir: DataDirOpt = None,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 when a database needs migrating.")] = False,
) -> None:
    """Each service's database revision against this release's head."""
    rows = [asyncio.run(_status(t)) for t in targets(service, database_url, data_dir)]
    width = max(len(r.service) for r in rows)
    typer.echo(f"{'service':<{width}}  current  head  state")
    for r in rows:
        typer.echo(f"{r.service:<{width}}  {r.current or '-':<7}  {r.head:<4}  {r.state}  [{r.url}]")
    if check and any(r.behind for r in rows):
        raise SystemExit(1)


@migrate_app.command("downgrade")
def downgrade(
    service: Annotated[Service, typer.Option("--service", "-s", help="One service.")],
    revision: Annotated[str, typer.Option(help="Revision to go back to (`base`: drop the service's tables).")],
    database_url: UrlOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Go back to an earlier revision (stop the service's replicas first; data in dropped columns is lost)."""
    if service is Service.all:
        raise typer.BadParameter("downgrade one service at a time", param_hint="--service")
    (target,) = targets(service, database_url, data_dir)

    async def run() -> str | None:
        engine = target.make_engine()
        try:
            return await schema.downgrade(engine, target.migrations(), revision)
        finally:
            await engine.dispose()

    typer.echo(f"{target.service}: now at {asyncio.run(run()) or 'base'}  [{target.shown_url}]")


@migrate_app.command("new")
def new(
    service: Annotated[Service, typer.Option("--service", "-s", help="The service whose models changed.")],
    message: Annotated[str, typer.Option("--message", "-m", help="What the revision does.")],
) -> None:
    """Autogenerate the next revision from the service's models (development; `make migration`). Review it!"""
    if service is Service.all:
        raise typer.BadParameter("one service at a time", param_hint="--service")
    target = Target(service.value, "")
    migrations = target.migrations()
    with tempfile.TemporaryDirectory(prefix="baton-migration-") as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'head.db'}"
        asyncio.run(_upgrade(Target(service.value, url), migrations, "head"))
        path = schema.new_revision(migrations, message, url)
    typer.echo(f"{path}\nReview it (types, indexes, constraints, server defaults, downgrade) before committing.")
