"""Routing's message handling: canonical ``created`` in -> routing decision -> ``routed`` out (via intake).

Delivery rules (nothing lost, nothing twice):

* for a ``created`` event, the processed event_id and the decision, with the exact ``routed``
  JSON, are committed in one transaction; then those stored bytes are published to
  ``baton.svc.routing.routed`` (stream ``BATON_IN``, ``Nats-Msg-Id`` = the routed event_id);
  then the canonical message is acked;
* a redelivered (already processed) event republishes the *stored* bytes, never a regenerated
  event: intake would refuse a different payload under the same event_id;
* other canonical event types are acked and ignored;
* a body that is not a valid event is poison: dead-lettered and acked, never retried;
* an unexpected error (database, NATS timeout) naks the message, and the rest of its batch,
  with an exponential delay (``retry_delay`` doubled per delivery, capped at 30 s, so an outage
  is waited out); on the consumer's last allowed delivery it is dead-lettered with the reason
  instead of being dropped.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol, cast

import orjson
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsMessage, NatsRouter, PullSub
from nats.aio.msg import Msg
from opentelemetry import propagate, trace
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from libs.contracts import Catalog, Created, DeadLetter, dumps, error_list, parse_event
from libs.contracts.envelope import ID_RE
from libs.contracts.notifications import FieldError
from libs.contracts.subjects import (
    CONSUMER_ROUTING,
    EVENTS_PREFIX,
    SERVICE_CONSUMERS,
    STREAM_DLQ,
    STREAM_EVENTS,
    STREAM_IN,
    dlq_subject,
    event_subject,
    service_subject,
)

from . import db
from .domain import build_routed, decide

log = logging.getLogger("baton.routing")
default_tracer = trace.get_tracer("baton.routing")

SERVICE = "routing"
ROUTED_SUBJECT = service_subject(SERVICE, "routed")
MAX_RETRY_DELAY = 30.0


class Publish(Protocol):
    """Publish ``body`` to ``subject`` on ``stream`` with ``Nats-Msg-Id``; returns once the PubAck arrived."""

    def __call__(self, subject: str, body: bytes, *, msg_id: str, stream: str) -> Awaitable[None]: ...


class Outcome(StrEnum):
    ROUTED = "routed"  # a new decision, published
    REPUBLISHED = "republished"  # already decided: the stored routed event published again
    IGNORED = "ignored"  # not an event routing acts on
    DEAD_LETTERED = "dead_lettered"  # poison: not a valid canonical event


@dataclass(frozen=True)
class Inbound:
    """The parts of a JetStream message routing needs (kept broker-agnostic for tests)."""

    subject: str
    data: bytes
    headers: dict[str, str]
    stream_sequence: int
    num_delivered: int


@dataclass
class DeliveryLimit:
    """The delivery on which a failing message is dead-lettered instead of naked again.

    Starts from the consumer spec; the app replaces it at startup with the provisioned
    consumer's ``max_deliver`` (the server decides when redelivery stops). ``-1``: never.
    """

    max_deliver: int = next(c.max_deliver for c in SERVICE_CONSUMERS if c.durable == CONSUMER_ROUTING)

    def is_last(self, num_delivered: int) -> bool:
        return 0 < self.max_deliver <= num_delivered


class RoutingMetrics:
    """Routing's own Prometheus counters (FastStream's middleware counts messages and latency)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "baton_routing_messages",
            "Canonical events handled by routing, by outcome: routed, republished, ignored, dead_lettered, "
            "retried (naked for redelivery), gave_up (dead-lettered after the last delivery), lost.",
            ["outcome"],
            registry=registry,
        )
        self.decisions = Counter(
            "baton_routing_decisions",
            "New routing decisions, by provider department and rule kind (explicit-provider, category, fallback).",
            ["provider_department", "rule"],
            registry=registry,
        )


