"""Intake's message handling: inbound message in -> checks -> state machine -> canonical log.

Delivery rules (see docs/architecture.md):

* the inbound message is acked only after its effect is committed to the database
  *and* the canonical event (or the refusal) is confirmed by a PubAck;
* a crash between the commit and the PubAck is repaired by redelivery: the event_id
  is found in the database and the stored canonical bytes are published again
  (``Nats-Msg-Id`` = event_id, so the log never holds it twice);
* an unexpected error naks the message with a delay; on its last allowed delivery it is
  dead-lettered with the reason instead of being dropped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, cast

import nats.errors
import nats.js.errors
import orjson
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsMessage, NatsRouter, PullSub
from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from libs.contracts import DeadLetter, LifecycleEvent, Rejection, dumps
from libs.contracts import tracing as telemetry
from libs.contracts.database import PendingInserts
from libs.contracts.dlq import TERM_DEAD_LETTERED, term_with_reason
from libs.contracts.envelope import ID_RE
from libs.contracts.failpoint import Failpoint
from libs.contracts.notifications import FieldError, RejectionCode
from libs.contracts.publishing import Outgoing, PublishMany, dedupe, sequential_publish_many
from libs.contracts.subjects import (
    CONSUMER_INTAKE,
    INBOUND_PREFIX,
    SERVICE_CONSUMERS,
    STREAM_DLQ,
    STREAM_EVENTS,
    STREAM_IN,
    STREAM_NOTIFY,
    dlq_subject,
    event_subject,
    notify_subject,
)

from . import db
from .domain import Checked, Refusal, Rejected, RequestState, check_inbound, decide, payload_hash, stamp

log = logging.getLogger("baton.intake")

SERVICE = "intake"
MAX_RETRY_DELAY = 30.0
#: In-place retries of a transient failure before falling back to a delayed redelivery (~5 minutes).
IN_PLACE_ATTEMPTS = 30
#: Must stay below the consumer's ack_wait: each retry first signals "in progress".
MAX_IN_PLACE_DELAY = 10.0
#: Failures worth waiting out: the database or NATS is briefly unreachable.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    TimeoutError,
    ConnectionError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
    # JetStream between two leaders of a stream (a node of the cluster died): no PubAck for a few seconds.
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


class Publish(Protocol):
    """Publish ``body`` to ``subject`` on ``stream`` with ``Nats-Msg-Id``; returns once the PubAck arrived."""

    def __call__(self, subject: str, body: bytes, *, msg_id: str, stream: str) -> Awaitable[None]: ...


class _BatchCache:
    """What deciding a batch needs, read with one query per table instead of several queries per message.

    The request states are kept here while the batch's events are decided in order, and written once per
    request by :meth:`save`, each guarded by the sequence it was read at (as :func:`db.save_state` does).
    """

    def __init__(self, events: dict[str, db.EventRow], rows: dict[str, db.RequestRow]) -> None:
        self.events: dict[str, db.EventRow | db.NewEvent] = dict(events)
        self.rows = rows
        self.writes = PendingInserts()  # the batch's appended events, inserted by ``save``
        self.states: dict[str, RequestState] = {rid: row.to_state() for rid, row in rows.items()}
        self.trace_parents: dict[str, str | None] = {rid: row.trace_parent for rid, row in rows.items()}
        self.changed: dict[str, datetime] = {}

    @classmethod
    async def read(cls, session: AsyncSession, msgs: Sequence[Inbound], *, for_update: bool) -> _BatchCache:
        event_ids: set[str] = set()
        request_ids: set[str] = set()
        for msg in msgs:
            event_id, request_id = _ids_of(msg.data)
            if event_id:
                event_ids.add(event_id)
            if request_id:
                request_ids.add(request_id)
        return cls(
            await db.find_events(session, event_ids),
            await db.load_requests(session, request_ids, for_update=for_update),
        )

    def anchor(self, data: bytes) -> str | None:
        """The stored traceparent of the request's first span (as :meth:`IntakeProcessor.trace_anchor`)."""
        _event_id, request_id = _ids_of(data)
        if request_id is None or request_id not in self.states:
            return None
        return self.trace_parents.get(request_id) or telemetry.legacy_anchor(self.states[request_id].trace_id)

    def advance(self, state: RequestState, now: datetime) -> None:
        self.states[state.request_id] = state
        self.changed[state.request_id] = now

    async def save(self, session: AsyncSession) -> None:
        await self.writes.write(session)
        changes = []
        for request_id, now in self.changed.items():
            row = self.rows.get(request_id)
            trace_parent = self.trace_parents.get(request_id) if row is None else None
            changes.append((row, self.states[request_id], now, trace_parent))
        await db.save_states(session, changes)


