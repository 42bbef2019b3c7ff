"""Infrastructure going away under load: nats-server restarted, the database unavailable for 10 s."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from baton.supervisor import SERVICES, Stack
from libs.contracts.subjects import STREAM_EVENTS, STREAM_IN
from tests.conftest import DATABASE_URL_ENV

from .conftest import StartStack
from .oracle import Oracle, assert_clean, show
from .proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

N = 30
OUTAGE = 10.0


async def test_nats_server_restarted_during_the_load(start_stack: StartStack, capsys: Any) -> None:
    """Stop and start nats-server (same port, same JetStream store) twice: once cleanly, once with kill -9."""
    stack = await start_stack()
    oracle = Oracle(stack, N, interval=0.4)
    await oracle.connect()
    try:
        load = asyncio.create_task(oracle.run())
        down = 0.0
        pids = [stack.nats.pid if stack.nats else None]
        for kill in (False, True):
            await asyncio.sleep(4.0)
            started = time.monotonic()
            await stack.restart_nats(kill=kill)
            down += time.monotonic() - started
            pids.append(stack.nats.pid if stack.nats else None)
        load_seconds = await load
        report = await oracle.check("restart nats-server")
        report.notes |= {
            "restarts": 2,
            "nats_down_s": round(down, 1),
            "publish_retries": oracle.publish_retries,
            "load_s": round(load_seconds, 1),
        }
        show(report, capsys)
        assert_clean(report)
        assert len(set(pids)) == 3, pids  # three different nats-server processes served the load
    finally:
        await oracle.close()


def _lock_all(paths: list[Path]) -> list[sqlite3.Connection]:
    """Hold an exclusive transaction on every SQLite file: no one else can write until it is released."""
    conns = []
    for path in paths:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
        conns.append(conn)
    return conns


async def last_seqs(oracle: Oracle) -> tuple[int, int]:
    """Last stream sequence of BATON_IN (what departments sent) and BATON_EVENTS (what intake committed)."""
    assert oracle.nc is not None
    jsm = oracle.nc.jsm()
    inbound = (await jsm.stream_info(STREAM_IN)).state.last_seq
    canonical = (await jsm.stream_info(STREAM_EVENTS)).state.last_seq
    return inbound, canonical


async def test_database_unavailable_for_10_seconds(start_stack: StartStack, capsys: Any) -> None:
    """PostgreSQL (CI): every connection dropped and refused for 10 s by a proxy. SQLite: every file locked 10 s."""
    postgres = os.environ.get(DATABASE_URL_ENV)
    proxy = None
    if postgres:
        target = make_url(postgres)
        proxy = await TcpProxy(target.host or "127.0.0.1", target.port or 5432).start()
    stack = await start_stack(db_proxy=proxy)
    oracle = Oracle(stack, N, interval=0.4)
    await oracle.connect()
    try:
        load = asyncio.create_task(oracle.run())
        await asyncio.sleep(4.0)
        started = time.monotonic()
        if proxy is not None:
            proxy.cut()
            await asyncio.sleep(OUTAGE)
            proxy.restore()
            how = "postgres_proxy"
            proof = {"refused_connections": proxy.refused}
        else:
            paths = [stack.data_dir / "data" / f"{name}.db" for name in SERVICES]
            locks = await asyncio.to_thread(_lock_all, paths)
            try:
                await asyncio.sleep(1.0)  # let commits that began before the lock finish publishing
                before = await last_seqs(oracle)
                await asyncio.sleep(OUTAGE - 1.0)
                during = await last_seqs(oracle)
            finally:
                for conn in locks:
                    await asyncio.to_thread(_release, conn)
            how = "sqlite_locked"
            proof = {"inbound_during": during[0] - before[0], "canonical_during": during[1] - before[1]}
        outage = time.monotonic() - started
        load_seconds = await load
        report = await oracle.check("database down 10 s")
        report.notes |= {"outage_s": round(outage, 1), "how": how, **proof, "load_s": round(load_seconds, 1)}
        show(report, capsys)
        assert_clean(report)
        # The outage was real: PostgreSQL connections were refused and services logged the failures they
        # recovered from; SQLite writers waited (busy_timeout 30 s): nothing reached the log while events came in.
        if proxy is not None:
            assert proxy.refused > 0
            assert_saw_the_outage(stack)
        else:
            assert proof["inbound_during"] > 0, proof
            assert proof["canonical_during"] == 0, proof
    finally:
        await oracle.close()


def _release(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")
    conn.close()


def assert_saw_the_outage(stack: Stack) -> None:
    """The outage was real: at least one service logged a failure it then recovered from."""
    words = ("transient failure", "failed; redelivering", "retrying", "OperationalError", "InterfaceError")
    hits = 0
    for name in SERVICES:
        text = stack.services[name].log_path.read_text(errors="replace")
        hits += sum(text.count(w) for w in words)
    assert hits > 0, "no service noticed the database outage: the fault was not injected"
