"""Metrics' behaviour: checking a canonical event, and a request's timeline computed from its stored events.

Pure functions, no I/O and no FastStream: everything here is unit-tested directly.

The timeline is derived at read time from the canonical events ordered by ``sequence``,
so the order in which they arrived does not matter. Everything derived (state, holder,
holds, segments, deadlines, SLA flags) uses only the *contiguous prefix* ``1..k`` of the
stored sequences: a gap means an event has not arrived yet, and nothing after it can be
trusted. ``complete`` and ``missing_sequences`` say so; ``derived_through`` is ``k``.

Business time is ``occurred_at`` (what the department says happened when);
``recorded_at`` (when intake appended the event) is kept alongside.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from libs.contracts import SYSTEM_DEPARTMENT, error_list, parse_event
from libs.contracts.envelope import Envelope
from libs.contracts.events import (
    Accepted,
    Commented,
    Created,
    Declined,
    Delayed,
    Escalated,
    Feedback,
    HandoffLoopDetected,
    LifecycleEvent,
    Reassigned,
    Reopened,
    Resolved,
    Returned,
    Routed,
    SlaWarning,
)
from libs.contracts.notifications import FieldError, Role
from libs.contracts.subjects import SubjectError, event_subject

from .facts import accept_clock, build_facts, resolve_clock

#: Fields of the envelope; an event's ``detail`` is everything else (and not ``type``).
ENVELOPE_FIELDS: frozenset[str] = frozenset(Envelope.model_fields) | {"type"}
SUMMARY_TEXT_LIMIT = 120

StateName = Literal[
    "created", "routed", "accepted", "delayed", "declined", "reassigned", "reopened", "returned", "resolved", "closed"
]
#: The state a request is in after each event type; None = the event does not change the state.
STATE_AFTER: dict[str, StateName | None] = {
    "created": "created",
    "routed": "routed",
    "accepted": "accepted",
    "delayed": "delayed",
    "declined": "declined",
    "reassigned": "reassigned",
    "reopened": "reopened",
    "returned": "returned",
    "resolved": "resolved",
    "feedback": "closed",
    "commented": None,
    "sla_warning": None,
    "escalated": None,
    "handoff_loop_detected": None,
}


# --- checking a message from the canonical log -------------------------------------------
@dataclass(frozen=True)
class Canonical:
    """A canonical event that passed every check: sequence and recorded_at are set."""

    event: LifecycleEvent
    sequence: int
    recorded_at: datetime


@dataclass(frozen=True)
class Poison:
    """Why a message from the canonical log can never be projected (it is dead-lettered, then acked)."""

    code: str  # a DLQ subject token: ^[a-z][a-z_]{1,31}$
    message: str
    errors: tuple[FieldError, ...] = ()
    event_id: str | None = None


def check_canonical(subject: str, data: bytes) -> Canonical | Poison:
    """Validate a message from ``baton.events.<request_id>.<type>`` without stored state."""
    try:
        event = parse_event(data)
    except ValidationError as exc:
        errors = tuple(error_list(exc))
        if any(e.code == "json_invalid" for e in errors):
            return Poison("malformed_json", f"payload is not valid JSON: {errors[0].message}", errors)
        summary = "; ".join(f"{'.'.join(map(str, e.loc)) or '(root)'}: {e.message}" for e in errors[:5])
        return Poison("validation_failed", f"invalid event: {summary}", errors)
    if event.sequence is None or event.recorded_at is None:
        missing = [name for name in ("sequence", "recorded_at") if getattr(event, name) is None]
        errors = tuple(FieldError(loc=[n], code="missing", message="set by intake") for n in missing)
        return Poison("not_canonical", f"canonical events carry {' and '.join(missing)}", errors, event.event_id)
    try:
        expected = event_subject(event.request_id, event.type)
    except SubjectError as exc:  # pragma: no cover - the contract already checked both tokens
        return Poison("subject_mismatch", str(exc), (), event.event_id)
    if subject != expected:
        msg = f"subject {subject[:200]!r} does not match the event (expected {expected!r})"
        return Poison("subject_mismatch", msg, (), event.event_id)
    return Canonical(event, event.sequence, event.recorded_at)


def parties(event: LifecycleEvent) -> set[tuple[str, Role]]:
    """The departments an event makes party to its request, and in which role."""
    if isinstance(event, Created):
        return {(event.requester.department, Role.REQUESTER)} | {(w, Role.WATCHER) for w in event.watchers}
    if isinstance(event, Routed):
        return {(event.provider_department, Role.PROVIDER)}
    if isinstance(event, Reassigned):
        return {(event.actor.department, Role.PROVIDER), (event.to_department, Role.PROVIDER)}
    if event.actor.department == SYSTEM_DEPARTMENT:
        return set()
    return {(event.actor.department, Role.PROVIDER)}


# --- the timeline ------------------------------------------------------------------------
class SegmentKind(StrEnum):
    WAITING = "waiting"  # created -> routed (unassigned), routed -> accepted (waiting for acceptance)
    WORKING = "working"  # accepted -> next event, except after a delay
    DELAYED = "delayed"  # delayed -> next event


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


class ActorOut(_Out):
    department: str
    person: str


class TimelineEvent(_Out):
    sequence: int
    type: str
    event_id: str
    occurred_at: datetime
    recorded_at: datetime | None
    actor: ActorOut
    summary: str = Field(description="One short human line.")
    detail: dict[str, Any] = Field(description="The event's own fields, without the envelope.")


class Hold(_Out):
    """A department holding the request: the requester until it is routed, then each provider."""

    department: str
    role: Role
    note: str | None = None
    from_: datetime = Field(alias="from")
    to: datetime | None = Field(description="None while the department still holds the request.")
    seconds: float


class Segment(_Out):
    kind: SegmentKind
    department: str | None = Field(description="The department the clock runs against; None while unassigned.")
    note: str
    from_: datetime = Field(alias="from")
    to: datetime | None = Field(description="None for the segment still running.")
    seconds: float


class Deadlines(_Out):
    accept_by: datetime | None = Field(default=None, description="From the latest routed event.")
    resolve_by: datetime | None = Field(default=None, description="From the latest routed event.")
    eta: datetime | None = Field(default=None, description="The current ETA: accepted.eta, moved by delayed.new_eta.")
    due_by: datetime | None = Field(default=None, description="What the requester asked for, from created.")


class Sla(_Out):
    accept_breached: bool | None = Field(default=None, description="None when there is no accept_by.")
    resolve_breached: bool | None = Field(default=None, description="None when there is no resolve_by.")


class SlaClock(_Out):
    """One holder's accept or resolve clock as routing judged it (see docs/metrics.md, "SLA clocks")."""

    department: str
    clock: str
    deadline: datetime | None
    breached: bool
    escalated: bool
    settled_at: datetime | None = Field(description="When it was met or breached; None while it runs.")


