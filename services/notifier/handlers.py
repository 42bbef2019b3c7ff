"""Notifier's message handling: canonical event in -> projection + outbox (one transaction) -> notifications.

Delivery rules:

* a canonical event is acked only after the projection update, the processed-event record
  and every notification it causes are committed *and* each notification is confirmed by a
  PubAck on ``BATON_NOTIFY`` (``Nats-Msg-Id`` = notification_id);
* a crash between the commit and the PubAcks is repaired by redelivery: the event_id is
  found in ``processed_events`` and the stored notification bytes are published again,
  never re-rendered (JetStream drops the copies it already holds); rows whose PubAck was
  recorded are not sent again;
* an event that arrives before an earlier event of its request is naked with a short,
  growing delay; on its last allowed delivery it is dead-lettered (``sequence_gap``);
* an event that can never be applied (invalid JSON or contract, no sequence, wrong subject)
  is dead-lettered on ``baton.dlq.notifier.<code>`` and acked: it never loops;
* an unexpected error naks the message (and the rest of its batch, keeping the order) with
  ``retry_delay``; on its last allowed delivery it is dead-lettered instead of being dropped.

The same transaction also queues one webhook delivery per matching subscription of each
recipient (sent later by ``workers.WebhookWorker``, never awaited here), and holds back the
notifications a department chose to receive in a digest (published by ``workers.DigestWorker``).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, cast

import nats.errors
import orjson
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsMessage, NatsRouter, PullSub
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.contracts import DeadLetter, LifecycleEvent, dumps, error_list, parse_event
from libs.contracts import tracing as telemetry
from libs.contracts.database import PendingInserts
from libs.contracts.dlq import TERM_DEAD_LETTERED, term_with_reason, wait_out_transient
from libs.contracts.failpoint import Failpoint
from libs.contracts.notifications import FieldError
from libs.contracts.publishing import Outgoing, PublishMany, dedupe, sequential_publish_many
from libs.contracts.subjects import (
    CONSUMER_NOTIFIER,
    EVENTS_PREFIX,
    SERVICE_CONSUMERS,
    STREAM_DLQ,
    STREAM_EVENTS,
    STREAM_NOTIFY,
    dlq_subject,
    notify_subject,
)

from . import db
from .domain import Delivery, Directory, Order, Poison, Projection, check_event, gap_delay, order, plan

log = logging.getLogger("baton.notifier")
default_tracer = trace.get_tracer("baton.notifier")

SERVICE = "notifier"
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
#: The provisioned consumer this service reads (its max_deliver decides the last delivery).
CONSUMER_SPEC = next(c for c in SERVICE_CONSUMERS if c.stream == STREAM_EVENTS and c.durable == CONSUMER_NOTIFIER)


class Publish(Protocol):
    """Publish ``body`` to ``subject`` on ``stream`` with ``Nats-Msg-Id``; returns once the PubAck arrived."""

    def __call__(self, subject: str, body: bytes, *, msg_id: str, stream: str) -> Awaitable[None]: ...


class NotifierMetrics:
    """The notifier's own Prometheus counters (FastStream's middleware counts messages and latency)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "baton_notifier_messages",
            "Canonical events handled by the notifier, by outcome: applied, republished, waiting (arrived before "
            "an earlier event of its request; naked), dead_lettered, retried (naked after an error), gave_up "
            "(dead-lettered after the last delivery), lost.",
            ["outcome"],
            registry=registry,
        )
        self.notifications = Counter(
            "baton_notifier_notifications",
            "Notifications written to the outbox (each published at least once), by event type and recipient role.",
            ["type", "role"],
            registry=registry,
        )
        self.webhook_attempts = Counter(
            "baton_notifier_webhook_attempts",
            "Webhook POSTs by outcome: delivered, retrying (failed, another attempt follows), dead (dead-lettered).",
            ["outcome"],
            registry=registry,
        )


class Outcome(StrEnum):
    APPLIED = "applied"  # projection moved, notifications published
    REPUBLISHED = "republished"  # already applied: stored notifications published again
    WAITING = "waiting"  # an earlier event of the request is missing: nak with ``retry_in``
    DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    retry_in: float | None = None
    published: int = 0


@dataclass(frozen=True)
class Inbound:
    """The parts of a JetStream message the notifier needs (kept broker-agnostic for tests)."""

    subject: str
    data: bytes
    headers: dict[str, str]
    stream_sequence: int
    num_delivered: int