class RoutingProcessor:
    def __init__(
        self,
        database: db.Database,
        catalog: Catalog,
        publish: Publish,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: RoutingMetrics | None = None,
    ) -> None:
        self.db = database
        self.catalog = catalog
        self.publish = publish
        self.clock = clock
        self.metrics = metrics

    async def process(self, msg: Inbound) -> Outcome:
        try:
            event = parse_event(msg.data)
        except ValidationError as exc:
            errors = error_list(exc)
            code = "malformed_json" if any(e.code == "json_invalid" for e in errors) else "validation_failed"
            summary = "; ".join(f"{'.'.join(map(str, e.loc)) or '(root)'}: {e.message}" for e in errors[:5])
            await self._dead_letter(msg, code, f"not a valid canonical event: {summary}"[:1000], errors)
            return Outcome.DEAD_LETTERED
        expected = event_subject(event.request_id, event.type)
        if msg.subject != expected:
            await self._dead_letter(
                msg, "subject_mismatch", f"event belongs on {expected}, not {msg.subject[:256]}", []
            )
            return Outcome.DEAD_LETTERED
        if not isinstance(event, Created):
            return Outcome.IGNORED

        row, fresh = await self._record(event)
        # Published after the commit; on a crash here, redelivery finds the row and publishes it again.
        await self.publish(ROUTED_SUBJECT, row.routed.encode(), msg_id=row.event_id, stream=STREAM_IN)
        if fresh:
            log.info("routed %s to %s (%s)", event.request_id, row.provider_department, row.rule)
            if self.metrics is not None:
                self.metrics.decisions.labels(row.provider_department, row.rule.split(":", 1)[0]).inc()
        return Outcome.ROUTED if fresh else Outcome.REPUBLISHED

    async def _record(self, created: Created) -> tuple[db.DecisionRow, bool]:
        """The decision for ``created``: ``(row, True)`` when made and committed now, ``(row, False)`` if stored."""
        for attempt in range(2):
            try:
                async with self.db.transaction() as session:
                    if await db.is_processed(session, created.event_id):
                        stored = await db.decision_for(session, created.event_id)
                        if stored is None:
                            raise RuntimeError(f"event {created.event_id} is processed but has no routing decision")
                        return stored, False
                    decision = decide(self.catalog, created)
                    routed = build_routed(created, decision, self.clock())
                    row = db.DecisionRow(
                        event_id=routed.event_id,
                        caused_by=created.event_id,
                        request_id=created.request_id,
                        provider_department=decision.provider_department,
                        rule=decision.rule,
                        reason=decision.reason,
                        accept_by=decision.accept_by,
                        resolve_by=decision.resolve_by,
                        routed=dumps(routed).decode(),
                        decided_at=routed.occurred_at,
                    )
                    session.add(
                        db.ProcessedEventRow(
                            event_id=created.event_id,
                            request_id=created.request_id,
                            event_type=created.type,
                            processed_at=routed.occurred_at,
                        )
                    )
                    session.add(row)
                return row, True
            except IntegrityError:
                # Another routing replica recorded this event first: read its decision.
                if attempt:
                    raise
                log.info("event %s recorded concurrently; reading the stored decision", created.event_id)
        raise AssertionError("unreachable")  # pragma: no cover

    async def dead_letter_poison(self, msg: Inbound, error: BaseException) -> None:
        """Called on a message's last allowed delivery when processing keeps failing."""
        await self._dead_letter(msg, "processing_failed", f"{type(error).__name__}: {error}"[:1000], [])

    async def _dead_letter(self, msg: Inbound, code: str, message: str, errors: list[FieldError]) -> None:
        log.warning("dead-lettering %s (%s): %s", msg.subject[:128], code, message[:200])
        letter = DeadLetter(
            dead_letter_id=f"dlq-routing-{msg.stream_sequence}",
            service=SERVICE,
            code=code,
            message=message,
            errors=errors,
            original_subject=msg.subject[:256],
            original_stream_sequence=msg.stream_sequence,
            original_headers={k: v for k, v in msg.headers.items() if len(k) < 100 and len(v) < 1000},
            payload=base64.b64encode(msg.data).decode(),
            event_id=_event_id_of(msg.data),
            dead_lettered_at=self.clock(),
        )
        await self.publish(dlq_subject(SERVICE, code), dumps(letter), msg_id=letter.dead_letter_id, stream=STREAM_DLQ)


