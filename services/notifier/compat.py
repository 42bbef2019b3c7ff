"""Workaround for a nats-py 2.16 / FastStream 0.7.8 mismatch that stalls batch pull subscribers.

nats-py's ``PullSubscription.fetch`` (``_fetch_n``, batch > 1) raises a *bare*
``asyncio.TimeoutError`` when the fetch deadline runs out before its lingering pull request
is sent. FastStream's batch loop (``BatchPullStreamSubscriber._consume_pull``) catches only
``nats.errors.TimeoutError``, so the error escapes the loop, FastStream's supervisor restarts
it, and the messages already fetched in that round are neither handled nor naked: they come
back only after the consumer's ``ack_wait`` (15 s), one delivery attempt poorer. It happens
whenever a batch fills partially and the next fetch has almost no time left, i.e. often with
a short ``fetch_timeout``.

:func:`install` re-raises such bare timeouts as ``nats.errors.TimeoutError``. That class
subclasses ``asyncio.TimeoutError``, so every other caller still catches it; only FastStream's
loop now handles it as intended (stop filling, process what was fetched). Idempotent.
Remove it once FastStream catches the builtin ``TimeoutError`` (or nats-py raises its own).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import nats.errors
from nats.js.client import JetStreamContext

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_MARK = "_baton_timeout_fix"  # the same marker as services/routing/natscompat.py: one wrapper per process


def normalize_timeouts(fetch: F) -> F:
    """Wrap an async ``fetch`` so that a bare ``TimeoutError`` leaves it as ``nats.errors.TimeoutError``."""
    if getattr(fetch, _MARK, False):
        return fetch

    @functools.wraps(fetch)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fetch(*args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    setattr(wrapper, _MARK, True)
    return cast("F", wrapper)


def install() -> None:
    """Apply :func:`normalize_timeouts` to nats-py's ``PullSubscription.fetch`` (process-wide, once)."""
    cls: Any = JetStreamContext.PullSubscription
    cls.fetch = normalize_timeouts(cls.fetch)
