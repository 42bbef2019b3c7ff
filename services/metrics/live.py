"""Live push for the dashboard: a version counter bumped after every committed projection change,
streamed to browsers as Server-Sent Events.

The stream carries only the version number, never a request id or a department: which requests
exist is itself confidential. A page that hears "projected" fetches itself again, through the
same access rules as any other request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

#: Seconds between checks for shutdown / disconnection; keeps Ctrl-C fast with a dashboard open.
TICK = 1.0
#: Send a comment line this often so proxies keep the connection open.
KEEPALIVE_TICKS = 15


class LiveFeed:
    def __init__(self) -> None:
        self.version = 0
        self._cond = asyncio.Condition()

    async def bump(self) -> None:
        async with self._cond:
            self.version += 1
            self._cond.notify_all()

    async def wait_newer(self, seen: int, within: float) -> int:
        """The current version once it is newer than ``seen``, or ``seen`` after ``within`` seconds."""
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.version > seen), within)
            except TimeoutError:
                return seen
            return self.version

    async def stream(self, stop: Callable[[], bool]) -> AsyncIterator[str]:
        """SSE frames until ``stop()`` says the client left or the server is shutting down."""
        seen = self.version
        yield f"retry: 2000\nevent: hello\ndata: {seen}\n\n"
        idle = 0
        while not stop():
            current = await self.wait_newer(seen, TICK)
            if current > seen:
                seen, idle = current, 0
                yield f"event: projected\ndata: {current}\n\n"
                continue
            idle += 1
            if idle >= KEEPALIVE_TICKS:
                idle = 0
                yield ": keep-alive\n\n"