@dataclass(frozen=True)
class _Pending:
    """An outbox row to publish (a plain copy, usable after the session closed)."""

    notification_id: str
    subject: str
    body: bytes


@dataclass(frozen=True)
class _Gap:
    last_sequence: int


@dataclass(frozen=True)
class _Applied:
    """An event applied (or found applied: ``replay``): the notifications to publish."""

    pending: list[_Pending]
    replay: bool
    counted: list[tuple[str, str]] = field(default_factory=list)
    queued: int = 0


@dataclass(frozen=True)
class _Decided:
    """One message's outcome inside a transaction, and what to do once it committed."""

    result: Result
    outgoing: list[Outgoing] = field(default_factory=list)
    notification_ids: list[str] = field(default_factory=list)
    counted: list[tuple[str, str]] = field(default_factory=list)
    queued: int = 0
    request_id: str | None = None  # of an event applied or found applied (its notifications are published)


class _BatchCache:
    """What applying a batch needs, read with one query per table instead of several queries per event.

    The projections are kept here while the batch's events are applied in order and written once per request
    by :meth:`save`, each guarded by the sequence it was read at (as :func:`db.save_projection` does).
    """

    def __init__(
        self,
        processed: set[str],
        rows: dict[str, db.ProjectionRow],
        unpublished: dict[str, list[db.OutboxRow]],
        prefs: dict[str, db.PreferenceRow],
        hooks: list[db.WebhookRow],
    ) -> None:
        self.processed = processed
        self.rows = rows
        self.current: dict[str, Projection] = {rid: row.to_projection() for rid, row in rows.items()}
        self.changed: dict[str, datetime] = {}
        self.unpublished = unpublished
        self.prefs = prefs
        self.hooks = hooks
        self.writes = PendingInserts()  # the batch's new rows, inserted by ``save``

    @classmethod
    async def read(cls, session: AsyncSession, msgs: Sequence[Inbound], *, for_update: bool) -> _BatchCache:
        event_ids: set[str] = set()
        request_ids: set[str] = set()
        for msg in msgs:
            try:
                doc = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                if isinstance(doc.get("event_id"), str):
                    event_ids.add(doc["event_id"])
                if isinstance(doc.get("request_id"), str):
                    request_ids.add(doc["request_id"])
        return cls(
            await db.processed_among(session, event_ids),
            await db.load_projections(session, request_ids, for_update=for_update),
            await db.unpublished_of(session, request_ids),
            await db.all_preferences(session),
            await db.all_active_webhooks(session),
        )

    def projection(self, request_id: str) -> tuple[db.ProjectionRow | None, Projection | None]:
        return self.rows.get(request_id), self.current.get(request_id)

    def advance(self, request_id: str, projection: Projection, now: datetime) -> None:
        self.current[request_id] = projection
        self.changed[request_id] = now

    def unpublished_before(self, request_id: str, sequence: int) -> list[db.OutboxRow]:
        return [r for r in self.unpublished.get(request_id, []) if r.sequence < sequence]

    async def save(self, session: AsyncSession) -> None:
        await self.writes.write(session)
        await db.save_projections(
            session, [(self.rows.get(rid), self.current[rid], now) for rid, now in self.changed.items()]
        )


#: Opens the consumer span of one message (a context manager), e.g. ``telemetry.process_span``.
SpanFactory = Callable[[Inbound], AbstractContextManager[Any]]


