"""A watchdog for pull subscriptions that stop receiving (no broker import: each service wires it).

Seen on a 3-node cluster after the node leading a stream was killed (docs/architecture.md, "Clusters"): the
client reconnected to a surviving node and its pull loop kept fetching, yet no message arrived any more
while the consumer showed messages waiting. A fresh subscription (new inbox, new pull requests) gets them
flowing again. The watchdog restarts a subscription when all of these hold:

* nothing was handled for ``stalled_after`` seconds (the service calls ``alive()`` for each batch),
* no batch is in hand (``busy()``: a long in-place retry is not a stall),
* its consumer has messages pending or unacknowledged (``backlog()``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger("baton.watchdog")

#: Seconds without a handled message, while messages wait, before a subscription is restarted.
STALLED_AFTER = 10.0
#: Seconds between two looks.
CHECK_EVERY = 5.0


class StallWatchdog:
    """Restarts one pull subscription when it stalls (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        backlog: Callable[[], Awaitable[tuple[int, int]]],
        busy: Callable[[], bool],
        restart: Callable[[], Awaitable[None]],
        stalled_after: float = STALLED_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.backlog = backlog  # (pending, unacked) on the subscription's consumer
        self.busy = busy
        self.restart = restart
        self.stalled_after = stalled_after
        self.clock = clock
        self.last_alive = clock()
        self.restarts = 0

    def alive(self) -> None:
        """A batch was handed to the handler."""
        self.last_alive = self.clock()

    async def check(self) -> bool:
        """One look; restarts the subscription when it is stalled. Returns whether it did."""
        idle = self.clock() - self.last_alive
        if idle < self.stalled_after or self.busy():
            return False
        try:
            pending, unacked = await self.backlog()
        except Exception as exc:  # NATS unreachable or no leader yet: look again next time
            log.debug("watchdog %s: no consumer info: %s", self.name, exc)
            return False
        if not (pending or unacked):
            return False
        log.warning(
            "%s: %d messages pending, %d unacked, none handled for %.0fs: restarting the subscription",
            self.name,
            pending,
            unacked,
            idle,
        )
        self.restarts += 1
        await self.restart()
        self.last_alive = self.clock()  # a full period for the new subscription
        return True


async def watch(watchdogs: Sequence[StallWatchdog], *, every: float = CHECK_EVERY) -> None:
    """Look at every watchdog every ``every`` seconds, for ever (cancel the task to stop)."""
    while True:
        await asyncio.sleep(every)
        for watchdog in watchdogs:
            try:
                await watchdog.check()
            except Exception:
                log.warning("watchdog %s: restarting the subscription failed; trying again", watchdog.name,
                            exc_info=True)  # fmt: skip
