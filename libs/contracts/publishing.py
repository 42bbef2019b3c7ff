"""How a service publishes the effects of a fetched batch, after its one commit: every request's messages in
order, each one only after the PubAck of the request's previous one.

* ``Outgoing``: one message to publish on a stream with a ``Nats-Msg-Id`` (JetStream drops a copy with the
  same id inside the stream's duplicate window: a replay after a crash is harmless), and the trace context
  it belongs to (the consumer span of the message that caused it), so that its ``send`` span stays in the
  request's trace although it is sent after that consumer span ended;
* ``jetstream_publish_many``: sends them on one connection in **waves** (``waves``): the first message of
  every ordering key (``Outgoing.order_key``, the request id), then, once all of their PubAcks arrived, the
  second of every key, and so on. It returns once every PubAck arrived; the first failure (error PubAck, no
  stream, timeout) is raised, so the caller acks nothing. Messages of one key are never in flight together:
  with two of them in flight, one lost in a stream-leader change could be re-sent after a later one was
  stored, and a department's stream would hold one request's notifications out of order
  (tests/integration/test_cluster.py found it with a plain PubAck window). Messages of different requests
  carry no order among themselves, so a batch of 30 requests' effects costs one round trip per wave instead
  of one per message;
* ``sequential_publish_many``: the same contract on top of a one-at-a-time ``publish`` (tests, fallbacks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.context import Context

from libs.contracts import tracing as telemetry


@dataclass(frozen=True)
class Outgoing:
    subject: str
    body: bytes
    msg_id: str
    stream: str
    context: Context | None = None
    #: Extra headers (e.g. ``Nats-Schedule*`` of an SLA timer); ``Nats-Msg-Id`` is added when ``msg_id`` is set.
    headers: Mapping[str, str] | None = None
    #: Messages with the same key are stored in list order, one in flight at a time; messages with different
    #: keys may be in flight together. The request id; a timer schedule's subject (one per clock and kind, and
    #: each replaces the previous one on its subject); empty (dead letters) is one key of its own.
    order_key: str = ""

    def all_headers(self) -> dict[str, str]:
        out = dict(self.headers or {})
        if self.msg_id:
            out["Nats-Msg-Id"] = self.msg_id
        return out


class PublishOne(Protocol):
    def __call__(self, subject: str, body: bytes, *, msg_id: str, stream: str) -> Awaitable[None]: ...


#: Publish every message in order; return once each one is confirmed by a PubAck (raise otherwise).
PublishMany = Callable[[Sequence[Outgoing]], Awaitable[None]]


def dedupe(items: Sequence[Outgoing]) -> list[Outgoing]:
    """Keep the first occurrence of each ``msg_id`` (a batch can name an unpublished row twice)."""
    seen: set[str] = set()
    out: list[Outgoing] = []
    for item in items:
        if not item.msg_id or item.msg_id not in seen:
            seen.add(item.msg_id)
            out.append(item)
    return out


def waves(items: Sequence[Outgoing]) -> list[list[Outgoing]]:
    """Split ``items`` into waves: wave *n* holds the *n*-th message of every ``order_key``, keys in the order of
    their first message. Publishing wave after wave keeps each key's list order with one message in flight."""
    chains: dict[str, list[Outgoing]] = {}
    for item in items:
        chains.setdefault(item.order_key, []).append(item)
    depth = max((len(chain) for chain in chains.values()), default=0)
    return [[chain[i] for chain in chains.values() if i < len(chain)] for i in range(depth)]


def sequential_publish_many(publish: PublishOne) -> PublishMany:
    """``PublishMany`` over a publish that waits for its own PubAck (one round trip per message)."""

    async def publish_many(items: Sequence[Outgoing]) -> None:
        for item in items:
            with telemetry.within(item.context):
                await publish(item.subject, item.body, msg_id=item.msg_id, stream=item.stream)

    return publish_many


def jetstream_publish_many(
    jetstream: Callable[[], Any], tracer: trace.Tracer, fallback: PublishMany, *, timeout: float = 10.0
) -> PublishMany:
    """``PublishMany`` on nats-py, in waves (see ``waves``): ``jetstream()`` returns the connected context.

    When it is not a nats-py ``JetStreamContext`` (FastStream's in-memory ``TestNatsBroker``), every message goes
    through ``fallback`` (e.g. ``sequential_publish_many(publish)``)."""

    async def send(js: JetStreamContext, item: Outgoing) -> None:
        with (
            telemetry.within(item.context),
            telemetry.send_span(tracer, item.subject, item.body, item.all_headers()) as headers,
        ):
            await js.publish(item.subject, item.body, timeout=timeout, stream=item.stream, headers=headers)

    async def publish_many(items: Sequence[Outgoing]) -> None:
        if not items:
            return
        js = jetstream()
        if not isinstance(js, JetStreamContext):
            await fallback(items)
            return
        for wave in waves(items):
            # The next wave goes out only once this one is stored (see the module doc). The messages of a wave
            # are written in list order; each one's own PubAck is awaited by ``JetStreamContext.publish``, which
            # raises an error PubAck at once (``publish_async`` would leave its future pending until the timeout:
            # nats.py issue #985). The first failure in list order is raised, after the whole wave settled.
            if len(wave) == 1:
                await send(js, wave[0])
                continue
            results = await asyncio.gather(*(send(js, item) for item in wave), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    return publish_many
