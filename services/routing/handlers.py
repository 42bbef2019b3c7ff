"""Routing's message handling: the canonical log and the durable SLA timers in, routing's events out (via intake).

Two subscriptions (``build_router``), both batch pull consumers provisioned by Baton:

* ``routing`` on ``BATON_EVENTS``: every canonical event, in stream order. ``created`` is routed;
  every later event moves the request's SLA clocks (``tracking.follow``) and may produce
  ``routed`` / ``returned`` (after ``declined``), ``escalated`` (a breach found on the way) and
  ``handoff_loop_detected``;
* ``routing-timers`` on ``BATON_TIMERS``: due timers (JetStream message schedules) that produce
  ``sla_warning`` and ``escalated``.

Delivery rules (nothing lost, nothing twice):

* the processed event_id (or the clock change of a timer), the request's new state and the exact
  JSON of every event to emit are committed in one transaction; then those stored bytes are
  published to ``baton.svc.routing.<type>`` (stream ``BATON_IN``, ``Nats-Msg-Id`` = the
  deterministic event_id); then the timers the clocks want are scheduled; then the message is acked;
* a redelivered (already processed) event republishes the *stored* bytes, never a regenerated
  event: intake would refuse a different payload under the same event_id. An ``escalated`` or
  ``sla_warning`` has one event_id per clock episode, whichever path emits it: one per breach;
* a timer is acted on only once routing has applied every canonical event of that request that
  is already in the log (else it is naked and comes back shortly): a clock stopped by an event
  that routing has not read yet (it was down) must not escalate;
* timers are wake-ups, the database is the truth: a stale timer (the clock stopped, paused or
  moved) is acked and does nothing; an early one (the deadline moved later) is armed again;
* a body that is not a valid event or timer is poison: dead-lettered and acked, never retried;
* an unexpected error (database, NATS timeout) naks the message (and, on the event consumer, the
  rest of its batch, to keep the order) with an exponential delay (``retry_delay`` doubled per
  delivery, capped at 30 s); on the event consumer's last allowed delivery it is dead-lettered
  instead of being dropped. Timers are never dropped (unlimited deliveries).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Protocol, cast

import nats.errors
import orjson
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsMessage, NatsRouter, PullSub
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter
from pydantic import Field, ValidationError
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.contracts import (
    SERVICE_TYPES,
    Catalog,
    Created,
    DeadLetter,
    LifecycleEvent,
    Routed,
    dumps,
    error_list,
    parse_event,
)
from libs.contracts import tracing as telemetry
from libs.contracts.database import PendingInserts
from libs.contracts.dlq import TERM_DEAD_LETTERED, term_with_reason, wait_out_transient
from libs.contracts.envelope import ID_RE, RequestId, Slug, StrictModel, Timestamp
from libs.contracts.events import SlaClock
from libs.contracts.failpoint import Failpoint
from libs.contracts.notifications import FieldError
from libs.contracts.publishing import Outgoing, PublishMany, dedupe, sequential_publish_many
from libs.contracts.subjects import (
    CONSUMER_ROUTING,
    CONSUMER_ROUTING_TIMERS,
    EVENTS_PREFIX,
    SERVICE_CONSUMERS,
    STREAM_DLQ,
    STREAM_EVENTS,
    STREAM_IN,
    STREAM_TIMERS,
    TIMER_DUE_PREFIX,
    dlq_subject,
    event_subject,
    service_subject,
    timer_due_subject,
    timer_schedule_subject,
)

from . import db
from .domain import clock_event_id
from .tracking import Context, Policy, TimerKind, TimerOutcome, TimerSpec, Track, on_timer, start, wanted_timers
from .tracking import follow as follow_event

log = logging.getLogger("baton.routing")
default_tracer = trace.get_tracer("baton.routing")

SERVICE = "routing"
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
ROUTED_SUBJECT = service_subject(SERVICE, "routed")
#: Where each event type routing emits goes (all through intake).
EMIT_SUBJECTS = {t: service_subject(SERVICE, t) for t, owner in SERVICE_TYPES.items() if owner == SERVICE}
MAX_RETRY_DELAY = 30.0
#: Longest wait of an event that arrived before an earlier one of its request (it fills within seconds).
MAX_GAP_DELAY = 5.0
#: Due-timer messages expire after this (``Nats-Schedule-TTL``); the reconciler re-arms any timer
#: that was never acted on, so a routing outage longer than this loses nothing.
DUE_TTL = "168h"
#: An early timer due within this long is naked until then instead of being scheduled again.
EARLY_NAK_WINDOW = timedelta(seconds=60)


class Publish(Protocol):
    """Publish ``body`` to ``subject`` on ``stream`` with ``Nats-Msg-Id``; returns once the PubAck arrived."""

    def __call__(self, subject: str, body: bytes, *, msg_id: str, stream: str) -> Awaitable[None]: ...


class Schedule(Protocol):
    """Publish a schedule message (``headers`` carry ``Nats-Schedule*``) to ``BATON_TIMERS``; waits for the PubAck."""

    def __call__(self, subject: str, body: bytes, *, headers: dict[str, str]) -> Awaitable[None]: ...


#: ``pending(request_id, after_stream_seq)``: is a canonical event of the request after that stream
#: sequence already in the log (so routing has not caught up with the request yet)?
Pending = Callable[[str, int], Awaitable[bool]]


class Outcome(StrEnum):
    ROUTED = "routed"  # a new request: a decision, published
    APPLIED = "applied"  # a later event applied to the request's clocks (maybe with events emitted)
    REPUBLISHED = "republished"  # already processed: the stored events published again
    IGNORED = "ignored"  # not a request routing follows
    DEAD_LETTERED = "dead_lettered"  # poison: not a valid canonical event


class TimerHandling(StrEnum):
    DONE = "done"  # ack
    RETRY = "retry"  # nak with the given delay (not caught up, or early)
    DEAD_LETTERED = "dead_lettered"


class SequenceGap(RuntimeError):
    """An event arrived before an earlier event of the same request: retried until the gap fills."""


#: Deliveries of a later event of a request routing has no record of before it is ignored as a request
#: older than routing's database: until then its ``created`` may still be in flight at another replica.
UNKNOWN_REQUEST_DELIVERIES = 5


@dataclass(frozen=True)
class Inbound:
    """The parts of a JetStream message routing needs (kept broker-agnostic for tests)."""

    subject: str
    data: bytes
    headers: dict[str, str]
    stream_sequence: int
    num_delivered: int


@dataclass(frozen=True)
class TimerResultInfo:
    handling: TimerHandling
    outcome: str
    delay: float = 0.0


class TimerDue(StrictModel):
    """The body of a schedule, and of the due message the server publishes from it."""

    request_id: RequestId
    department: Slug
    clock: SlaClock
    episode: Annotated[int, Field(ge=1)]
    kind: TimerKind
    due_at: Timestamp

    @property
    def clock_id(self) -> str:
        return f"{self.request_id}.{self.department}.{self.clock.value}.{self.episode}"

    @property
    def subject(self) -> str:
        return timer_due_subject(self.request_id, self.department, self.clock.value, self.episode, self.kind.value)


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
            "Canonical events handled by routing, by outcome: routed, applied, republished, ignored, dead_lettered, "
            "retried (naked for redelivery), gave_up (dead-lettered after the last delivery), lost.",
            ["outcome"],
            registry=registry,
        )
        self.decisions = Counter(
            "baton_routing_decisions",
            "New routing decisions, by provider department and rule kind (suggested, explicit-provider, rule, "
            "category, fallback, returned).",
            ["provider_department", "rule"],
            registry=registry,
        )
        self.emitted = Counter(
            "baton_routing_emitted",
            "Events routing emitted (first time, not republished), by type and department concerned.",
            ["type", "department"],
            registry=registry,
        )
        self.timers = Counter(
            "baton_routing_timers",
            "Due SLA timers handled, by kind and outcome (fired, already, early, stale, suppressed, unknown, "
            "waiting: routing had not caught up with the request yet, retried, dead_lettered).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.scheduled = Counter(
            "baton_routing_timers_scheduled", "Timer schedules published to BATON_TIMERS.", registry=registry
        )


def schedule_headers(spec: TimerSpec) -> dict[str, str]:
    """The JetStream message-schedule headers (nats-server 2.12+) of one timer: fire once at ``due_at``."""
    due = spec.due_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    target = timer_due_subject(spec.request_id, spec.department, spec.clock.value, spec.episode, spec.kind.value)
    return {"Nats-Schedule": f"@at {due}", "Nats-Schedule-Target": target, "Nats-Schedule-TTL": DUE_TTL}


class RoutingProcessor:
    def __init__(
        self,
        database: db.Database,
        catalog: Catalog,
        publish: Publish,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: RoutingMetrics | None = None,
        *,
        schedule: Schedule | None = None,
        pending: Pending | None = None,
        policy: Policy | None = None,
        publish_many: PublishMany | None = None,
        schedule_many: PublishMany | None = None,
    ) -> None:
        """``publish_many`` / ``schedule_many`` send a batch's events / timer schedules in waves (publishing.py)
        (default: ``publish`` / ``schedule`` one by one)."""
        self.db = database
        self.catalog = catalog  # replaced by the app when the catalog file changes
        self._publish = publish
        self.publish_many = publish_many or sequential_publish_many(publish)
        self._schedule_fn = schedule
        self.schedule_many = schedule_many or sequential_schedule_many(schedule)
        self.pending = pending
        self.clock = clock
        self.metrics = metrics
        self.policy = policy or Policy()

    @property
    def publish(self) -> Publish:
        return self._publish

    @publish.setter
    def publish(self, publish: Publish) -> None:
        """Replacing ``publish`` (a test's spy, a fault) routes every publish through it, batches included."""
        self._publish = publish
        self.publish_many = sequential_publish_many(publish)

    @property
    def schedule(self) -> Schedule | None:
        return self._schedule_fn

    @schedule.setter
    def schedule(self, schedule: Schedule | None) -> None:
        self._schedule_fn = schedule
        self.schedule_many = sequential_schedule_many(schedule)

    def _context(self) -> Context:
        return Context(self.catalog, self.policy, self.clock())

    # --- the canonical log ---------------------------------------------------------------------
    async def process(self, msg: Inbound) -> Outcome:
        """One message in its own transaction (the fallback when a batch could not be recorded at once)."""
        for attempt in range(2):
            try:
                async with self.db.transaction() as session:
                    decided = await self._decide(session, msg)
                break
            except IntegrityError:
                # Another routing replica recorded this event first: read what it stored.
                if attempt:
                    raise
                log.info("event recorded concurrently; reading the stored outcome")
        await self._after_commit([decided])
        return decided.outcome

    async def process_batch(self, msgs: Sequence[Inbound], span: SpanFactory) -> list[Outcome]:
        """Every message of a fetched batch in one transaction, committed once; then every event to emit
        published (PubAcks awaited together), then the timers of every request touched scheduled (likewise).
        Returns one outcome per message, in order; the caller acks only after this returned.

        Events of one request inside the batch are recorded in stream order on the same session. Any exception
        (a sequence gap, a concurrent replica, a database error) rolls the whole transaction back and is
        raised: the caller then handles the batch one message at a time, which isolates a poison message and
        naks from the failing one on. A failure after the commit is repaired the same way (redelivered events
        are found processed and their stored rows published again, deduplicated by ``Nats-Msg-Id``).
        """
        decisions: list[_Decided] = []
        async with self.db.transaction() as session:
            cache = await _TrackCache.read(session, msgs, lock=True)
            for msg in msgs:
                with span(msg):
                    decisions.append(await self._decide(session, msg, cache))
            await cache.writes.write(session)
        await self._after_commit(decisions)
        return [d.outcome for d in decisions]

    async def _decide(self, session: AsyncSession, msg: Inbound, cache: _TrackCache | None = None) -> _Decided:
        context = otel_context.get_current()
        try:
            event = parse_event(msg.data)
        except ValidationError as exc:
            errors = error_list(exc)
            code = "malformed_json" if any(e.code == "json_invalid" for e in errors) else "validation_failed"
            summary = "; ".join(f"{'.'.join(map(str, e.loc)) or '(root)'}: {e.message}" for e in errors[:5])
            letter = self._letter(msg, code, f"not a valid canonical event: {summary}"[:1000], errors)
            return _Decided(Outcome.DEAD_LETTERED, context, letter=letter)
        expected = event_subject(event.request_id, event.type)
        if msg.subject != expected:
            letter = self._letter(msg, "subject_mismatch", f"event belongs on {expected}, not {msg.subject[:256]}", [])
            return _Decided(Outcome.DEAD_LETTERED, context, letter=letter)
        rows, outcome = await self._record_in(session, event, msg.stream_sequence, cache, msg.num_delivered)
        return _Decided(outcome, context, rows=list(rows), request_id=event.request_id)

    async def _after_commit(self, decisions: Sequence[_Decided]) -> None:
        """Publish what the committed decisions emit (on a crash here, redelivery finds the rows and publishes
        them again), count the new ones, then schedule the timers of the requests they touched."""
        for d in decisions:
            if d.request_id is not None:
                failpoint(d.request_id)  # test-only
        outgoing: list[Outgoing] = []
        new_rows: list[db.OutboxRow] = []
        touched: dict[str, otel_context.Context] = {}
        for d in decisions:
            if d.letter is not None:
                outgoing.append(d.letter)
            outgoing.extend(
                Outgoing(
                    EMIT_SUBJECTS[r.event_type],
                    r.body.encode(),
                    r.event_id,
                    STREAM_IN,
                    d.context,
                    order_key=r.request_id,
                )
                for r in d.rows
            )
            if d.outcome in (Outcome.ROUTED, Outcome.APPLIED):
                new_rows.extend(d.rows)
            if d.request_id is not None:
                touched[d.request_id] = d.context
        await self.publish_many(dedupe(outgoing))
        self._count_new(new_rows)
        await self.arm_requests(touched)

    async def _record_in(
        self,
        session: AsyncSession,
        event: LifecycleEvent,
        stream_seq: int,
        cache: _TrackCache | None = None,
        num_delivered: int = UNKNOWN_REQUEST_DELIVERIES,
    ) -> tuple[Sequence[db.OutboxRow], Outcome]:
        """Record one event in the caller's transaction: the rows to publish and the outcome. With ``cache`` (a
        batch), the processed ids and the tracks were read once for the whole batch; rows are flushed at commit."""
        if cache is not None:
            processed = event.event_id in cache.processed
        else:
            processed = await db.is_processed(session, event.event_id)
        if processed:
            return await db.outbox_caused_by(session, event.event_id), Outcome.REPUBLISHED
        if cache is not None:
            track, stored = cache.track(event.request_id)
        else:
            track, stored = await db.load_track(session, event.request_id, lock=True)
        ctx = self._context()
        if track is None:
            if not isinstance(event, Created):
                if num_delivered < UNKNOWN_REQUEST_DELIVERIES:
                    # Its created may be in the hands of another routing replica right now.
                    raise SequenceGap(f"{event.request_id}: event {event.sequence} before its created was applied")
                return [], Outcome.IGNORED  # a request routing never saw created (older than its database)
            track, emits = start(event, ctx)
            outcome = Outcome.ROUTED
        elif isinstance(event, Created):
            return [], Outcome.IGNORED  # the request exists already (intake refuses such a duplicate)
        else:
            sequence = event.sequence
            if sequence is not None and sequence <= track.last_sequence:
                return await db.outbox_caused_by(session, event.event_id), Outcome.REPUBLISHED
            if sequence is not None and sequence > track.last_sequence + 1:
                raise SequenceGap(f"{event.request_id}: event {sequence} before {track.last_sequence + 1} was applied")
            emits = follow_event(track, event, ctx)
            outcome = Outcome.APPLIED
        track.last_stream_seq = max(track.last_stream_seq, stream_seq)
        db.save_track(session, track, stored, wanted_timers(track, ctx), ctx.now)
        if outcome is Outcome.ROUTED and stored.request is not None:
            stored.request.trace_parent = telemetry.current_traceparent()
        rows = db.add_outbox(session, emits, event.event_id, ctx.now)
        writes = cache.writes if cache is not None else PendingInserts()
        for emitted in emits:
            if isinstance(emitted, Routed):
                db.add_decision(writes, emitted)
        if cache is not None:
            cache.processed.add(event.event_id)
        db.add_processed(
            writes, event_id=event.event_id, request_id=event.request_id, event_type=event.type, at=ctx.now
        )
        if cache is None:
            await writes.write(session)
        return rows, outcome

    async def _publish_rows(self, rows: Sequence[db.OutboxRow]) -> None:
        for row in rows:
            await self.publish(EMIT_SUBJECTS[row.event_type], row.body.encode(), msg_id=row.event_id, stream=STREAM_IN)

    def _count_new(self, rows: Sequence[db.OutboxRow]) -> None:
        for row in rows:
            doc = orjson.loads(row.body)
            if row.event_type == "routed":
                log.info("routed %s to %s (%s)", row.request_id, doc["provider_department"], doc["rule"])
            else:
                log.info("%s %s: %s", row.event_type, row.request_id, _summary(doc))
            if self.metrics is None:
                continue
            department = doc.get("department") or doc.get("provider_department") or ""
            self.metrics.emitted.labels(row.event_type, department).inc()
            if row.event_type == "routed":
                self.metrics.decisions.labels(doc["provider_department"], doc["rule"].split(":", 1)[0]).inc()
            elif row.event_type == "returned":
                self.metrics.decisions.labels("", "returned").inc()

    # --- timers ------------------------------------------------------------------------------------
    async def process_timer(self, msg: Inbound) -> TimerResultInfo:
        try:
            due = TimerDue.model_validate_json(msg.data)
        except ValidationError as exc:
            errors = error_list(exc)
            summary = "; ".join(f"{'.'.join(map(str, e.loc)) or '(root)'}: {e.message}" for e in errors[:5])
            await self._dead_letter(msg, "bad_timer", f"not a valid timer: {summary}"[:1000], errors)
            return TimerResultInfo(TimerHandling.DEAD_LETTERED, "dead_lettered")
        if msg.subject != due.subject:
            await self._dead_letter(msg, "subject_mismatch", f"timer belongs on {due.subject}", [])
            return TimerResultInfo(TimerHandling.DEAD_LETTERED, "dead_lettered")

        async with self.db.transaction() as session:
            track, _ = await db.load_track(session, due.request_id)
        if track is None:
            return TimerResultInfo(TimerHandling.DONE, TimerOutcome.UNKNOWN.value)
        if self.pending is not None and await self.pending(due.request_id, track.last_stream_seq):
            return TimerResultInfo(TimerHandling.RETRY, "waiting", min(0.2 * msg.num_delivered, 2.0))

        kind = due.kind
        async with self.db.transaction() as session:
            track, stored = await db.load_track(session, due.request_id, lock=True)
            if track is None:  # pragma: no cover - rows are never deleted
                return TimerResultInfo(TimerHandling.DONE, TimerOutcome.UNKNOWN.value)
            ctx = self._context()
            result = on_timer(track, due.clock_id, kind, ctx)
            early_soon = (
                result.outcome is TimerOutcome.EARLY
                and result.due_at is not None
                and result.due_at - ctx.now <= EARLY_NAK_WINDOW
            )
            rearm = (
                frozenset({due.clock_id}) if result.outcome is TimerOutcome.EARLY and not early_soon else frozenset()
            )
            db.save_track(session, track, stored, wanted_timers(track, ctx), ctx.now, rearm=rearm)
            rows: Sequence[db.OutboxRow] = db.add_outbox(session, result.emits, f"timer:{due.clock_id}:{kind}", ctx.now)
            if result.outcome is TimerOutcome.ALREADY:
                prefix = "esc" if kind is TimerKind.BREACH else "slw"
                stored_row = await db.outbox_event(
                    session, clock_event_id(prefix, due.request_id, due.department, due.clock, due.episode)
                )
                rows = [stored_row] if stored_row is not None else []
        await self._publish_rows(rows)
        if result.outcome is TimerOutcome.FIRED:
            self._count_new(rows)
        await self.arm(due.request_id)
        if early_soon and result.due_at is not None:
            delay = max((result.due_at - ctx.now).total_seconds(), 0.0) + 0.05
            return TimerResultInfo(TimerHandling.RETRY, result.outcome.value, delay)
        return TimerResultInfo(TimerHandling.DONE, result.outcome.value)

    async def trace_anchor(self, request_id: str) -> str | None:
        """The stored traceparent of routing's span of the request's ``created``, if any."""
        async with self.db.transaction() as session:
            return (await db.trace_parents(session, [request_id])).get(request_id)

    async def arm(self, request_id: str | None = None) -> int:
        """Schedule the timers of every clock marked dirty (of one request, or all); returns how many were sent.

        A schedule carries the trace context of the span arming it (the server copies it onto the due
        message); armed outside any span (the reconciler), of the request's stored routing span."""
        if self.schedule is None:
            return 0
        in_span = telemetry.span_context_of(otel_context.get_current()) is not None
        async with self.db.transaction() as session:
            rows = await db.dirty_clocks(session, request_id)
            work = [(row.clock_id, row.request_id, row.schedule_version, db.timer_specs(row)) for row in rows]
            anchors = {} if in_span else await db.trace_parents(session, [w[1] for w in work])
        sent = 0
        done: list[tuple[str, int]] = []
        for clock_id, rid, version, specs in work:
            for spec in specs:
                with telemetry.within(None if in_span else telemetry.context_of(anchors.get(rid))):
                    await self._schedule(spec)
                sent += 1
            done.append((clock_id, version))
        if done:
            async with self.db.transaction() as session:
                await db.mark_scheduled(session, done)
        return sent

    async def arm_requests(self, requests: dict[str, otel_context.Context]) -> int:
        """Schedule the timers of every dirty clock of these requests (each schedule in the trace context
        given for its request), in waves (publishing.py); returns how many were sent."""
        if self.schedule is None or not requests:
            return 0
        async with self.db.transaction() as session:
            rows = await db.dirty_clocks_of(session, list(requests))
            work = [(row.clock_id, row.request_id, row.schedule_version, db.timer_specs(row)) for row in rows]
        items = [self._schedule_item(spec, requests.get(rid)) for _c, rid, _v, specs in work for spec in specs]
        await self.schedule_many(items)
        if self.metrics is not None and items:
            self.metrics.scheduled.inc(len(items))
        if work:
            async with self.db.transaction() as session:
                await db.mark_scheduled(session, [(clock_id, version) for clock_id, _rid, version, _specs in work])
        return len(items)

    @staticmethod
    def _schedule_item(spec: TimerSpec, context: otel_context.Context | None) -> Outgoing:
        body = TimerDue(
            request_id=spec.request_id,
            department=spec.department,
            clock=spec.clock,
            episode=spec.episode,
            kind=spec.kind,
            due_at=spec.due_at,
        )
        subject = timer_schedule_subject(
            spec.request_id, spec.department, spec.clock.value, spec.episode, spec.kind.value
        )
        # Keyed by its subject, not its request: a clock's timer has one subject, so a batch's schedules carry
        # no order among themselves and go out in one wave (publishing.py).
        return Outgoing(subject, dumps(body), "", STREAM_TIMERS, context, schedule_headers(spec), order_key=subject)

    async def _schedule(self, spec: TimerSpec) -> None:
        assert self.schedule is not None
        body = TimerDue(
            request_id=spec.request_id,
            department=spec.department,
            clock=spec.clock,
            episode=spec.episode,
            kind=spec.kind,
            due_at=spec.due_at,
        )
        subject = timer_schedule_subject(
            spec.request_id, spec.department, spec.clock.value, spec.episode, spec.kind.value
        )
        await self.schedule(subject, dumps(body), headers=schedule_headers(spec))
        if self.metrics is not None:
            self.metrics.scheduled.inc()

    async def reconcile(self, *, overdue_grace: timedelta | None = None) -> int:
        """Arm every dirty clock; with ``overdue_grace``, also re-arm timers that should have fired more than
        that long ago and were never acted on (a lost or expired due message). Returns the schedules sent."""
        if overdue_grace is not None:
            async with self.db.transaction() as session:
                rows = await db.overdue_clocks(session, self.clock() - overdue_grace)
                if rows:
                    log.warning("re-arming %d overdue timers that were never acted on", len(rows))
                    await db.mark_dirty(session, [r.clock_id for r in rows])
        total = 0
        for _ in range(100):  # 500 clocks a round; bounded in case clocks keep changing underneath
            sent = await self.arm()
            total += sent
            if sent == 0:
                break
        return total

    # --- dead letters --------------------------------------------------------------------------------
    async def dead_letter_poison(self, msg: Inbound, error: BaseException) -> None:
        """Called on a message's last allowed delivery when processing keeps failing."""
        await self._dead_letter(msg, "processing_failed", f"{type(error).__name__}: {error}"[:1000], [])

    async def _dead_letter(self, msg: Inbound, code: str, message: str, errors: list[FieldError]) -> None:
        await self.publish_many([self._letter(msg, code, message, errors)])

    def _letter(self, msg: Inbound, code: str, message: str, errors: list[FieldError]) -> Outgoing:
        log.warning("dead-lettering %s (%s): %s", msg.subject[:128], code, message[:200])
        prefix = "dlq-routing-timers" if msg.subject.startswith(TIMER_DUE_PREFIX) else "dlq-routing"
        letter = DeadLetter(
            dead_letter_id=f"{prefix}-{msg.stream_sequence}",
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
        return Outgoing(
            dlq_subject(SERVICE, code), dumps(letter), letter.dead_letter_id, STREAM_DLQ, otel_context.get_current()
        )


def sequential_schedule_many(schedule: Schedule | None) -> PublishMany:
    """Timer schedules one at a time through ``schedule`` (each waits for its PubAck)."""

    async def schedule_many(items: Sequence[Outgoing]) -> None:
        for item in items:
            assert schedule is not None
            with telemetry.within(item.context):
                await schedule(item.subject, item.body, headers=dict(item.headers or {}))

    return schedule_many


@dataclass(frozen=True)
class _Decided:
    """One canonical event's outcome inside a transaction, and what to do once it committed."""

    outcome: Outcome
    context: otel_context.Context
    rows: list[db.OutboxRow] = field(default_factory=list)
    letter: Outgoing | None = None
    request_id: str | None = None


class _TrackCache:
    """What recording a batch needs, read with one query per table instead of several queries per event: the
    processed event ids, and each request's rows (updated in place by ``db.save_track`` as the batch goes)."""

    def __init__(self, processed: set[str], stored: dict[str, db.Stored]) -> None:
        self.processed = processed
        self.stored = stored
        self.writes = PendingInserts()  # the batch's processed events and decisions, inserted before its commit

    @classmethod
    async def read(cls, session: AsyncSession, msgs: Sequence[Inbound], *, lock: bool) -> _TrackCache:
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
        return cls(await db.processed_among(session, event_ids), await db.load_tracks(session, request_ids, lock=lock))

    def track(self, request_id: str) -> tuple[Track | None, db.Stored]:
        stored = self.stored.setdefault(request_id, db.Stored(None, []))
        return db.track_of(stored), stored


#: Opens the consumer span of one message (a context manager), e.g. ``telemetry.process_span``.
SpanFactory = Callable[[Inbound], AbstractContextManager[Any]]


def _summary(doc: dict[str, object]) -> str:
    keys = ("department", "clock", "episode", "pattern", "overdue_seconds", "reason")
    return ", ".join(f"{k}={doc[k]}" for k in keys if k in doc)[:300]


def _event_id_of(data: bytes) -> str | None:
    """The ``event_id`` of a rejected body, when it is a JSON object carrying a valid one."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    value = doc.get("event_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and ID_RE.fullmatch(value) else None


# --- FastStream wiring: routing's two subscriptions ----------------------------------------------------


def build_router(
    processor: RoutingProcessor,
    *,
    batch_size: int,
    fetch_timeout: float,
    retry_delay: float,
    metrics: RoutingMetrics | None = None,
    tracer: trace.Tracer | None = None,
    limit: DeliveryLimit | None = None,
    inbox_prefix: bytes = b"_INBOX.",  # the service's own (docs/security.md)
) -> NatsRouter:
    """Routing's subscriptions: ``routing`` on ``BATON_EVENTS`` and ``routing-timers`` on ``BATON_TIMERS``.

    Batch subscribers keep the stream order (FastStream's single-message pull subscriber handles
    a fetched batch concurrently); every message is acked or naked on its own. Each canonical
    event is processed in a consumer span continuing the trace its headers carry (``tracer``:
    from the service's own provider, else the global one).
    """
    router = NatsRouter()
    limit = limit or DeliveryLimit()
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
            consumer=CONSUMER_ROUTING,
        )
        return span

    @router.subscriber(
        f"{EVENTS_PREFIX}.>",
        stream=JStream(STREAM_EVENTS, declare=False),
        durable=CONSUMER_ROUTING,
        pull_sub=PullSub(batch_size=batch_size, timeout=fetch_timeout, batch=True),
        inbox_prefix=inbox_prefix,
        ack_policy=AckPolicy.MANUAL,
        decoder=raw_batch,
        title="routing:events",
        description="The canonical event log (baton.events.<request_id>.<type>): routing follows every request.",
    )
    async def on_event(body: list[bytes], msg: NatsMessage) -> None:
        raws: list[Msg] = cast("list[Msg]", msg.raw_message)
        inbounds = [to_inbound(raw) for raw in raws]
        # Several messages: one transaction, the effects published in waves (publishing.py), then the acks
        # (a batch of one goes straight to the per-message path below).
        if len(raws) > 1:
            try:
                outcomes = await processor.process_batch(inbounds, span_for)
            except Exception as exc:
                if isinstance(exc, SequenceGap):
                    log.info("batch of %d messages: %s; handling them one at a time", len(raws), exc)
                else:
                    log.warning("batch of %d messages failed; handling them one at a time", len(raws), exc_info=True)
            else:
                for raw, outcome in zip(raws, outcomes, strict=True):
                    await raw.ack()
                    count(outcome.value)
                return
        # Fallback: one transaction per message, so that a poison message is isolated (dead-lettered) and
        # the others still commit; a failure naks the rest of the batch, keeping the order, except a message on
        # its last delivery: naked, it would never come back (JetStream's max-deliveries), so it is handled here.
        backing_off: float | None = None
        for index, raw in enumerate(raws):
            inbound = inbounds[index]
            if backing_off is not None and not limit.is_last(inbound.num_delivered):
                await raw.nak(delay=backing_off)
                continue
            try:
                with span_for(inbound):
                    outcome = await processor.process(inbound)
            except Exception as exc:
                if limit.is_last(inbound.num_delivered):
                    try:  # a transient failure is waited out here: an outage never dead-letters
                        outcome = await wait_out_transient(
                            lambda: processor.process(inbound),  # noqa: B023 (awaited within this iteration)
                            exc,
                            TRANSIENT_ERRORS,
                            heartbeat=raw.in_progress,
                            base_delay=retry_delay,
                        )
                    except Exception as final:
                        exc = final
                    else:
                        await raw.ack()
                        count(outcome.value)
                        continue
                    log.exception("giving up on %s after %d deliveries", raw.subject[:128], inbound.num_delivered)
                    try:
                        await processor.dead_letter_poison(inbound, exc)
                    except Exception:
                        # No delivery left: it stays unacked; JetStream's max-deliveries advisory then
                        # dead-letters it (intake's advisory consumer, docs/reliability.md).
                        log.exception("dead-lettering %s failed; the message is lost", raw.subject[:128])
                        for later in raws[index + 1 :]:
                            await later.nak(delay=retry_delay)
                        count("lost")
                        return
                    await term_with_reason(raw, TERM_DEAD_LETTERED)
                    count("gave_up")
                    continue
                if isinstance(exc, SequenceGap):
                    # Only this event waits for the earlier one of its request. Naking the rest of the batch too
                    # made them overtake each other on redelivery and wait in turn, with growing delays (a convoy
                    # that took minutes after a 10 s database outage: tests/faults, docs/faults.md).
                    delay = backoff_delay(retry_delay, inbound.num_delivered, cap=MAX_GAP_DELAY)
                    log.info("%s; redelivering in %.1fs", exc, delay)
                    await raw.nak(delay=delay)
                    count("retried")
                    continue
                delay = backoff_delay(retry_delay, inbound.num_delivered)
                log.exception("processing %s failed; redelivering in %.1fs", raw.subject[:128], delay)
                # Keep the order: this message and everything after it in the batch come back later.
                await raw.nak(delay=delay)
                count("retried")
                backing_off = delay
                continue
            await raw.ack()
            count(outcome.value)

    def count_timer(kind: str, outcome: str) -> None:
        if metrics is not None:
            metrics.timers.labels(kind, outcome).inc()

    @router.subscriber(
        f"{TIMER_DUE_PREFIX}.>",
        stream=JStream(STREAM_TIMERS, declare=False),
        durable=CONSUMER_ROUTING_TIMERS,
        pull_sub=PullSub(batch_size=batch_size, timeout=fetch_timeout, batch=True),
        inbox_prefix=inbox_prefix,
        ack_policy=AckPolicy.MANUAL,
        decoder=raw_batch,
        title="routing:timers",
        description="Due SLA timers (baton.timers.due.<request_id>.<dept>.<clock>.<episode>.<kind>).",
    )
    async def on_timer_due(body: list[bytes], msg: NatsMessage) -> None:
        for raw in cast("list[Msg]", msg.raw_message):
            inbound = to_inbound(raw)
            kind = raw.subject.rsplit(".", 1)[-1][:16]
            try:
                parent = await timer_parent(processor, inbound)
                with telemetry.process_span(
                    span_tracer,
                    stream=STREAM_TIMERS,
                    subject=raw.subject,
                    data=inbound.data,
                    parent=parent,
                    consumer=CONSUMER_ROUTING_TIMERS,
                ):
                    result = await processor.process_timer(inbound)
            except Exception:
                delay = backoff_delay(retry_delay, inbound.num_delivered)
                log.exception("timer %s failed; redelivering in %.1fs", raw.subject[:160], delay)
                await raw.nak(delay=delay)
                count_timer(kind, "retried")
                continue
            if result.handling is TimerHandling.RETRY:
                await raw.nak(delay=result.delay)
            elif result.handling is TimerHandling.DEAD_LETTERED:
                await term_with_reason(raw, TERM_DEAD_LETTERED)
            else:
                await raw.ack()
            count_timer(kind, result.outcome)

    return router


async def timer_parent(processor: RoutingProcessor, inbound: Inbound) -> otel_context.Context:
    """A due timer's span is a child of the span that armed it (the server copies the schedule's
    ``traceparent`` onto the due message); without one, of routing's stored span of the request."""
    carried = telemetry.extract(inbound.headers)
    if telemetry.span_context_of(carried) is not None:
        return carried
    parts = inbound.subject.split(".")
    request_id = parts[3] if len(parts) > 3 and ID_RE.fullmatch(parts[3]) else None
    anchor = telemetry.context_of(await processor.trace_anchor(request_id)) if request_id else None
    return anchor if anchor is not None else otel_context.Context()


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


# --- test-only fault injection (tests/faults) ----------------------------------------------------
#: Called right after the commit, before the publishes and the ack (libs/contracts/failpoint.py).
failpoint = Failpoint("BATON_ROUTING_FAILPOINT", log)