class LeaseLost(RuntimeError):
    """This replica lost the consumer lease while it held a batch (services/intake/lease.py)."""


def _ids_of(data: bytes) -> tuple[str | None, str | None]:
    """``(event_id, request_id)`` of a body, when it is a JSON object carrying them as strings."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    event_id, request_id = doc.get("event_id"), doc.get("request_id")
    return (
        event_id if isinstance(event_id, str) else None,
        request_id if isinstance(request_id, str) else None,
    )


#: Opens the consumer span of one message given its request's stored traceparent (``None``: unknown request).
SpanFactory = Callable[["Inbound", str | None], AbstractContextManager[Any]]


class Outcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True)
class Inbound:
    """The parts of a JetStream message intake needs (kept broker-agnostic for tests)."""

    subject: str
    data: bytes
    headers: dict[str, str]
    stream_sequence: int
    num_delivered: int


@dataclass(frozen=True)
class Appended:
    """The canonical event a submission produced, or found already appended (``duplicate``)."""

    event_id: str
    request_id: str
    type: str
    sequence: int
    canonical: str  # the exact JSON published on BATON_EVENTS
    duplicate: bool

    @classmethod
    def of(cls, row: db.EventRow | db.NewEvent, *, duplicate: bool) -> Appended:
        return cls(row.event_id, row.request_id, row.type, row.sequence, row.canonical, duplicate)


class IntakeProcessor:
    def __init__(
        self,
        database: db.Database,
        publish: Publish,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        publish_many: PublishMany | None = None,
    ) -> None:
        """``publish_many`` sends a batch's canonical events in waves (publishing.py) (default: ``publish`` one by
        one)."""
        self.db = database
        self._publish = publish
        self.publish_many = publish_many or sequential_publish_many(publish)
        self.clock = clock

    @property
    def publish(self) -> Publish:
        return self._publish

    @publish.setter
    def publish(self, publish: Publish) -> None:
        """Replacing ``publish`` (a test's spy, a fault) routes every publish through it, batches included."""
        self._publish = publish
        self.publish_many = sequential_publish_many(publish)

    async def process_batch(
        self, msgs: Sequence[Inbound], span: SpanFactory, *, active: Callable[[], bool] = lambda: True
    ) -> list[Outcome]:
        """Every message of a fetched batch in one transaction, committed once; then every canonical event
        published in order in waves (publishing.py); then the refusals (recorded, dead-lettered and notified one
        by one, as :meth:`process` does). Returns one outcome per message, in order; the caller acks only after
        this returned.

        Events of one request inside the batch are decided in stream order on the same session (each sees the
        state the previous one left). Any exception rolls the whole transaction back and is raised: the caller
        then handles the batch one message at a time (with its in-place retries), which isolates a poison
        message. A failure after the commit is repaired the same way: the applied events are then found by
        event_id and their stored canonical bytes published again (``Nats-Msg-Id`` = event_id).
        ``span(msg, anchor)`` opens the consumer span of a message, given its request's stored traceparent.
        ``active()`` is asked again just before the commit: a replica that lost the consumer lease meanwhile
        rolls the batch back (and the caller hands the messages back) instead of committing it.
        """
        decisions: list[tuple[Outcome, Outgoing | None, tuple[Refusal, Checked | Rejected] | None]] = []
        async with self.db.transaction() as session:
            cache = await _BatchCache.read(session, msgs, for_update=self.db.is_postgres)
            for msg in msgs:
                with span(msg, cache.anchor(msg.data)):
                    decisions.append(self._decide_in(msg, cache))
            await cache.save(session)
            if not active():
                raise LeaseLost("the consumer lease was lost while the batch was decided; rolled back")
        for _outcome, out, _refused in decisions:
            if out is not None:
                failpoint(out.order_key)  # test-only
        await self.publish_many(dedupe([out for _o, out, _r in decisions if out is not None]))
        for msg, (_outcome, _out, refused) in zip(msgs, decisions, strict=True):
            if refused is not None:
                await self._reject(msg, *refused)
        return [outcome for outcome, _out, _r in decisions]

    def _decide_in(
        self, msg: Inbound, cache: _BatchCache
    ) -> tuple[Outcome, Outgoing | None, tuple[Refusal, Checked | Rejected] | None]:
        """One message inside the batch transaction: its outcome, the canonical event to publish, or the
        refusal to record once the batch committed."""
        checked = check_inbound(msg.subject, msg.data)
        if isinstance(checked, Rejected):
            return Outcome.REJECTED, None, (checked.refusal, checked)
        result = self._apply_cached(checked, cache)
        if isinstance(result, Refusal):
            return Outcome.REJECTED, None, (result, checked)
        out = Outgoing(
            event_subject(result.request_id, result.type),
            result.canonical.encode(),
            result.event_id,
            STREAM_EVENTS,
            otel_context.get_current(),
            order_key=result.request_id,
        )
        return (Outcome.DUPLICATE if result.duplicate else Outcome.APPLIED), out, None

    async def process(self, msg: Inbound) -> Outcome:
        checked = check_inbound(msg.subject, msg.data)
        if isinstance(checked, Rejected):
            await self._reject(msg, checked.refusal, checked)
            return Outcome.REJECTED
        result = await self.submit(checked)
        if isinstance(result, Refusal):
            await self._reject(msg, result, checked)
            return Outcome.REJECTED
        return Outcome.DUPLICATE if result.duplicate else Outcome.APPLIED

    async def submit(self, checked: Checked, *, outbox: bool = False) -> Appended | Refusal:
        """Decide, commit and publish a checked event: the one path for NATS and HTTP submissions.

        Idempotent on ``event_id`` whatever the channel: a known event_id with the same payload
        republishes the stored canonical bytes (``duplicate=True``); with another payload it is an
        ``id_conflict``. With ``outbox`` (HTTP, where no redelivery repairs a lost PubAck) the
        commit also records the event as unpublished until its PubAck arrives;
        :meth:`publish_pending` publishes what a crash or a NATS outage left behind.
        """
        for _attempt in range(5):
            try:
                result = await self._apply(checked, outbox)
                break
            except (db.ConcurrentUpdate, IntegrityError):
                # Another writer (an intake replica, or the other channel) advanced this request or
                # appended this event_id first: re-read and decide again.
                log.info("concurrent update on %s, retrying", checked.event.request_id)
        else:
            raise RuntimeError(f"request {checked.event.request_id}: too many concurrent updates")
        if isinstance(result, Refusal):
            return result
        failpoint(result.request_id)  # test-only
        # Published after the commit; on a crash here, redelivery (NATS) or the outbox (HTTP) publishes again.
        await self._publish_canonical(result.event_id, result.request_id, result.type, result.canonical)
        if outbox:
            async with self.db.transaction() as session:
                await db.clear_pending(session, result.event_id)
        return result

    async def _apply(self, checked: Checked, outbox: bool = False) -> Appended | Refusal:
        async with self.db.transaction() as session:
            return await self._apply_in(session, checked, outbox)

    async def _apply_in(self, session: AsyncSession, checked: Checked, outbox: bool = False) -> Appended | Refusal:
        event = checked.event
        existing = await db.find_event(session, event.event_id)
        if existing is not None:
            if existing.payload_hash != checked.payload_hash:
                return Refusal(
                    RejectionCode.ID_CONFLICT,
                    f"event_id {event.event_id} was already used for a different event",
                    (FieldError(loc=["event_id"], code="id_conflict", message="already used"),),
                )
            return Appended.of(existing, duplicate=True)
        row, refusal = await self._decide_and_append(session, event)
        if refusal is not None:
            return refusal
        assert row is not None
        if outbox:
            session.add(db.PendingPublish(event_id=row.event_id, created_at=row.recorded_at))
        return Appended.of(row, duplicate=False)

    def _apply_cached(self, checked: Checked, cache: _BatchCache) -> Appended | Refusal:
        """:meth:`_apply_in` for a batch: the events and requests were read once for the whole batch
        (``cache``); the request rows are written once per request by :meth:`_BatchCache.save`."""
        event = checked.event
        existing = cache.events.get(event.event_id)
        if existing is not None:
            if existing.payload_hash != checked.payload_hash:
                return Refusal(
                    RejectionCode.ID_CONFLICT,
                    f"event_id {event.event_id} was already used for a different event",
                    (FieldError(loc=["event_id"], code="id_conflict", message="already used"),),
                )
            return Appended.of(existing, duplicate=True)
        current = cache.states.get(event.request_id)
        result = decide(current, event)
        if isinstance(result, Refusal):
            return result
        now = self.clock()
        trace_id = result.trace_id if current is not None else _current_trace_id()
        new_state: RequestState = result if current is not None else _with_trace(result, trace_id)
        canonical = stamp(event, new_state.last_sequence, now, new_state.trace_id)
        if current is None:
            cache.trace_parents[event.request_id] = telemetry.current_traceparent()
        cache.advance(new_state, now)
        appended = db.NewEvent(
            event_id=event.event_id,
            request_id=event.request_id,
            sequence=new_state.last_sequence,
            type=event.type,
            payload_hash=payload_hash(event),
            canonical=dumps(canonical).decode(),
            recorded_at=now,
        )
        db.add_event(cache.writes, appended)
        cache.events[event.event_id] = appended
        return Appended.of(appended, duplicate=False)

    async def _publish_canonical(self, event_id: str, request_id: str, event_type: str, canonical: str) -> None:
        await self.publish(
            event_subject(request_id, event_type), canonical.encode(), msg_id=event_id, stream=STREAM_EVENTS
        )

    async def trace_anchor(self, request_id: str) -> str | None:
        """The W3C traceparent of the request's first span (its trace's root), if the request is known."""
        async with self.db.transaction() as session:
            trace_parent, trace_id = await db.trace_anchor(session, request_id)
        return trace_parent or telemetry.legacy_anchor(trace_id)

    async def publish_pending(self, older_than: float) -> int:
        """Publish the canonical events an HTTP submission committed but never saw confirmed (the outbox)."""
        cutoff = self.clock() - timedelta(seconds=older_than)
        async with self.db.transaction() as session:
            rows = await db.pending_events(session, cutoff)
        for row in rows:
            # No span of the submission is alive any more: the re-publication continues the request's trace.
            anchor = telemetry.context_of(await self.trace_anchor(row.request_id))
            with telemetry.within(anchor):
                await self._publish_canonical(row.event_id, row.request_id, row.type, row.canonical)
            async with self.db.transaction() as session:
                await db.clear_pending(session, row.event_id)
        if rows:
            log.info("published %d canonical events left in the outbox", len(rows))
        return len(rows)

    async def record_rejection(
        self,
        *,
        source_key: str,
        department: str | None,
        subject: str,
        event_id: str | None,
        request_id: str | None,
        event_type: str | None,
        refusal: Refusal,
        rejected_at: datetime | None = None,
    ) -> None:
        """Record a refusal once per ``source_key`` (``nats:<stream seq>`` or ``http:<uuid>``)."""
        async with self.db.transaction() as session:
            if not await _rejection_exists(session, source_key):
                session.add(
                    db.RejectionRow(
                        source_key=source_key,
                        department=department,
                        subject=subject[:256],
                        event_id=(event_id or "")[:64] or None,
                        request_id=(request_id or "")[:64] or None,
                        event_type=(event_type or "")[:32] or None,
                        code=refusal.code.value,
                        message=refusal.message,
                        errors=[e.model_dump(mode="json") for e in refusal.errors],
                        rejected_at=rejected_at or self.clock(),
                    )
                )

    async def _decide_and_append(
        self, session: AsyncSession, event: LifecycleEvent
    ) -> tuple[db.EventRow | None, Refusal | None]:
        row = await db.load_request(session, event.request_id, for_update=self.db.is_postgres)
        current = row.to_state() if row is not None else None
        result = decide(current, event)
        if isinstance(result, Refusal):
            return None, result
        now = self.clock()
        # A new request's trace is the one of the span handling its ``created`` (see request_span): its
        # traceparent is stored, so that every later event's spans join that trace.
        trace_id = result.trace_id if current is not None else _current_trace_id()
        new_state: RequestState = result if current is not None else _with_trace(result, trace_id)
        canonical = stamp(event, new_state.last_sequence, now, new_state.trace_id)
        trace_parent = telemetry.current_traceparent() if current is None else None
        await db.save_state(session, row, new_state, now, trace_parent=trace_parent)
        event_row = db.EventRow(
            event_id=event.event_id,
            request_id=event.request_id,
            sequence=new_state.last_sequence,
            type=event.type,
            payload_hash=payload_hash(event),
            canonical=dumps(canonical).decode(),
            recorded_at=now,
        )
        session.add(event_row)
        await session.flush()
        return event_row, None

    async def _reject(self, msg: Inbound, refusal: Refusal, checked: Checked | Rejected) -> None:
        """Record the refusal, dead-letter the original, and tell the publishing department."""
        now = self.clock()
        if isinstance(checked, Checked):
            department = checked.department
            event_id: str | None = checked.event.event_id
            request_id: str | None = checked.event.request_id
            event_type: str | None = checked.event.type
        else:
            department = checked.parsed.department
            doc = checked.document or {}
            event_id = _str_or_none(doc.get("event_id"))
            request_id = _str_or_none(doc.get("request_id"))
            event_type = checked.parsed.event_type
        await self.record_rejection(
            source_key=f"nats:{msg.stream_sequence}",
            department=department,
            subject=msg.subject,
            event_id=event_id,
            request_id=request_id,
            event_type=event_type,
            refusal=refusal,
            rejected_at=now,
        )
        log.info("refused %s (%s): %s", msg.subject[:128], refusal.code.value, refusal.message)
        await self._dead_letter(msg, refusal.code.value, refusal.message, list(refusal.errors), department, event_id)
        if department is not None:
            notice = Rejection(
                notification_id=f"rej-in-{msg.stream_sequence}",
                department=department,
                event_id=event_id,
                request_id=request_id,
                event_type=event_type,
                subject=msg.subject[:256],
                code=refusal.code,
                message=refusal.message,
                errors=list(refusal.errors),
                rejected_at=now,
            )
            await self.publish(
                notify_subject(department, "rejected"),
                dumps(notice),
                msg_id=notice.notification_id,
                stream=STREAM_NOTIFY,
            )

    async def dead_letter_poison(self, msg: Inbound, error: BaseException) -> None:
        """Called on a message's last allowed delivery when processing keeps failing."""
        await self._dead_letter(msg, "processing_failed", f"{type(error).__name__}: {error}"[:1000], [], None, None)

    async def _dead_letter(
        self,
        msg: Inbound,
        code: str,
        message: str,
        errors: list[FieldError],
        department: str | None,
        event_id: str | None,
    ) -> None:
        letter = DeadLetter(
            dead_letter_id=f"dlq-intake-{msg.stream_sequence}",
            service=SERVICE,
            code=code,
            message=message,
            errors=errors,
            original_subject=msg.subject[:256],
            original_stream_sequence=msg.stream_sequence,
            original_headers={k: v for k, v in msg.headers.items() if len(k) < 100 and len(v) < 1000},
            payload=base64.b64encode(msg.data).decode(),
            event_id=event_id if event_id and _valid_id(event_id) else None,
            department=department,
            dead_lettered_at=self.clock(),
        )
        await self.publish(dlq_subject(SERVICE, code), dumps(letter), msg_id=letter.dead_letter_id, stream=STREAM_DLQ)


async def _rejection_exists(session: AsyncSession, source_key: str) -> bool:
    stmt = select(db.RejectionRow.id).where(db.RejectionRow.source_key == source_key)
    return (await session.execute(stmt)).first() is not None


def _with_trace(state: RequestState, trace_id: str | None) -> RequestState:
    return replace(state, trace_id=trace_id)


def _current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def _str_or_none(value: object) -> str | None:
    return value[:200] if isinstance(value, str) else None


def _valid_id(value: str) -> bool:
    return ID_RE.fullmatch(value) is not None


# --- FastStream wiring: the one subscription intake has ---------------------------------


def build_router(
    processor: IntakeProcessor,
    *,
    tracer: trace.Tracer,
    batch_size: int,
    fetch_timeout: float,
    retry_delay: float,
    max_deliver: Callable[[], int | None] | None = None,
    inbox_prefix: bytes = b"_INBOX.",  # the service's own (docs/security.md)
    active: Callable[[], bool] = lambda: True,
) -> NatsRouter:
    """Intake's only subscription: the durable ``intake`` consumer on ``BATON_IN`` (provisioned by Baton).

    A batch subscriber keeps the stream order (FastStream's single-message pull subscriber
    handles a fetched batch concurrently); every message is acked or naked on its own.
    ``active``: False once this replica lost the consumer lease (services/intake/lease.py): the
    rest of the batch in hand is then handed back at once (nak without delay, in order) so that
    the new holder gets it before anything later in the stream.
    """
    router = NatsRouter()
    spec = next(c for c in SERVICE_CONSUMERS if c.durable == CONSUMER_INTAKE)

    def span_for(inbound: Inbound, anchor: str | None) -> AbstractContextManager[Any]:
        parent, links = telemetry.request_parent(anchor, telemetry.extract(inbound.headers))
        span: AbstractContextManager[Any] = telemetry.process_span(
            tracer,
            stream=STREAM_IN,
            subject=inbound.subject,
            data=inbound.data,
            parent=parent,
            consumer=CONSUMER_INTAKE,
            links=links,
        )
        return span

    @router.subscriber(
        f"{INBOUND_PREFIX}.>",
        stream=JStream(STREAM_IN, declare=False),
        durable=CONSUMER_INTAKE,
        pull_sub=PullSub(batch_size=batch_size, timeout=fetch_timeout, batch=True),
        inbox_prefix=inbox_prefix,
        ack_policy=AckPolicy.MANUAL,
        decoder=raw_batch,
        title="intake:inbound",
        description="Inbound events from departments (baton.in.<dept>.<type>) and services (baton.svc.>).",
    )
    async def on_inbound(body: list[bytes], msg: NatsMessage) -> None:
        raws: list[Msg] = cast("list[Msg]", msg.raw_message)
        inbounds = [to_inbound(raw) for raw in raws]
        # Several messages: one transaction, the canonical events published in waves (publishing.py), then the
        # acks (a batch of one goes straight to the per-message path below).
        if len(raws) > 1 and active():
            try:
                await processor.process_batch(inbounds, span_for, active=active)
            except Exception:
                log.warning("batch of %d messages failed; handling them one at a time", len(raws), exc_info=True)
            else:
                for raw in raws:
                    await raw.ack()
                return
        # One at a time: transient failures retried in place, a poison isolated, the order kept.
        for index, raw in enumerate(raws):
            if not active():
                log.info("lease lost: handing back %d fetched messages", len(raws) - index)
                for later in raws[index:]:
                    with contextlib.suppress(Exception):
                        await later.nak()
                return
            inbound = inbounds[index]
            # The provisioned limit (read at start), else the spec's.
            limit = (max_deliver() if max_deliver else None) or spec.max_deliver
            last = 0 < limit <= inbound.num_delivered
            # On the last delivery a transient failure is waited out in place for as long as it lasts:
            # a database outage never sends a message to the dead-letter queue.
            failure = await _process_in_place(processor, tracer, raw, inbound, retry_delay, forever=last)
            if failure is None:
                continue
            if last:
                log.error("giving up on %s after %d deliveries", raw.subject[:128], inbound.num_delivered)
                await processor.dead_letter_poison(inbound, failure)
                await term_with_reason(raw, TERM_DEAD_LETTERED)  # the advisory then knows it is dead-lettered
                continue
            # Not transient (a bug, or a dependency down for minutes): let JetStream redeliver later,
            # this message and everything after it in the batch, so that the order is kept.
            delay = backoff_delay(retry_delay, inbound.num_delivered)
            for later in raws[index:]:
                await later.nak(delay=delay)
            return

    return router


async def _process_in_place(
    processor: IntakeProcessor,
    tracer: trace.Tracer,
    raw: Msg,
    inbound: Inbound,
    retry_delay: float,
    *,
    forever: bool = False,
) -> BaseException | None:
    """Process one message, retrying transient failures *in place* (None = settled and acked, else the failure).

    Intake feeds one ordered log: if it nak'd a message on a short database outage, a later event
    of the same request could overtake it and be refused. So transient errors are retried here,
    holding the batch and telling JetStream the message is still in progress (``forever``: with no
    limit on the attempts, used on the last allowed delivery).
    """
    failure: BaseException | None = None
    attempt = 0
    while forever or attempt < IN_PLACE_ATTEMPTS:
        attempt += 1
        try:
            parent, links = await request_span_parent(processor, inbound.data, telemetry.extract(inbound.headers))
            with telemetry.process_span(
                tracer,
                stream=STREAM_IN,
                subject=raw.subject,
                data=inbound.data,
                parent=parent,
                consumer=CONSUMER_INTAKE,
                links=links,
            ):
                await processor.process(inbound)
        except TRANSIENT_ERRORS as exc:
            failure = exc
            delay = min(backoff_delay(retry_delay, attempt), MAX_IN_PLACE_DELAY)
            log.warning("transient failure on %s (%s); retry %d in %.1fs", raw.subject[:128], exc, attempt, delay)
            with contextlib.suppress(Exception):
                await raw.in_progress()
            await asyncio.sleep(delay)
            continue
        except Exception as exc:
            log.exception("processing %s failed", raw.subject[:128])
            return exc
        await raw.ack()
        return None
    return failure or RuntimeError("transient failures kept happening")


async def request_span_parent(
    processor: IntakeProcessor, data: bytes, inbound: Context
) -> tuple[Context, list[trace.Link]]:
    """Where intake's span of a submission hangs: one trace per request (``telemetry.request_parent``).

    A department's event (published days later, with no or its own trace context) becomes a child of
    the request's first span, linked to its publisher; a Baton service's event (routing's, carrying
    the request's trace) a child of the span that published it; a ``created`` starts the request's trace.
    """
    request_id = telemetry.event_attributes("", data).get(telemetry.REQUEST_ID)
    anchor = await processor.trace_anchor(str(request_id)) if request_id else None
    return telemetry.request_parent(anchor, inbound)


def backoff_delay(base: float, num_delivered: int, cap: float = MAX_RETRY_DELAY) -> float:
    """Exponential redelivery delay: base, 2*base, 4*base, ... capped (a database outage is waited out)."""
    return float(min(base * 2 ** max(num_delivered - 1, 0), cap))


async def raw_batch(msg: NatsMessage) -> list[bytes]:
    """Hand the handler raw bytes: intake parses and explains bad JSON itself."""
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
failpoint = Failpoint("BATON_INTAKE_FAILPOINT", log)
