"""A guard for a FastStream 0.7.8 / nats-py 2.16 mismatch that stalls batch pull subscribers.

nats-py 2.16's ``PullSubscription.fetch`` (batch > 1) can raise a bare ``asyncio.TimeoutError``
(the builtin ``TimeoutError``) when its deadline runs out between its two pull requests; every
other timeout it raises is ``nats.errors.TimeoutError``. FastStream 0.7.8's pull loop catches only
the latter, so the bare one kills the consume task; FastStream's supervisor restarts it, but a
message delivered around the crash then waits 15-30 s before it is processed. Measured on a local
nats-server 2.15.1 + nats-py 2.16.0, throwaway probe (60-100 created events, ``fetch_timeout=0.05``):
2-9 stalls over 1 s per 60 events without the fix (max 30 s), none with it (max 94 ms; 311 ms
with one injected nak each).

The fix re-raises that bare timeout as ``nats.errors.TimeoutError``. It is a subclass of
``asyncio.TimeoutError``, so any caller that catches either still does: the change is safe for
every other user of nats-py in the process. pyproject.toml now pins nats-py below 2.15 (whose
fetch does not raise the bare timeout), so the wrapper is a no-op today; it keeps routing correct
if the pin is lifted before FastStream catches both. Remove it then.
"""

from __future__ import annotations

import functools
from typing import Any

import nats.errors
from nats.js.client import JetStreamContext

_MARK = "_baton_timeout_fix"


def install_fetch_timeout_fix() -> None:
    """Wrap ``PullSubscription.fetch`` once per process (idempotent)."""
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
