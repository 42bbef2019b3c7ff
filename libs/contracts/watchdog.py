"""A watchdog for pull subscriptions that stop receiving (no broker import: each service wires it).

Seen on a 3-node cluster after the node leading a stream was killed (docs/architecture.md, "Clusters"): the
client reconnected to a surviving node and its pull loop kept fetching, yet no message arrived any more
while the consumer showed messages waiting. A fresh subscription (new inbox, new pull requests) gets them
flowing again. The watchdog restarts a subscription when all of these hold:

* nothing was handled for ``stalled_after`` seconds (the prompt pull loop calls ``alive()`` for each batch),
* no batch is in hand (``busy()``: a long in-place retry is not a stall),
* its consumer has messages pending or unacknowledged (``backlog()``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from .pull import prompt_pull

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


def watch_subscriptions(broker: Any, registry: CollectorRegistry, service: str, *, idle: float) -> list[StallWatchdog]:
    """The prompt pull loop (libs/contracts/pull.py) and a stall watchdog for each batch pull subscriber of a
    FastStream ``broker`` (duck-typed: its subscribers and connection), for routing, notifier and metrics.

    The loop marks every batch it hands over (the sign of life); a restart stops and starts the FastStream
    subscriber (a new inbox and new pull requests), logs a warning and counts it in
    ``baton_<service>_resubscriptions_total``."""
    resubscriptions = Counter(
        f"baton_{service}_resubscriptions",
        "Pull subscriptions restarted by the stall watchdog (messages waited, none was handled).",
        ["consumer"],
        registry=registry,
    )

    def watchdog_for(sub: Any) -> StallWatchdog:
        stream, durable = sub.stream.name, sub.extra_options["durable"]

        async def backlog() -> tuple[int, int]:
            info = await broker.connection.jetstream(timeout=2).consumer_info(stream, durable)
            return info.num_pending or 0, info.num_ack_pending or 0

        async def restart() -> None:
            inbox = getattr(sub.subscription, "_sub", None)  # what the stalled inbox got: for the diagnosis
            log.warning(
                "resubscribing to %s/%s (connected to %s; the old inbox got %s messages, %s unread)",
                stream,
                durable,
                broker.connection.connected_url,
                getattr(inbox, "_received", "?"),
                inbox._pending_queue.qsize() if inbox is not None else "?",
            )
            resubscriptions.labels(durable).inc()
            try:
                await sub.stop()
            except Exception:  # NATS unreachable: the subscription went with the connection; subscribe afresh
                log.warning("stopping the %s/%s subscription failed", stream, durable, exc_info=True)
                sub.subscription = None
            await sub.start()

        return StallWatchdog(f"{stream}/{durable}", backlog=backlog, busy=lambda: busy(sub), restart=restart)

    watchdogs: list[StallWatchdog] = []
    for sub in broker.subscribers:
        watchdog = watchdog_for(sub)
        if prompt_pull(sub, idle=idle, on_batch=watchdog.alive):
            watchdogs.append(watchdog)
    return watchdogs


def busy(subscriber: object) -> bool:
    """Is the subscriber handling a batch? (FastStream's MultiLock holds one entry per message in hand.)"""
    return bool(getattr(getattr(subscriber, "lock", None), "qsize", 0))  # a property, like ``empty``
