"""How a service publishes the effects of a fetched batch, after its one commit: every message in order,
each PubAck awaited before the next message goes out.

* ``Outgoing``: one message to publish on a stream with a ``Nats-Msg-Id`` (JetStream drops a copy with the
  same id inside the stream's duplicate window: a replay after a crash is harmless), and the trace context
  it belongs to (the consumer span of the message that caused it), so that its ``send`` span stays in the
  request's trace although it is sent after that consumer span ended;
* ``jetstream_publish_many``: sends them in list order on one connection, each message only after the
  previous one's PubAck, and returns once every PubAck arrived; the first failure (error PubAck, no
  stream, timeout) is raised, so the caller acks nothing. Not a PubAck window: with several messages in
  flight, one lost in a stream-leader change could be re-sent after a later one was stored, and a
  department's stream would hold one request's notifications out of order (tests/integration/test_cluster.py
  found it);
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
    """``PublishMany`` on nats-py, in order (one PubAck at a time): ``jetstream()`` returns the connected context.

    When it is not a nats-py ``JetStreamContext`` (FastStream's in-memory ``TestNatsBroker``), every message goes
    goes through ``fallback`` (e.g. ``sequential_publish_many(publish)``)."""

    async def publish_many(items: Sequence[Outgoing]) -> None:
        if not items:
            return
        js = jetstream()
        if not isinstance(js, JetStreamContext):
            await fallback(items)
            return
        futures: list[asyncio.Future[Any]] = []
        try:
            for item in items:
                with (
                    telemetry.within(item.context),
                    telemetry.send_span(tracer, item.subject, item.body, item.all_headers()) as headers,
                ):
                    future = await js.publish_async(
                        item.subject, item.body, wait_stall=timeout, stream=item.stream, headers=headers
                    )
                    futures.append(future)
                # In order: the next message goes out only once this one is stored (see the module doc).
                await asyncio.wait_for(future, timeout=timeout)
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()  # frees its slot in the publish_async window

    return publish_many
