"""Processes dying under load: kill -9 each service in turn, and a crash between the commit and the ack."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from baton.supervisor import SERVICES

from .conftest import StartStack, kill_and_wait, log_lines
from .oracle import Oracle, assert_clean, show

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

N = 25


async def test_kill_9_each_service_in_turn_during_the_load(start_stack: StartStack, capsys: Any) -> None:
    stack = await start_stack()
    oracle = Oracle(stack, N, interval=0.4)
    await oracle.connect()
    try:
        load = asyncio.create_task(oracle.run())
        kills: list[str] = []
        downtime = 0.0
        # Kill -9 one service after the other every ~2 s (waiting for each to be back), for as long as the load runs.
        while not load.done() or len(kills) < len(SERVICES):
            name = SERVICES[len(kills) % len(SERVICES)]
            await asyncio.sleep(2.0)
            downtime += await kill_and_wait(stack, name)
            kills.append(name)
        load_seconds = await load
        report = await oracle.check("kill -9 each service")
        report.notes |= {"kills": len(kills), "load_s": round(load_seconds, 1), "restart_s": round(downtime, 1)}
        show(report, capsys)
        assert_clean(report)
        assert set(kills) == set(SERVICES)
    finally:
        await oracle.close()


async def test_crash_between_the_commit_and_the_ack(start_stack: StartStack, capsys: Any) -> None:
    """Every service exits (os._exit(137)) right after every 40th commit, before publishing and acking."""
    every = 40
    stack = await start_stack(
        service_env={name: {f"BATON_{name.upper()}_FAILPOINT": f"crash_after_commit:{every}"} for name in SERVICES}
    )
    oracle = Oracle(stack, N, interval=0.2)
    await oracle.connect()
    try:
        load_seconds = await oracle.run()
        report = await oracle.check("crash after commit")
        crashes = {name: len(log_lines(stack, name, "failpoint crash_after_commit")) for name in SERVICES}
        report.notes |= {"crashes": crashes, "load_s": round(load_seconds, 1)}
        show(report, capsys)
        assert_clean(report)
        # N lifecycles are ~5 inbound and 6 canonical events each: every service crashed several times.
        assert all(count >= 2 for count in crashes.values()), crashes
    finally:
        await oracle.close()
