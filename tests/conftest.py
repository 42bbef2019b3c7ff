"""Shared fixtures: a NATS server, a private one per test, a provisioned one, databases, the example catalog.

Environment:

- ``BATON_NATS_URL``: use this server for ``nats_url`` instead of starting one.
- ``BATON_TEST_DATABASE_URL``: a PostgreSQL URL (``postgresql+asyncpg://postgres@127.0.0.1:5432/test``);
  each ``make_database_url(name)`` then creates a fresh database on that server, dropped at session end.
  Without it, databases are SQLite files under the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.engine import URL, make_url

from baton.natsserver import NatsServer
from baton.provision import provision
from libs.contracts.catalog import Catalog
from libs.contracts.catalog_file import load_catalog

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CATALOG = ROOT / "deploy" / "catalog.yaml"

NATS_URL_ENV = "BATON_NATS_URL"
DATABASE_URL_ENV = "BATON_TEST_DATABASE_URL"
#: The nats image used only when a Docker engine answers and BATON_NATS_URL is unset.
NATS_IMAGE = "nats:2.15-alpine"

MakeDatabaseUrl = Callable[[str], str]


# --- catalog -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def catalog_path() -> Path:
    return EXAMPLE_CATALOG


@pytest.fixture(scope="session")
def catalog(catalog_path: Path) -> Catalog:
    return load_catalog(catalog_path)


# --- NATS ----------------------------------------------------------------------------
def _docker_answers(within: float = 2.0) -> bool:
    """True when a Docker engine answers a ping quickly; never raises."""
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=max(1, int(within)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A JetStream-enabled server shared by the session: $BATON_NATS_URL, else a container, else a subprocess.

    Shared: tests using it must not rely on an empty server (use ``nats_server``/``provisioned_nats`` for that).
    """
    env_url = os.environ.get(NATS_URL_ENV)
    if env_url:
        yield env_url
        return
    if _docker_answers():
        try:
            from testcontainers.community.nats import NatsContainer
        except ImportError:  # testcontainers < 4.9
            from testcontainers.nats import NatsContainer
        with NatsContainer(NATS_IMAGE, jetstream=True) as container:
            yield str(container.nats_uri())
        return
    with NatsServer(tmp_path_factory.mktemp("nats-session")) as server:
        yield server.url


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A fresh private nats-server for this test only (free to stop, kill or restart it)."""
    server = NatsServer(tmp_path / "nats")
    await server.start_async()
    try:
        yield server
    finally:
        await server.stop_async()


@pytest.fixture
async def provisioned_nats(nats_server: NatsServer, catalog: Catalog) -> str:
    """URL of a fresh private server with every Baton stream and consumer provisioned for the example catalog."""
    await provision(nats_server.url, catalog)
    return nats_server.url


# --- databases -----------------------------------------------------------------------
def _run(coro_factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine from a sync fixture helper, even while the session's event loop runs here."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: asyncio.run(coro_factory())).result()


def _asyncpg_dsn(url: URL, database: str | None = None) -> str:
    """asyncpg wants a plain ``postgresql://`` DSN, not SQLAlchemy's ``postgresql+asyncpg://``."""
    return url.set(drivername="postgresql", database=database or url.database).render_as_string(hide_password=False)


async def _admin(url: URL, sql: str) -> None:
    conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_backend() -> str:
    """``"postgresql"`` when $BATON_TEST_DATABASE_URL is set, else ``"sqlite"``."""
    return "postgresql" if os.environ.get(DATABASE_URL_ENV) else "sqlite"


@pytest.fixture(scope="session")
def _created_databases() -> Iterator[list[str]]:
    """Databases created on the PostgreSQL server this session; dropped (WITH FORCE) at session end."""
    created: list[str] = []
    yield created
    server = os.environ.get(DATABASE_URL_ENV)
    if not server or not created:
        return
    admin = make_url(server)
    for name in created:
        _run(functools.partial(_admin, admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def make_database_url(tmp_path: Path, _created_databases: list[str]) -> MakeDatabaseUrl:
    """``make_database_url(name) -> str``: an async SQLAlchemy URL of an empty database for this test.

    PostgreSQL (when $BATON_TEST_DATABASE_URL is set): a new database ``baton_t_<name>_<random8>``;
    else ``sqlite+aiosqlite:///<tmp>/<name>.db``. The same name within one test gives the same URL.
    """
    server = os.environ.get(DATABASE_URL_ENV)
    made: dict[str, str] = {}

    def make(name: str) -> str:
        if name in made:
            return made[name]
        safe = re.sub(r"[^a-z0-9_]", "_", name.lower())[:40] or "db"
        if server:
            admin = make_url(server)
            database = f"baton_t_{safe}_{secrets.token_hex(4)}"
            _run(functools.partial(_admin, admin, f'CREATE DATABASE "{database}"'))
            _created_databases.append(database)
            made[name] = admin.set(database=database).render_as_string(hide_password=False)
        else:
            made[name] = f"sqlite+aiosqlite:///{tmp_path / safe}.db"
        return made[name]

    return make