def _event_id_of(data: bytes) -> str | None:
    """The ``event_id`` of a rejected body, when it is a JSON object carrying a valid one."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    value = doc.get("event_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and ID_RE.fullmatch(value) else None


# --- FastStream wiring: the one subscription routing has --------------------------------


def build_router(
    processor: RoutingProcessor,
    *,
    batch_size: int,
    fetch_timeout: float,
    retry_delay: float,
    metrics: RoutingMetrics | None = None,
    tracer: trace.Tracer | None = None,
    limit: DeliveryLimit | None = None,
) -> NatsRouter:
    """Routing's only subscription: the durable ``routing`` consumer on ``BATON_EVENTS`` (provisioned by Baton).

    A batch subscriber keeps the stream order (FastStream's single-message pull subscriber
    handles a fetched batch concurrently); every message is acked or naked on its own.
    Each message is processed in a consumer span continuing the trace its headers carry
    (``tracer``: from the service's own provider, else the global one).
    """
    router = NatsRouter()
    limit = limit or DeliveryLimit()
    span_tracer = tracer or default_tracer

    def count(outcome: str) -> None:
        if metrics is not None:
            metrics.messages.labels(outcome).inc()

    @router.subscriber(
        f"{EVENTS_PREFIX}.>",
        stream=JStream(STREAM_EVENTS, declare=False),
        durable=CONSUMER_ROUTING,
        pull_sub=PullSub(batch_size=batch_size, timeout=fetch_timeout, batch=True),
        ack_policy=AckPolicy.MANUAL,
        decoder=raw_batch,
        title="routing:events",
        description="The canonical event log (baton.events.<request_id>.<type>); routing acts on 'created'.",
    )
    async def on_event(body: list[bytes], msg: NatsMessage) -> None:
        raws: list[Msg] = cast("list[Msg]", msg.raw_message)
        for index, raw in enumerate(raws):
            inbound = to_inbound(raw)
            try:
                with span_tracer.start_as_current_span(
                    f"{STREAM_EVENTS} process",
                    context=propagate.extract(inbound.headers),
                    kind=trace.SpanKind.CONSUMER,
                    attributes={
                        "messaging.system": "nats",
                        "messaging.operation.type": "process",
                        "messaging.destination.name": raw.subject[:256],
                        "messaging.consumer.group.name": CONSUMER_ROUTING,
                    },
                ):
                    outcome = await processor.process(inbound)
            except Exception as exc:
                if limit.is_last(inbound.num_delivered):
                    log.exception("giving up on %s after %d deliveries", raw.subject[:128], inbound.num_delivered)
                    try:
                        await processor.dead_letter_poison(inbound, exc)
                    except Exception:
                        # Nothing more can be done for this one (no delivery left): it stays unacked, logged here.
                        log.exception("dead-lettering %s failed; the message is lost", raw.subject[:128])
                        for later in raws[index + 1 :]:
                            await later.nak(delay=retry_delay)
                        count("lost")
                        return
                    await raw.term()
                    count("gave_up")
                    continue
                delay = backoff_delay(retry_delay, inbound.num_delivered)
                log.exception("processing %s failed; redelivering in %.1fs", raw.subject[:128], delay)
                # Keep the order: this message and everything after it in the batch come back later.
                for later in raws[index:]:
                    await later.nak(delay=delay)
                count("retried")
                return
            await raw.ack()
            count(outcome.value)

    return router


def backoff_delay(base: float, num_delivered: int, cap: float = MAX_RETRY_DELAY) -> float:
    """Exponential redelivery delay: base, 2*base, 4*base, ... capped (a database outage is waited out)."""
    return float(min(base * 2 ** max(num_delivered - 1, 0), cap))


async def raw_batch(msg: NatsMessage) -> list[bytes]:
    """Hand the handler raw bytes: routing validates (and dead-letters) bodies itself."""
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