class NotifierProcessor:
    def __init__(
        self,
        database: db.Database,
        publish: Publish,
        directory: Directory,
        *,
        max_deliver: int = CONSUMER_SPEC.max_deliver,
        gap_delay: float = 0.5,
        gap_max_delay: float = 30.0,
        metrics: NotifierMetrics | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_deliveries: Callable[[], None] | None = None,
        publish_many: PublishMany | None = None,
    ) -> None:
        """``publish_many`` sends a batch's effects in waves (publishing.py) (default: ``publish`` one by one)."""
        self.on_deliveries = on_deliveries
        self.db = database
        self._publish = publish
        self.publish_many = publish_many or sequential_publish_many(publish)
        self.directory = directory
        self.max_deliver = max_deliver
        self.gap_delay = gap_delay
        self.gap_max_delay = gap_max_delay
        self.metrics = metrics
        self.clock = clock

    @property
    def publish(self) -> Publish:
        return self._publish

    @publish.setter
    def publish(self, publish: Publish) -> None:
        """Replacing ``publish`` (a test's spy, a fault) routes every publish through it, batches included."""
        self._publish = publish
        self.publish_many = sequential_publish_many(publish)

    def is_last_delivery(self, msg: Inbound) -> bool:
        return self.max_deliver > 0 and msg.num_delivered >= self.max_deliver

    async def process(self, msg: Inbound) -> Result:
        """One message in its own transaction (the fallback when a batch could not be applied at once)."""
        for _attempt in range(5):
            try:
                async with self.db.transaction() as session:
                    decided = await self._decide(session, msg)
                break
            except (db.ConcurrentUpdate, IntegrityError):
                # Another notifier replica applied an event of this request first: re-read and decide again.
                log.info("concurrent update on %s, retrying", msg.subject[:128])
        else:
            raise RuntimeError(f"{msg.subject[:128]}: too many concurrent updates")
        if decided.request_id is not None:
            failpoint(decided.request_id)  # test-only
        self._after_commit(decided)
        await self._publish_effects(decided.outgoing, decided.notification_ids)
        return decided.result

    async def process_batch(self, msgs: Sequence[Inbound], span: SpanFactory) -> list[Result]:
        """Every message of a fetched batch in one transaction, committed once; then every effect published
        (notifications and dead letters, in order, PubAcks awaited together). Returns one result per message,
        in order; the caller acks only after this returned.

        Events of one request inside the batch are applied in stream order on the same session (each sees
        the projection the previous one left). Any exception rolls the whole transaction back and is raised:
        the caller then handles the batch one message at a time (:meth:`process`), which isolates a poison
        message. A failure after the commit (a PubAck) is repaired the same way: each event is then found
        processed and its stored notifications are published again (deduplicated by ``Nats-Msg-Id``).
        ``span(msg)`` opens the consumer span of a message; its sends stay children of that span.
        """
        decisions: list[_Decided] = []
        async with self.db.transaction() as session:
            cache = await _BatchCache.read(session, msgs, for_update=self.db.is_postgres)
            for msg in msgs:
                with span(msg):
                    decisions.append(await self._decide(session, msg, cache))
            await cache.save(session)
        for decided in decisions:
            if decided.request_id is not None:
                failpoint(decided.request_id)  # test-only
        outgoing: list[Outgoing] = []
        notification_ids: list[str] = []
        for decided in decisions:
            self._after_commit(decided)
            outgoing.extend(decided.outgoing)
            notification_ids.extend(decided.notification_ids)
        await self._publish_effects(outgoing, notification_ids)
        return [d.result for d in decisions]

    async def _decide(self, session: AsyncSession, msg: Inbound, cache: _BatchCache | None = None) -> _Decided:
        """What one message does, inside the caller's transaction: its writes, its result, what to publish."""
        context = otel_context.get_current()
        try:
            event = parse_event(msg.data)
        except ValidationError as exc:
            errors = error_list(exc)
            summary = "; ".join(f"{'.'.join(map(str, e.loc)) or '(root)'}: {e.message}" for e in errors[:5])
            letter = self._letter(msg, "invalid_event", f"invalid canonical event: {summary}"[:1000], errors)
            return _Decided(Result(Outcome.DEAD_LETTERED), [letter])
        poison = check_event(event, msg.subject)
        if poison is not None:
            return _Decided(Result(Outcome.DEAD_LETTERED), [self._letter(msg, poison.code, poison.message, [], event)])

        step = await self._apply(session, event, cache)
        if isinstance(step, Poison):
            return _Decided(Result(Outcome.DEAD_LETTERED), [self._letter(msg, step.code, step.message, [], event)])
        if isinstance(step, _Gap):
            return self._wait_for_gap(msg, event, step.last_sequence)
        outgoing = [
            Outgoing(p.subject, p.body, p.notification_id, STREAM_NOTIFY, context, order_key=event.request_id)
            for p in step.pending
        ]
        return _Decided(
            Result(Outcome.REPUBLISHED if step.replay else Outcome.APPLIED, published=len(step.pending)),
            outgoing,
            [p.notification_id for p in step.pending],
            step.counted,
            step.queued,
            request_id=event.request_id,
        )

    def _after_commit(self, decided: _Decided) -> None:
        if self.metrics is not None:
            for kind, role in decided.counted:
                self.metrics.notifications.labels(kind, role).inc()
        if decided.queued and self.on_deliveries is not None:
            self.on_deliveries()

    async def _apply(
        self, session: AsyncSession, event: LifecycleEvent, cache: _BatchCache | None = None
    ) -> _Applied | _Gap | Poison:
        """Find the event or apply it (in the caller's transaction); returns the notifications to publish.

        With ``cache`` (a batch), what the batch needs was read once for all of its events, the projections are
        written once per request at the end (:meth:`_BatchCache.save`), and nothing is flushed per event."""
        assert event.sequence is not None  # check_event
        if cache is not None:
            processed = event.event_id in cache.processed
        else:
            processed = await db.find_processed(session, event.event_id) is not None
        if processed:
            if cache is not None:  # applied earlier in this batch: its rows must be visible to the reads below
                await cache.writes.write(session)
            earlier = await db.unpublished_before(session, event.request_id, event.sequence)
            rows = [*earlier, *await db.event_outbox(session, event.event_id)]
            return _Applied([_pending(r) for r in rows if r.immediate and r.published_at is None], replay=True)

        if cache is not None:
            row, before = cache.projection(event.request_id)
        else:
            row = await db.load_projection(session, event.request_id, for_update=self.db.is_postgres)
            before = row.to_projection() if row is not None else None
        last = before.last_sequence if before is not None else 0
        decision = order(last, event.sequence)
        if decision is Order.GAP:
            return _Gap(last)
        if decision is Order.ALREADY_APPLIED:
            return Poison(
                "sequence_conflict",
                f"sequence {event.sequence} of request {event.request_id} was already applied "
                f"from another event than {event.event_id}",
            )

        now = self.clock()
        planned = plan(before, event, self.directory, now)
        if isinstance(planned, Poison):
            return planned
        if cache is not None:
            cache.advance(event.request_id, planned.projection, now)
            cache.processed.add(event.event_id)
        else:
            await db.save_projection(session, row, planned.projection, now)
        writes = cache.writes if cache is not None else PendingInserts()
        db.add_processed(
            writes,
            event_id=event.event_id,
            request_id=event.request_id,
            sequence=event.sequence,
            type=event.type,
            processed_at=now,
        )
        # An earlier event's notifications whose publish failed (its redelivery is pending) go out first,
        # so that every department's stream stays in sequence order; the copies are deduplicated. In a batch
        # these include the earlier events of the same request applied just before (published once).
        if cache is not None:
            earlier = cache.unpublished_before(event.request_id, event.sequence)
            prefs, hooks = cache.prefs, cache.hooks
        else:
            earlier = await db.unpublished_before(session, event.request_id, event.sequence)
            departments = [n.department for n in planned.notifications]
            prefs = await db.preferences(session, departments)
            hooks = await db.active_webhooks(session, departments)
        pending: list[_Pending] = [_pending(r) for r in earlier]
        traceparent = current_traceparent()
        counted: list[tuple[str, str]] = []
        queued = 0
        for position, notification in enumerate(planned.notifications):
            subject = notify_subject(notification.department, notification.type)
            body = dumps(notification)
            delivery = delivery_for(prefs.get(notification.department), notification.type)
            db.add_notification(
                writes,
                notification_id=notification.notification_id,
                event_id=event.event_id,
                request_id=event.request_id,
                sequence=event.sequence,
                position=position,
                department=notification.department,
                role=notification.role.value,
                type=notification.type,
                subject=subject,
                body=body.decode(),
                text=notification.text,
                created_at=now,
                delivery=delivery.value,
            )
            counted.append((notification.type, notification.role.value))
            if delivery is not Delivery.IMMEDIATE:
                continue  # held for the department's digest (workers.DigestWorker)
            pending.append(_Pending(notification.notification_id, subject, body))
            queued += db.queue_deliveries(
                session,
                hooks,
                department=notification.department,
                notification_id=notification.notification_id,
                kind=notification.type,
                request_id=notification.request_id,
                body=body.decode(),
                traceparent=traceparent,
                now=now,
            )
        if cache is None:
            await writes.write(session)
            await session.flush()
        return _Applied(pending, replay=False, counted=counted, queued=queued)

    async def _publish_effects(self, outgoing: list[Outgoing], notification_ids: list[str]) -> None:
        await self.publish_many(dedupe(outgoing))
        if notification_ids:
            # Only an optimisation: a crash before this line means the rows are sent again (and deduplicated).
            async with self.db.transaction() as session:
                await db.mark_published(session, sorted(set(notification_ids)), self.clock())

    def _wait_for_gap(self, msg: Inbound, event: LifecycleEvent, last: int) -> _Decided:
        expected = last + 1
        if self.is_last_delivery(msg):
            message = (
                f"request {event.request_id}: sequence {event.sequence} arrived but {expected} never did "
                f"({msg.num_delivered} deliveries)"
            )
            details = {"request_id": event.request_id, "sequence": event.sequence, "expected": expected}
            letter = self._letter(msg, "sequence_gap", message, [], event, details)
            return _Decided(Result(Outcome.DEAD_LETTERED), [letter])
        delay = gap_delay(msg.num_delivered, self.gap_delay, self.gap_max_delay)
        log.info(
            "request %s: %s (sequence %s) arrived before sequence %d; redelivering in %.1fs",
            event.request_id,
            event.type,
            event.sequence,
            expected,
            delay,
        )
        return _Decided(Result(Outcome.WAITING, retry_in=delay))

    async def dead_letter_poison(self, msg: Inbound, error: BaseException) -> None:
        """Called on a message's last allowed delivery when processing keeps failing."""
        letter = self._letter(msg, "processing_failed", f"{type(error).__name__}: {error}"[:1000], [])
        await self.publish_many([letter])

    def _letter(
        self,
        msg: Inbound,
        code: str,
        message: str,
        errors: list[FieldError],
        event: LifecycleEvent | None = None,
        details: dict[str, Any] | None = None,
    ) -> Outgoing:
        letter = DeadLetter(
            dead_letter_id=f"dlq-notifier-{msg.stream_sequence}",
            service=SERVICE,
            code=code,
            message=message,
            errors=errors,
            original_subject=msg.subject[:256],
            original_stream_sequence=msg.stream_sequence,
            original_headers={k: v for k, v in msg.headers.items() if len(k) < 100 and len(v) < 1000},
            payload=base64.b64encode(msg.data).decode(),
            event_id=event.event_id if event is not None else None,
            dead_lettered_at=self.clock(),
            details=details or {},
        )
        log.warning("dead-lettering %s (%s): %s", msg.subject[:128], code, message)
        return Outgoing(
            dlq_subject(SERVICE, code), dumps(letter), letter.dead_letter_id, STREAM_DLQ, otel_context.get_current()
        )


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (the consumer span of the event), if any: stored with
    each webhook delivery, whose POST span (sent later by the worker) becomes its child."""
    return telemetry.current_traceparent()


def delivery_for(pref: db.PreferenceRow | None, kind: str) -> Delivery:
    """The department's choice for this notification type (immediate unless it chose a digest)."""
    if pref is None or not pref.digest:
        return Delivery.IMMEDIATE
    try:
        return Delivery(pref.digest.get(kind, Delivery.IMMEDIATE.value))
    except ValueError:
        return Delivery.IMMEDIATE