class Timeline(_Out):
    request_id: str
    title: str | None
    category: str | None
    priority: str | None
    state: StateName | None = Field(description="Named after the last event of the contiguous prefix.")
    requester_department: str | None
    holder_department: str | None = Field(description="Who holds the request now (or, once resolved, held it last).")
    trace_id: str | None
    complete: bool = Field(description="True when the stored sequences are exactly 1..last_sequence.")
    missing_sequences: list[int]
    last_sequence: int
    derived_through: int = Field(description="Holds, segments, state and SLA use events 1..derived_through only.")
    events: list[TimelineEvent]
    holds: list[Hold]
    segments: list[Segment]
    totals: dict[str, float] = Field(description="Seconds per segment kind.")
    deadlines: Deadlines
    sla: Sla
    sla_clocks: list[SlaClock] = Field(
        default_factory=list,
        description="Every holder's clocks, judged by routing's deadlines, notices and escalations (pauses included).",
    )
    computed_at: datetime


class RequestSummary(_Out):
    request_id: str
    title: str | None
    category: str | None
    priority: str | None
    state: StateName | None
    requester_department: str | None
    holder_department: str | None
    eta: datetime | None
    complete: bool
    last_sequence: int
    last_event_at: datetime
    accept_breached: bool | None
    resolve_breached: bool | None


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _seconds(start: datetime, end: datetime) -> float:
    """Elapsed seconds; 0 when the clocks disagree (occurred_at is the publisher's word)."""
    return max(0.0, (end - start).total_seconds())


