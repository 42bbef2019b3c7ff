"""`baton up` as a user runs it: the real CLI process. Nothing may outlive it, however it ends."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def pids_using(path: Path) -> set[int]:
    """Processes whose command line mentions ``path`` (the stack's data directory)."""
    found = set()
    needle = str(path).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def gone(pids: set[int], within: float) -> set[int]:
    deadline = asyncio.get_running_loop().time() + within
    while (left := {p for p in pids if alive(p)}) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    return left


@pytest.fixture
async def baton_up(tmp_path: Path, catalog_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, set[int]]]:
    data = tmp_path / "baton-data"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "baton.cli", "up", "--data-dir", str(data), "--catalog", str(catalog_path),
        "--nats-port", "0", "--monitor-port", "0", "--http-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    output: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 90)).decode()
        assert line, "baton up exited early:\n" + "".join(output)
        output.append(line)
        if "Press Ctrl-C" in line:
            break
    services = {int(m) for m in re.findall(r"started \w+ \(pid (\d+)\)", "".join(output))}
    assert len(services) == 4, "".join(output)
    children = services | pids_using(data)  # the services and nats-server
    children.discard(proc.pid)
    try:
        yield proc, children
    finally:
        for pid in children | {proc.pid}:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_killed_supervisor_takes_every_service_and_nats_with_it(
    baton_up: tuple[asyncio.subprocess.Process, set[int]],
) -> None:
    proc, children = baton_up
    assert len(children) >= 5  # four services and nats-server
    proc.kill()  # SIGKILL: no chance to clean up
    await proc.wait()
    # The kernel sends the children SIGTERM (PR_SET_PDEATHSIG): they drain their batch first (a bound, not a speed).
    assert await gone(children, 45) == set(), "orphaned processes would keep Baton's ports busy"


async def test_closing_the_terminal_stops_baton_cleanly(
    baton_up: tuple[asyncio.subprocess.Process, set[int]],
) -> None:
    proc, children = baton_up
    proc.send_signal(signal.SIGHUP)
    assert proc.stdout is not None
    rest = (await asyncio.wait_for(proc.stdout.read(), 60)).decode()
    assert await proc.wait() == 0, rest
    assert "Stopped cleanly." in rest
    assert await gone(children, 5) == set()