def _pending(row: db.OutboxRow) -> _Pending:
    return _Pending(row.notification_id, row.subject, row.body.encode())


# --- FastStream wiring: the one subscription the notifier has ---------------------------------


def build_router(
    processor: NotifierProcessor,
    *,
    batch_size: int,
    fetch_timeout: float,
    retry_delay: float,
    metrics: NotifierMetrics | None = None,
    tracer: trace.Tracer | None = None,
    inbox_prefix: bytes = b"_INBOX.",  # the service's own (docs/security.md)
) -> NatsRouter:
    """The notifier's only subscription: the durable ``notifier`` consumer on ``BATON_EVENTS`` (provisioned).

    A batch subscriber keeps the stream order (FastStream's single-message pull subscriber
    handles a fetched batch concurrently); every message is acked or naked on its own.
    Each message is processed in a consumer span continuing the trace its headers carry
    (``tracer``: from the service's own provider, else the global one).
    """
    router = NatsRouter()
    span_tracer = tracer or default_tracer

    def count(outcome: str) -> None:
        if metrics is not None:
            metrics.messages.labels(outcome).inc()

    def span_for(inbound: Inbound) -> AbstractContextManager[Any]:
        # A child of intake's span that appended the event (its traceparent is in the headers).
        span: AbstractContextManager[Any] = telemetry.process_span(
            span_tracer,
            stream=STREAM_EVENTS,
            subject=inbound.subject,
            data=inbound.data,
            parent=telemetry.extract(inbound.headers),
            consumer=CONSUMER_NOTIFIER,
        )
        return span

    async def settle(raw: Msg, result: Result) -> None:
        await _settle(raw, result)
        count(result.outcome.value)

    @router.subscriber(
        f"{EVENTS_PREFIX}.>",
        stream=JStream(STREAM_EVENTS, declare=False),
        durable=CONSUMER_NOTIFIER,
        pull_sub=PullSub(batch_size=batch_size, timeout=fetch_timeout, batch=True),
        inbox_prefix=inbox_prefix,
        ack_policy=AckPolicy.MANUAL,
        decoder=raw_batch,
        title="notifier:events",
        description="The canonical event log (baton.events.<request_id>.<type>), fanned out to departments.",
    )
    async def on_events(body: list[bytes], msg: NatsMessage) -> None:
        raws: list[Msg] = cast("list[Msg]", msg.raw_message)
        inbounds = [to_inbound(raw) for raw in raws]
        # Several messages: one transaction, the effects published in waves (publishing.py), then the acks
        # (a batch of one goes straight to the per-message path below).
        if len(raws) > 1:
            try:
                results = await processor.process_batch(inbounds, span_for)
            except Exception:
                log.warning("batch of %d messages failed; handling them one at a time", len(raws), exc_info=True)
            else:
                for raw, result in zip(raws, results, strict=True):
                    await settle(raw, result)
                return

        # Fallback: one transaction per message, so that a poison message is isolated (dead-lettered) and
        # the others still commit; a failure naks the rest of the batch, keeping the order, except a message on
        # its last delivery: naked, it would never come back (JetStream's max-deliveries), so it is handled here.
        backing_off = False
        for index, raw in enumerate(raws):
            inbound = inbounds[index]
            if backing_off and not processor.is_last_delivery(inbound):
                await raw.nak(delay=retry_delay)
                continue
            try:
                with span_for(inbound):
                    result = await processor.process(inbound)
            except Exception as exc:
                if processor.is_last_delivery(inbound):
                    try:  # a transient failure is waited out here: an outage never dead-letters
                        result = await wait_out_transient(
                            lambda: processor.process(inbound),  # noqa: B023 (awaited within this iteration)
                            exc,
                            TRANSIENT_ERRORS,
                            heartbeat=raw.in_progress,
                            base_delay=retry_delay,
                        )
                    except Exception as final:
                        exc = final
                    else:
                        await _settle(raw, result)
                        count(result.outcome.value)
                        continue
                    log.exception("giving up on %s after %d deliveries", raw.subject[:128], inbound.num_delivered)
                    try:
                        await processor.dead_letter_poison(inbound, exc)
                    except Exception:
                        # No delivery left and no dead letter either: logged here, the rest of the batch comes back.
                        log.exception("dead-lettering %s failed; the message is lost", raw.subject[:128])
                        for later in raws[index + 1 :]:
                            await later.nak(delay=retry_delay)
                        count("lost")
                        return
                    await term_with_reason(raw, TERM_DEAD_LETTERED)
                    count("gave_up")
                    continue
                log.exception("processing %s failed; redelivering in %.1fs", raw.subject[:128], retry_delay)
                # Keep the order: this message and everything after it in the batch come back later.
                await raw.nak(delay=retry_delay)
                count("retried")
                backing_off = True
                continue
            await settle(raw, result)

    return router


async def _settle(raw: Msg, result: Result) -> None:
    """Ack once the effect is committed; a message waiting for an earlier one comes back later."""
    if result.outcome is Outcome.WAITING:
        await raw.nak(delay=result.retry_in)
    else:
        await raw.ack()


async def raw_batch(msg: NatsMessage) -> list[bytes]:
    """Hand the handler raw bytes: the notifier parses and dead-letters bad JSON itself."""
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
failpoint = Failpoint("BATON_NOTIFIER_FAILPOINT", log)
