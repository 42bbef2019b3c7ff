"""A prompt pull loop for batch subscribers (no broker import: each service wires it with :func:`prompt_pull`).

FastStream's batch pull subscriber keeps fetching until its batch is full or its timeout has passed since
the fetch began, so below a full batch every message waits out the whole timeout at every stage
(docs/performance.md, "Fetch waits"). This loop hands a batch over as soon as anything is there:

1. ``fetch(1, idle)``: one pull request that returns with the first message the consumer has, at once when
   one is waiting, else as soon as one arrives (a long poll of at most ``idle`` seconds);
2. that message's metadata says how many more the consumer has waiting (``num_pending``); if any,
   ``fetch(k)`` takes up to ``batch - 1`` of them with nats-py's ``no_wait`` request, which the server answers
   at once. Under load a batch is therefore what arrived while the previous one was handled (natural
   batching, no fixed wait); a lone message goes alone.

Messages waiting for redelivery are not counted in ``num_pending``: after a redelivered message the second
fetch asks for a full batch anyway, bounded by a short linger. While idle a
subscriber costs one pull request per ``idle`` seconds. Errors other than a timeout (NATS restarting, the
connection closed) are logged and retried after a short pause, never raised: the loop is the subscriber's
only task and must outlive a broker outage (unacked messages are redelivered after the consumer's ack wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

log = logging.getLogger("baton.pull")

#: Bound on the second fetch (it asks only for messages the consumer reported waiting, so the server answers at
#: once; it lingers only if another replica took them first).
LINGER = 0.2
#: Bound on the second fetch after a redelivered message, when the consumer reported nothing new waiting: the
#: longest a lone redelivery waits for company.
REDELIVERY_LINGER = 0.02
#: Pause after a failed fetch (NATS unreachable) before the next one.
ERROR_PAUSE = 0.5
#: At most one warning per this many seconds for repeated fetch failures.
WARN_EVERY = 30.0


class PullSubscription(Protocol):
    async def fetch(self, batch: int = ..., timeout: float | None = ...) -> list[Any]: ...  # noqa: ASYNC109 (nats-py)


async def next_batch(subscription: PullSubscription, batch: int, idle: float) -> list[Any]:
    """The next batch: the first message within ``idle`` seconds, with up to ``batch - 1`` more the consumer
    already had waiting; ``[]`` when nothing came."""
    try:
        messages = list(await subscription.fetch(batch=1, timeout=idle))
    except TimeoutError:  # nats-py's timeouts subclass it
        return []
    if batch < 2 or not messages:
        return messages
    # The second fetch is only for company: whatever it raises (a timeout, the connection lost), the messages
    # already in hand are handed over rather than left to wait out their ack wait.
    waiting = waiting_after(messages[-1])
    if waiting > 0:
        with contextlib.suppress(Exception):
            messages += await subscription.fetch(batch=min(batch - 1, waiting), timeout=LINGER)
    elif redelivered(messages[-1]):
        # ``num_pending`` does not count messages waiting for redelivery (after a nak or an outage): ask for them
        # anyway, briefly, so that a backlog of redeliveries is handled in batches too.
        with contextlib.suppress(Exception):
            messages += await subscription.fetch(batch=batch - 1, timeout=REDELIVERY_LINGER)
    return messages


def redelivered(message: Any) -> bool:
    """Was ``message`` delivered before (its JetStream metadata); False if unknown."""
    return _metadata(message, "num_delivered") > 1


def waiting_after(message: Any) -> int:
    """How many messages the consumer still had for delivery after ``message`` (its JetStream metadata), 0 if
    unknown."""
    return _metadata(message, "num_pending")


def _metadata(message: Any, field: str) -> int:
    """A count from a message's JetStream metadata (nats-py's ``Msg.metadata``), at least 0; 0 when absent."""
    try:
        return max(0, int(getattr(message.metadata, field) or 0))
    except (AttributeError, TypeError, ValueError):
        return 0


async def pull_forever(
    subscription: Callable[[], PullSubscription | None],
    consume: Callable[[Sequence[Any]], Awaitable[Any]],
    *,
    running: Callable[[], bool],
    batch: int,
    idle: float,
    name: str = "",
    on_batch: Callable[[], None] | None = None,
) -> None:
    """Fetch with :func:`next_batch` and hand every non-empty batch to ``consume`` while ``running()``
    (``on_batch`` is called just before: the stall watchdog's sign of life)."""
    last_warning = 0.0
    while running():
        sub = subscription()
        if sub is None:
            await asyncio.sleep(ERROR_PAUSE)
            continue
        try:
            messages = await next_batch(sub, batch, idle)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            now = time.monotonic()
            if now - last_warning > WARN_EVERY:
                last_warning = now
                log.warning("fetching from %s failed (%s); trying again", name or "a pull subscription", exc)
            await asyncio.sleep(ERROR_PAUSE)
            continue
        if messages and running():
            if on_batch is not None:
                on_batch()
            await consume(messages)


def prompt_pull(subscriber: Any, *, idle: float, on_batch: Callable[[], None] | None = None) -> bool:
    """Give a FastStream batch pull subscriber (``PullSub(batch=True)``) the prompt loop instead of its own;
    whether it did (only batch subscribers are changed).

    FastStream starts ``subscriber._consume_pull`` as the subscription's task on every start (and restarts it
    if it fails); the instance attribute set here takes its place."""
    pull_sub = getattr(subscriber, "pull_sub", None)
    if pull_sub is None or not getattr(pull_sub, "batch", False) or not hasattr(subscriber, "_consume_pull"):
        return False
    size = int(pull_sub.batch_size)
    name = f"{getattr(getattr(subscriber, 'stream', None), 'name', '?')}/{subscriber.extra_options.get('durable')}"

    async def consume_pull() -> None:
        await pull_forever(
            lambda: subscriber.subscription,
            subscriber.consume,
            running=lambda: bool(subscriber.running),
            batch=size,
            idle=idle,
            name=name,
            on_batch=on_batch,
        )

    subscriber._consume_pull = consume_pull
    return True