def _short(text: str, limit: int = SUMMARY_TEXT_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(value: datetime) -> str:
    return _utc(value).strftime("%Y-%m-%d %H:%M UTC")


def summarize(event: LifecycleEvent) -> str:
    """One short human line: who did what, and the essentials."""
    who = f"{event.actor.person} ({event.actor.department})"
    if isinstance(event, Created):
        due = f", due {_when(event.due_by)}" if event.due_by else ""
        return f'{who} raised "{_short(event.title, 80)}" ({event.category}, {event.priority} priority{due})'
    if isinstance(event, Routed):
        text = f"Routed to {event.provider_department}"
        if event.previous_department:
            text += f" from {event.previous_department}"
        text += f" by rule {event.rule}"
        return text + (f": {_short(event.reason)}" if event.reason else "")
    if isinstance(event, Accepted):
        return f"{who} accepted; {_short(event.assignee, 60)} expects to finish by {_when(event.eta)}"
    if isinstance(event, Delayed):
        return f"{who} moved the ETA to {_when(event.new_eta)}: {_short(event.reason)}"
    if isinstance(event, Resolved):
        return f"{who} resolved it ({event.outcome}): {_short(event.resolution)}"
    if isinstance(event, Declined):
        return f"{who} declined it: {_short(event.reason)}"
    if isinstance(event, Reassigned):
        return f"{who} handed it to {event.to_department}: {_short(event.reason)}"
    if isinstance(event, Reopened):
        return f"{who} reopened it: {_short(event.reason)}"
    if isinstance(event, Feedback):
        comment = f": {_short(event.comment)}" if event.comment else ""
        return f"{who} rated it {event.rating}/5{comment}"
    if isinstance(event, Commented):
        return f"{who} commented: {_short(event.comment)}"
    if isinstance(event, Returned):
        return f"Returned to the requester: {_short(event.reason)}"
    if isinstance(event, SlaWarning):
        return f"SLA warning: {event.department} must {event.clock} by {_when(event.deadline)}"
    if isinstance(event, Escalated):
        hours = event.overdue_seconds / 3600
        return f"Escalated: {event.department} missed its {event.clock} deadline by {hours:.1f} h"
    assert isinstance(event, HandoffLoopDetected)
    return f"Handoff loop ({event.pattern}): {' → '.join(event.chain)}"


def detail(event: LifecycleEvent) -> dict[str, Any]:
    return event.model_dump(mode="json", exclude=set(ENVELOPE_FIELDS))


def timeline_event(event: LifecycleEvent) -> TimelineEvent:
    assert event.sequence is not None
    return TimelineEvent(
        sequence=event.sequence,
        type=event.type,
        event_id=event.event_id,
        occurred_at=event.occurred_at,
        recorded_at=event.recorded_at,
        actor=ActorOut(department=event.actor.department, person=event.actor.person),
        summary=summarize(event),
        detail=detail(event),
    )


@dataclass
class _Open:
    """A hold or segment that has started and not ended yet."""

    department: str | None
    note: str
    start: datetime
    role: Role = Role.PROVIDER
    kind: SegmentKind = SegmentKind.WAITING


@dataclass
class _Fold:
    """Walks the contiguous prefix once, in sequence order."""

    created: Created | None = None
    state: StateName | None = None
    holds: list[Hold] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    hold: _Open | None = None
    segment: _Open | None = None
    last_holder: str | None = None
    deadlines: Deadlines = field(default_factory=Deadlines)
    accepted_at: datetime | None = None  # since the latest routing
    resolved_at: datetime | None = None

    def open_hold(self, department: str, role: Role, note: str | None, at: datetime) -> None:
        self.close_hold(at)
        self.hold = _Open(department, note or "", at, role=role)
        self.last_holder = department

    def close_hold(self, at: datetime) -> None:
        if self.hold is not None:
            self.holds.append(self._hold(self.hold, at, at))
            self.hold = None

    def open_segment(self, kind: SegmentKind, department: str | None, note: str, at: datetime) -> None:
        self.close_segment(at)
        self.segment = _Open(department, note, at, kind=kind)

    def close_segment(self, at: datetime) -> None:
        if self.segment is not None:
            self.segments.append(self._segment(self.segment, at, at))
            self.segment = None

    @staticmethod
    def _hold(o: _Open, to: datetime | None, end: datetime) -> Hold:
        assert o.department is not None
        return Hold(
            department=o.department,
            role=o.role,
            note=o.note or None,
            from_=o.start,
            to=to,
            seconds=_seconds(o.start, end),
        )

    @staticmethod
    def _segment(o: _Open, to: datetime | None, end: datetime) -> Segment:
        return Segment(
            kind=o.kind, department=o.department, note=o.note, from_=o.start, to=to, seconds=_seconds(o.start, end)
        )

    def apply(self, event: LifecycleEvent) -> None:
        at = _utc(event.occurred_at)
        holder = self.last_holder
        if isinstance(event, Created):
            self.created = event
            self.deadlines = self.deadlines.model_copy(update={"due_by": _opt_utc(event.due_by)})
            self.open_hold(event.requester.department, Role.REQUESTER, "waiting for routing", at)
            self.open_segment(SegmentKind.WAITING, None, "unassigned: waiting for routing", at)
        elif isinstance(event, Routed):
            self.open_hold(event.provider_department, Role.PROVIDER, None, at)
            self.open_segment(SegmentKind.WAITING, event.provider_department, "waiting for acceptance", at)
            self.deadlines = self.deadlines.model_copy(
                update={"accept_by": _opt_utc(event.accept_by), "resolve_by": _opt_utc(event.resolve_by)}
            )
            self.accepted_at = self.resolved_at = None
        elif isinstance(event, Accepted):
            self.open_segment(SegmentKind.WORKING, holder, f"{_short(event.assignee, 60)} working", at)
            self.deadlines = self.deadlines.model_copy(update={"eta": _utc(event.eta)})
            self.accepted_at = self.accepted_at or at
        elif isinstance(event, Delayed):
            self.open_segment(SegmentKind.DELAYED, holder, f"delayed: {_short(event.reason, 80)}", at)
            self.deadlines = self.deadlines.model_copy(update={"eta": _utc(event.new_eta)})
        elif isinstance(event, Resolved):
            self.close_segment(at)
            self.close_hold(at)
            self.resolved_at = at
        elif isinstance(event, Declined):
            assert self.created is not None
            note = f"declined by {event.actor.department}: {_short(event.reason, 80)}; waiting for routing"
            self.open_hold(self.created.requester.department, Role.REQUESTER, note, at)
            self.last_holder = None
            self.open_segment(SegmentKind.WAITING, None, note, at)
        elif isinstance(event, Returned):
            assert self.created is not None
            self.open_hold(self.created.requester.department, Role.REQUESTER, f"returned: {_short(event.reason)}", at)
            self.last_holder = None
            self.close_segment(at)
        elif isinstance(event, Reassigned):
            note = f"reassigned by {event.actor.department}: {_short(event.reason, 80)}; waiting for acceptance"
            self.open_hold(event.to_department, Role.PROVIDER, None, at)
            self.open_segment(SegmentKind.WAITING, event.to_department, note, at)
            self.deadlines = self.deadlines.model_copy(update={"eta": None})
            self.accepted_at = self.resolved_at = None
        elif isinstance(event, Reopened) and holder is not None:
            self.open_hold(holder, Role.PROVIDER, "reopened", at)
            self.open_segment(SegmentKind.WAITING, holder, f"reopened: {_short(event.reason, 80)}", at)
            self.deadlines = self.deadlines.model_copy(update={"eta": None})
            self.accepted_at = self.resolved_at = None
        new_state = STATE_AFTER.get(event.type)
        if new_state is not None:
            self.state = new_state

    def finish(self, now: datetime) -> None:
        if self.hold is not None:
            self.holds.append(self._hold(self.hold, None, now))
            self.hold = None
        if self.segment is not None:
            self.segments.append(self._segment(self.segment, None, now))
            self.segment = None

    def sla(self, now: datetime) -> Sla:
        d = self.deadlines
        return Sla(
            accept_breached=None if d.accept_by is None else (self.accepted_at or now) > d.accept_by,
            resolve_breached=None if d.resolve_by is None else (self.resolved_at or now) > d.resolve_by,
        )


def _opt_utc(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


def build_timeline(events: Iterable[LifecycleEvent], now: datetime) -> Timeline:
    """The timeline of one request from its canonical events, in any order (duplicates by sequence are ignored).

    Raises ``ValueError`` when there is no event, or an event has no sequence.
    """
    now = _utc(now)
    by_sequence: dict[int, LifecycleEvent] = {}
    for event in events:
        if event.sequence is None:
            raise ValueError(f"event {event.event_id} has no sequence: not a canonical event")
        by_sequence.setdefault(event.sequence, event)
    if not by_sequence:
        raise ValueError("a timeline needs at least one event")
    last_sequence = max(by_sequence)
    missing = [s for s in range(1, last_sequence + 1) if s not in by_sequence]
    ordered = [by_sequence[s] for s in sorted(by_sequence)]

    fold = _Fold()
    derived_through = 0
    while derived_through + 1 in by_sequence:
        derived_through += 1
        fold.apply(by_sequence[derived_through])
    sla = fold.sla(now)
    fold.finish(now)

    facts = build_facts(by_sequence.values())
    clocks = [
        SlaClock(
            department=c.department,
            clock=c.clock,
            deadline=c.deadline,
            breached=c.breached,
            escalated=c.escalated,
            settled_at=c.settled_at,
        )
        for stint in facts.stints
        for c in (accept_clock(stint, now), resolve_clock(stint, now))
        if c is not None
    ]
    totals = {kind.value: 0.0 for kind in SegmentKind}
    for segment in fold.segments:
        totals[segment.kind.value] += segment.seconds
    created = fold.created
    return Timeline(
        request_id=ordered[0].request_id,
        title=created.title if created else None,
        category=created.category if created else None,
        priority=created.priority.value if created else None,
        state=fold.state,
        requester_department=created.requester.department if created else None,
        holder_department=fold.last_holder,
        trace_id=next((e.trace_id for e in ordered if e.trace_id), None),
        complete=not missing,
        missing_sequences=missing,
        last_sequence=last_sequence,
        derived_through=derived_through,
        events=[timeline_event(e) for e in ordered],
        holds=fold.holds,
        segments=fold.segments,
        totals=totals,
        deadlines=fold.deadlines,
        sla=sla,
        sla_clocks=clocks,
        computed_at=now,
    )


def summary_of(timeline: Timeline) -> RequestSummary:
    """The one-line view of a request for lists."""
    return RequestSummary(
        request_id=timeline.request_id,
        title=timeline.title,
        category=timeline.category,
        priority=timeline.priority,
        state=timeline.state,
        requester_department=timeline.requester_department,
        holder_department=timeline.holder_department,
        eta=timeline.deadlines.eta,
        complete=timeline.complete,
        last_sequence=timeline.last_sequence,
        last_event_at=timeline.events[-1].occurred_at,
        accept_breached=timeline.sla.accept_breached,
        resolve_breached=timeline.sla.resolve_breached,
    )
