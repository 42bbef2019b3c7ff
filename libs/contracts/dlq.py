"""Dead letters: their ids, the JetStream advisories they are built from, and replay records.

Pure pydantic and plain functions (no broker import). See docs/reliability.md.

One dead letter per (consumer, stream sequence): its ``dead_letter_id`` (also its ``Nats-Msg-Id`` on
``BATON_DLQ``) is ``dlq-<consumer>-<stream sequence>``, whoever writes it. Consumer names are unique
across Baton's streams, so the id names the message and the consumer that gave up on it.

Two writers, one entry:

* the service itself, on the last allowed delivery or on a refusal (the rich entry: its own code and
  reason). It then terminates the message with the reason :data:`TERM_DEAD_LETTERED`;
* intake's advisory consumer, from ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES`` (the service never
  reached its own last-delivery code, e.g. it crashed on that message every time) and
  ``MSG_TERMINATED`` advisories. A termination whose reason is :data:`TERM_DEAD_LETTERED` is already
  in the DLQ and is skipped; anything else becomes an entry with code ``max_deliveries`` or
  ``terminated``. The shared ``Nats-Msg-Id`` dedupes the rest (within BATON_DLQ's duplicate window).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .envelope import StrictModel, Timestamp
from .subjects import (
    CONSUMER_INTAKE,
    CONSUMER_METRICS,
    CONSUMER_NOTIFIER,
    CONSUMER_ROUTING,
    CONSUMER_ROUTING_TIMERS,
)

T = TypeVar("T")

#: The ``+TERM`` reason a service gives when it has dead-lettered the message itself.
TERM_DEAD_LETTERED = "dead-lettered by the service"
#: JetStream advisory types (the ``type`` field of the advisory JSON).
ADVISORY_MAX_DELIVER = "io.nats.jetstream.advisory.v1.max_deliver"
ADVISORY_TERMINATED = "io.nats.jetstream.advisory.v1.terminated"

#: The service that owns each durable consumer (department consumers ``dept-*`` belong to the notifier).
CONSUMER_SERVICE: dict[str, str] = {
    CONSUMER_INTAKE: "intake",
    CONSUMER_ROUTING: "routing",
    CONSUMER_ROUTING_TIMERS: "routing",
    CONSUMER_NOTIFIER: "notifier",
    CONSUMER_METRICS: "metrics",
}

_CONSUMER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def service_of_consumer(consumer: str) -> str | None:
    if consumer in CONSUMER_SERVICE:
        return CONSUMER_SERVICE[consumer]
    return "notifier" if consumer.startswith("dept-") else None


def dead_letter_id(consumer: str, stream_sequence: int) -> str:
    """``dlq-<consumer>-<stream sequence>``: the entry's id and its Nats-Msg-Id on BATON_DLQ."""
    if not _CONSUMER_RE.fullmatch(consumer) or stream_sequence < 0:
        raise ValueError(f"no dead-letter id for consumer {consumer!r} at sequence {stream_sequence}")
    return f"dlq-{consumer}-{stream_sequence}"


def term_payload(reason: str) -> bytes:
    """The ack payload that terminates a message with a reason (``+TERM <reason>``, nats-server 2.11+)."""
    clean = " ".join(reason.split())[:200]
    return b"+TERM " + clean.encode() if clean else b"+TERM"


class _JsMsg(Protocol):
    reply: str
    _client: Any
    _ackd: bool


async def term_with_reason(msg: _JsMsg, reason: str = TERM_DEAD_LETTERED) -> None:
    """Terminate a JetStream message with a reason that lands in the ``MSG_TERMINATED`` advisory.

    nats-py 2.14's ``Msg.term()`` takes no reason, so the ack payload is sent as it is on the wire.
    """
    if not msg.reply:
        raise ValueError("not a JetStream message (no reply subject)")
    await msg._client.publish(msg.reply, term_payload(reason))
    msg._ackd = True


class Advisory(BaseModel):
    """The fields Baton reads from a max-deliveries or terminated advisory (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    type: str
    id: str = ""
    timestamp: str | None = None
    stream: str
    consumer: str
    stream_seq: int = Field(ge=0)
    deliveries: int = Field(default=0, ge=0)
    reason: str = ""

    @property
    def kind(self) -> Literal["max_deliveries", "terminated", "other"]:
        if self.type == ADVISORY_MAX_DELIVER:
            return "max_deliveries"
        if self.type == ADVISORY_TERMINATED:
            return "terminated"
        return "other"


class DlqReplay(StrictModel):
    """Recorded on ``baton.dlq.replay.<dlq sequence>`` each time ``baton dlq replay`` re-publishes an entry."""

    dead_letter_id: str
    dlq_sequence: int = Field(ge=1)
    subject: Annotated[str, StringConstraints(max_length=256)]
    msg_id: str
    replayed_at: Timestamp
    replayed_by: str = ""


async def wait_out_transient(
    attempt: Callable[[], Awaitable[T]],
    failure: BaseException,
    transient: tuple[type[BaseException], ...],
    *,
    heartbeat: Callable[[], Awaitable[None]],
    base_delay: float,
    max_delay: float = 10.0,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """On a message's last allowed delivery: retry ``attempt`` in place for as long as it fails transiently.

    A database or NATS outage must never send a message to the dead-letter queue; naking it on its last
    delivery would (JetStream gives up and advises). So while ``failure`` is one of ``transient`` the
    message is kept (``heartbeat``, i.e. ``Msg.in_progress``, resets its ack wait) and tried again with a
    growing delay capped at ``max_delay`` (below the consumer's ack wait). Returns the attempt's result;
    raises the first non-transient failure (then the caller dead-letters with that reason).
    """
    retries = 0
    while isinstance(failure, transient):
        retries += 1
        delay = min(base_delay * 2 ** min(retries - 1, 16), max_delay)
        if on_retry is not None:
            on_retry(failure, delay)
        with contextlib.suppress(Exception):
            await heartbeat()
        await asyncio.sleep(delay)
        try:
            return await attempt()
        except Exception as exc:
            failure = exc
    raise failure
