"""Fixtures of the fault tests: a private Baton stack per test, on SQLite or PostgreSQL.

With ``BATON_TEST_DATABASE_URL`` set (CI), each service gets its own fresh PostgreSQL database
(``make_database_url``), optionally through a :class:`~tests.faults.proxy.TcpProxy`; otherwise
each service uses its own SQLite file in the stack's data directory, as ``baton up`` does.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from baton.supervisor import SERVICES, Stack, StackConfig
from tests.conftest import DATABASE_URL_ENV, MakeDatabaseUrl

from .proxy import TcpProxy

StartStack = Callable[..., Awaitable[Stack]]


def quick_env() -> dict[str, str]:
    """Short fetch timeouts and retry delays: recovery in seconds, not minutes."""
    env: dict[str, str] = {}
    for name in SERVICES:
        prefix = f"BATON_{name.upper()}_"
        env[prefix + "FETCH_TIMEOUT"] = "0.05"
        env[prefix + "RETRY_DELAY"] = "0.5"
    return env


@pytest.fixture
async def start_stack(
    tmp_path: Path, catalog_path: Path, make_database_url: MakeDatabaseUrl
) -> AsyncIterator[StartStack]:
    """``await start_stack(service_env=..., db_proxy=...)``: a running stack, stopped at the end of the test."""
    stacks: list[Stack] = []
    proxies: list[TcpProxy] = []

    async def start(*, service_env: dict[str, dict[str, str]] | None = None, db_proxy: TcpProxy | None = None) -> Stack:
        env = {name: dict((service_env or {}).get(name, {})) for name in SERVICES}
        if os.environ.get(DATABASE_URL_ENV):
            for name in SERVICES:
                url = make_database_url(name)
                if db_proxy is not None:
                    url = make_url(url).set(host=db_proxy.host, port=db_proxy.port).render_as_string(False)
                env[name][f"BATON_{name.upper()}_DATABASE_URL"] = url
        if db_proxy is not None:
            proxies.append(db_proxy)
        config = StackConfig(
            data_dir=tmp_path / f"baton-{len(stacks)}",
            catalog_path=catalog_path,
            nats_port=0,
            monitor_port=None,
            http_base_port=0,
            extra_env=quick_env(),
            service_env=env,
            max_restarts=100,
            max_restart_delay=1.0,
        )
        stack = Stack(config)
        stacks.append(stack)
        await stack.start()
        return stack

    yield start
    for stack in stacks:
        await stack.stop(grace=10)
    for proxy in proxies:
        await proxy.stop()


async def kill_and_wait(stack: Stack, name: str, within: float = 60.0) -> float:
    """kill -9 ``name``, wait until the supervisor restarted it and it is ready again; seconds it took."""
    started = time.monotonic()
    svc = stack.services[name]
    old = svc.proc
    await stack.kill_service(name)
    if old is not None:
        await old.wait()
    await wait_service_ready(stack, name, within, not_proc=old)
    return time.monotonic() - started


async def wait_service_ready(
    stack: Stack, name: str, within: float = 60.0, not_proc: asyncio.subprocess.Process | None = None
) -> None:
    svc = stack.services[name]
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if svc.proc is not None and svc.proc is not not_proc and svc.proc.returncode is None:
                try:
                    if (await client.get(f"{svc.url}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{name} not ready again within {within}s (log: {svc.log_path})")


def log_lines(stack: Stack, name: str, needle: str) -> list[str]:
    return [line for line in stack.services[name].log_path.read_text(errors="replace").splitlines() if needle in line]
