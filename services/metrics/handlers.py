"""Metrics' message handling: canonical event in -> checks -> stored once (the request's facts recomputed
in the same transaction) -> acked.

Delivery rules:

* a message is acked only after its event is committed (or found already stored: a redelivery
  or a re-publication is a no-op, decided inside the same transaction as the insert);
* a message that can never be projected (not JSON, not a valid event, not canonical, its
  subject does not match, or its sequence is taken by another event) is dead-lettered on
  ``baton.dlq.metrics.<code>`` and acked: it never loops;
* an unexpected error (database down, DLQ publish refused) naks the message and the rest of
  its batch with an exponential delay (``retry_delay`` doubled per delivery, capped at 30 s);
  on its last allowed delivery (the consumer's ``max_deliver``) it is dead-lettered and terminated.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, cast

import nats.errors
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsMessage, NatsRouter, PullSub
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace
from sqlalchemy.exc import InterfaceError, OperationalError

from libs.contracts import EVENT_MODELS, DeadLetter, dumps
from libs.contracts import tracing as telemetry
from libs.contracts.dlq import TERM_DEAD_LETTERED, term_with_reason, wait_out_transient
from libs.contracts.envelope import ID_RE
from libs.contracts.failpoint import Failpoint
from libs.contracts.notifications import FieldError, Role
from libs.contracts.publishing import Outgoing, PublishMany, sequential_publish_many
from libs.contracts.subjects import (
    CONSUMER_METRICS,
    EVENTS_PREFIX,
    SERVICE_CONSUMERS,
    STREAM_DLQ,
    STREAM_EVENTS,
    dlq_subject,
)

from . import db
from .domain import Canonical, Poison, check_canonical, parties
from .facts import RequestFacts

log = logging.getLogger("baton.metrics")
default_tracer = trace.get_tracer("baton.metrics")

SERVICE = "metrics"
#: Failures worth waiting out (the database or NATS briefly unreachable): never dead-lettered.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    TimeoutError,
    ConnectionError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
)
MAX_RETRY_DELAY = 30.0


class Publish(Protocol):
    """Publish ``body`` to ``subject`` on ``stream`` with ``Nats-Msg-Id``; returns once the PubAck arrived."""

    def __call__(self, subject: str, body: bytes, *, msg_id: str, stream: str) -> Awaitable[None]: ...


class Outcome(StrEnum):
    PROJECTED = "projected"
    DUPLICATE = "duplicate"
    DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True)
class Inbound:
    """The parts of a JetStream message metrics needs (kept broker-agnostic for tests)."""

    subject: str
    data: bytes
    headers: dict[str, str]
    stream_sequence: int
    num_delivered: int


def _ignore(_type: str, _outcome: Outcome) -> None:
    return None


async def _ignore_facts(_before: RequestFacts | None, _after: RequestFacts) -> None:
    return None


#: Opens the consumer span of one message (a context manager), e.g. ``telemetry.process_span``.
SpanFactory = Callable[[Inbound], AbstractContextManager[Any]]


def _no_span(_msg: Inbound) -> AbstractContextManager[Any]:
    return nullcontext()


#: Called after a request's facts changed (committed), e.g. to update Prometheus' business metrics.
FactsObserver = Callable[[RequestFacts | None, RequestFacts], Awaitable[None]]


class MetricsProcessor:
    def __init__(
        self,
        database: db.Database,
        publish: Publish,
        *,
        observe: Callable[[str, Outcome], None] = _ignore,
        on_facts: FactsObserver = _ignore_facts,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        publish_many: PublishMany | None = None,
        on_batch: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``observe(event_type, outcome)`` is called once per processed message (for Prometheus);
        ``on_facts(before, after)`` once per committed change of a request's facts (a batch with several
        events of one request reports one change: the facts before the batch and after it);
        ``publish_many`` sends a batch's dead letters in waves (publishing.py) (default: ``publish`` one by one)."""
        self.db = database
        self._publish = publish
        self.publish_many = publish_many or sequential_publish_many(publish)
        self.observe = observe
        self.on_facts = on_facts
        self.on_batch = on_batch  # once per batch, after its on_facts calls (e.g. a recount they made stale)
        self.clock = clock

    @property
    def publish(self) -> Publish:
        return self._publish

    @publish.setter
    def publish(self, publish: Publish) -> None:
        """Replacing ``publish`` (a test's spy, a fault) routes every publish through it, batches included."""
        self._publish = publish
        self.publish_many = sequential_publish_many(publish)

    async def process(self, msg: Inbound) -> Outcome:
        """One message in its own transaction (the fallback when a batch could not be stored at once)."""
        return (await self.process_batch([msg], _no_span))[0]

    async def process_batch(self, msgs: Sequence[Inbound], span: SpanFactory) -> list[Outcome]:
        """Every message of a fetched batch in one transaction, committed once: each event stored (or found
        stored), then the facts of each request it touched recomputed once, from all of its stored events.
        After the commit: ``on_facts`` once per changed request, then the dead letters published (PubAcks
        awaited together). Returns one outcome per message, in order; the caller acks only after this returned.

        Any exception rolls the whole transaction back and is raised: the caller then handles the batch one
        message at a time, which isolates a poison message. ``span(msg)`` opens the consumer span of a message.
        """
        letters: list[Outgoing] = []
        observed: list[tuple[str, Outcome]] = []
        now = self.clock()
        async with self.db.transaction() as session:
            checked: list[Canonical | Poison] = []
            for msg in msgs:
                with span(msg):
                    checked.append(check_canonical(msg.subject, msg.data))
            valid = [(msg, c) for msg, c in zip(msgs, checked, strict=True) if not isinstance(c, Poison)]
            # Two replicas storing two events of one request at once would each recompute the facts without
            # the other's event: one request's transactions take turns (PostgreSQL: advisory locks, taken in
            # one order; SQLite: its write lock).
            for request_id in sorted({c.event.request_id for _m, c in valid}):
                await db.lock_request(session, request_id)
            rows = [db.event_values(c, m.data.decode("utf-8", "replace"), m.stream_sequence, now) for m, c in valid]
            stored = iter(await db.insert_events(session, rows))
            touched: dict[str, None] = {}  # request ids with a new event, in first-seen order
            new_parties: list[tuple[str, str, Role]] = []
            outcomes: list[Outcome] = []
            for msg, result in zip(msgs, checked, strict=True):
                outcome, letter, kind = self._outcome(
                    msg, result, next(stored) if isinstance(result, Canonical) else None
                )
                if outcome is Outcome.PROJECTED and isinstance(result, Canonical):
                    touched[result.event.request_id] = None
                    new_parties.extend((result.event.request_id, d, r) for d, r in parties(result.event))
                outcomes.append(outcome)
                observed.append((kind, outcome))
                if letter is not None:
                    letters.append(letter)
            await db.add_parties_many(session, new_parties)
            changed = await db.refresh_facts_many(session, list(touched))
        for _m, c in valid:
            failpoint(c.event.request_id)  # test-only
        for before, after in changed:
            await self.on_facts(before, after)
        if changed and self.on_batch is not None:
            await self.on_batch()
        await self.publish_many(letters)
        for kind, outcome in observed:
            self.observe(kind, outcome)
        return outcomes

    def _outcome(
        self, msg: Inbound, checked: Canonical | Poison, stored: db.Stored | None
    ) -> tuple[Outcome, Outgoing | None, str]:
        """One message's outcome once the batch was stored: (outcome, dead letter to publish, event type label)."""
        if isinstance(checked, Poison):
            letter = self._letter(msg, checked.code, checked.message, list(checked.errors), checked.event_id)
            return Outcome.DEAD_LETTERED, letter, _subject_type(msg.subject)
        event = checked.event
        if stored is db.Stored.INSERTED:
            return Outcome.PROJECTED, None, event.type
        if stored is db.Stored.CONFLICT:
            message = (
                f"event {event.event_id} (request {event.request_id}, sequence {checked.sequence}) conflicts with "
                "a stored event: the event_id or the sequence is already taken"
            )
            log.warning("%s", message)
            return (
                Outcome.DEAD_LETTERED,
                self._letter(msg, "sequence_conflict", message, [], event.event_id),
                event.type,
            )
        return Outcome.DUPLICATE, None, event.type

    async def dead_letter_poison(self, msg: Inbound, error: BaseException) -> None:
        """Called on a message's last allowed delivery when processing keeps failing."""
        await self.publish_many(
            [self._letter(msg, "processing_failed", f"{type(error).__name__}: {error}"[:1000], [], None)]
        )

    def _letter(
        self, msg: Inbound, code: str, message: str, errors: list[FieldError], event_id: str | None
    ) -> Outgoing:
        log.info("dead-lettering %s (%s): %s", msg.subject[:128], code, message[:300])
        letter = DeadLetter(
            dead_letter_id=f"dlq-{SERVICE}-{msg.stream_sequence}",
            service=SERVICE,
            code=code,
            message=message,
            errors=errors,
            original_subject=msg.subject[:256],
            original_stream_sequence=msg.stream_sequence,
            original_headers={k: v for k, v in msg.headers.items() if len(k) < 100 and len(v) < 1000},
            payload=base64.b64encode(msg.data).decode(),
            event_id=event_id if event_id and ID_RE.fullmatch(event_id) else None,
            dead_lettered_at=self.clock(),
        )
        return Outgoing(
            dlq_subject(SERVICE, code), dumps(letter), letter.dead_letter_id, STREAM_DLQ, otel_context.get_current()
        )


