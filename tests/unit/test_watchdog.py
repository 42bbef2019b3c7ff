"""StallWatchdog's decision (libs/contracts/watchdog.py): restart only when stalled, idle and backlogged."""

import pytest

from libs.contracts.watchdog import StallWatchdog

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, *, backlog: tuple[int, int] = (3, 0), busy: bool = False) -> tuple[StallWatchdog, list[str]]:
    restarts: list[str] = []

    async def get_backlog() -> tuple[int, int]:
        return backlog

    async def restart() -> None:
        restarts.append("restart")

    dog = StallWatchdog("S/c", backlog=get_backlog, busy=lambda: busy, restart=restart, stalled_after=10, clock=clock)
    return dog, restarts


async def test_restarts_when_messages_wait_and_nothing_was_handled() -> None:
    clock = Clock()
    dog, restarts = make(clock, backlog=(0, 2))  # unacked only (lost in flight) counts too
    clock.now += 5
    assert not await dog.check()  # not long enough
    clock.now += 6
    assert await dog.check()
    assert restarts == ["restart"]
    assert dog.restarts == 1
    assert not await dog.check()  # a full period for the new subscription


@pytest.mark.parametrize(("backlog", "busy"), [((0, 0), False), ((5, 1), True)])
async def test_no_restart_when_nothing_waits_or_a_batch_is_in_hand(backlog: tuple[int, int], busy: bool) -> None:
    clock = Clock()
    dog, restarts = make(clock, backlog=backlog, busy=busy)
    clock.now += 60
    assert not await dog.check()
    assert restarts == []


async def test_a_handled_batch_resets_the_clock() -> None:
    clock = Clock()
    dog, restarts = make(clock)
    clock.now += 9
    dog.alive()
    clock.now += 9
    assert not await dog.check()
    assert restarts == []
