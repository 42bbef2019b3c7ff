"""A guard for a nats-py bug that FastStream's batch pull loop trips over.

nats-py 2.15/2.16 ``PullSubscription.fetch`` (batch > 1) can raise a bare ``asyncio.TimeoutError``
when the remaining deadline runs out right after the server's "no messages" answer (nats.py
PR #934; the fix, PR #1008, is not released). FastStream 0.7's batch pull loop catches only
``nats.errors.TimeoutError``, so its consume task dies (the supervisor restarts it) and the
messages it had already fetched for the batch are dropped until the server redelivers them
after ``ack_wait``: seconds of latency, and a wasted delivery attempt.

``patch_pull_fetch_timeout()`` re-raises that bare timeout as ``nats.errors.TimeoutError``
(a subclass of ``asyncio.TimeoutError``, so every existing ``except`` still matches). Idempotent.
"""

from __future__ import annotations

import functools
from typing import Any

import nats.errors
from nats.js.client import JetStreamContext

_MARK = "_baton_timeout_fix"  # shared with services/routing/natscompat.py and services/notifier/compat.py


def patch_pull_fetch_timeout() -> None:
    cls: Any = JetStreamContext.PullSubscription
    original = cls.fetch
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    async def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    setattr(fetch, _MARK, True)
    cls.fetch = fetch