def _subject_type(subject: str) -> str:
    """The type token of ``baton.events.<request_id>.<type>`` for metric labels ('unknown' otherwise)."""
    parts = subject.split(".")
    return parts[3] if len(parts) == 4 and parts[3] in EVENT_MODELS else "unknown"


# --- FastStream wiring: the one subscription metrics has ---------------------------------


def build_router(
    processor: MetricsProcessor,
    *,
    batch_size: int,
    fetch_timeout: float,
    retry_delay: float,
    tracer: trace.Tracer | None = None,
    inbox_prefix: bytes = b"_INBOX.",  # the service's own (docs/security.md)
) -> NatsRouter:
    """Metrics' only subscription: the durable ``metrics`` consumer on ``BATON_EVENTS`` (provisioned by Baton).

    A batch subscriber keeps the stream order (FastStream's single-message pull subscriber
    handles a fetched batch concurrently); every message is acked or naked on its own.
    """
    router = NatsRouter()
    spec = next(c for c in SERVICE_CONSUMERS if c.durable == CONSUMER_METRICS)
    span_tracer = tracer or default_tracer

    def span_for(inbound: Inbound) -> AbstractContextManager[Any]:
        # A child of intake's span that appended the event (its traceparent is in the headers).
        span: AbstractContextManager[Any] = telemetry.process_span(
            span_tracer,
            stream=STREAM_EVENTS,
            subject=inbound.subject,
            data=inbound.data,
            parent=telemetry.extract(inbound.headers),
            consumer=CONSUMER_METRICS,
        )
        return span

    @router.subscriber(
        f"{EVENTS_PREFIX}.>",
        stream=JStream(STREAM_EVENTS, declare=False),
        durable=CONSUMER_METRICS,
        pull_sub=PullSub(batch_size=batch_size, timeout=fetch_timeout, batch=True),
        inbox_prefix=inbox_prefix,
        ack_policy=AckPolicy.MANUAL,
        decoder=raw_batch,
        title="metrics:events",
        description="The canonical event log (baton.events.<request_id>.<type>), projected into timelines.",
    )
    async def on_events(body: list[bytes], msg: NatsMessage) -> None:
        raws: list[Msg] = cast("list[Msg]", msg.raw_message)
        inbounds = [to_inbound(raw) for raw in raws]
        # Several messages: one transaction, the dead letters published in waves (publishing.py), then the acks
        # (a batch of one goes straight to the per-message path below).
        if len(raws) > 1:
            try:
                await processor.process_batch(inbounds, span_for)
            except Exception:
                log.warning("batch of %d messages failed; handling them one at a time", len(raws), exc_info=True)
            else:
                for raw in raws:
                    await raw.ack()
                return

        # Fallback: one transaction per message, so that a poison message is isolated (dead-lettered) and
        # the others still commit; a failure naks the rest of the batch, keeping the order, except a message on
        # its last delivery: naked, it would never come back (JetStream's max-deliveries), so it is handled here.
        backing_off: float | None = None
        for index, raw in enumerate(raws):
            inbound = inbounds[index]
            last = 0 < spec.max_deliver <= inbound.num_delivered
            if backing_off is not None and not last:
                await raw.nak(delay=backing_off)
                continue
            try:
                with span_for(inbound):
                    await processor.process(inbound)
            except Exception as exc:
                if last:
                    try:  # a transient failure is waited out here: an outage never dead-letters
                        await wait_out_transient(
                            lambda: processor.process(inbound),  # noqa: B023 (awaited within this iteration)
                            exc,
                            TRANSIENT_ERRORS,
                            heartbeat=raw.in_progress,
                            base_delay=retry_delay,
                        )
                    except Exception as final:
                        log.exception("giving up on %s after %d deliveries", raw.subject[:128], inbound.num_delivered)
                        await processor.dead_letter_poison(inbound, final)
                        await term_with_reason(raw, TERM_DEAD_LETTERED)
                        continue
                    await raw.ack()
                    continue
                delay = backoff_delay(retry_delay, inbound.num_delivered)
                log.exception("processing %s failed; redelivering in %.1fs", raw.subject[:128], delay)
                # Keep the order: this message and everything after it in the batch come back later.
                await raw.nak(delay=delay)
                backing_off = delay
                continue
            await raw.ack()

    return router


def backoff_delay(base: float, num_delivered: int, cap: float = MAX_RETRY_DELAY) -> float:
    """Exponential redelivery delay: base, 2*base, 4*base, ... capped (a database outage is waited out)."""
    return float(min(base * 2 ** max(num_delivered - 1, 0), cap))


async def raw_batch(msg: NatsMessage) -> list[bytes]:
    """Hand the handler raw bytes: metrics parses and explains bad JSON itself."""
    return [m.data for m in cast("list[Msg]", msg.raw_message)]


def to_inbound(raw: Msg) -> Inbound:
    meta = raw.metadata
    return Inbound(
        subject=raw.subject,
        data=raw.data or b"",
        headers=dict(raw.headers or {}),
        stream_sequence=meta.sequence.stream,
        num_delivered=meta.num_delivered,
    )


# --- test-only fault injection (tests/faults) ----------------------------------------------------
#: Called right after the commit, before the publishes and the ack (libs/contracts/failpoint.py).
failpoint = Failpoint("BATON_METRICS_FAILPOINT", log)
