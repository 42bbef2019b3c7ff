"""The per-request facts projection: what every KPI is computed from.

Pure functions, no I/O. ``build_facts`` folds a request's canonical events, in sequence order and
over the *contiguous prefix* ``1..k`` only (like the timeline), into one :class:`RequestFacts`:
who held the request as provider and when (a :class:`Stint` per handoff), each acceptance, ETA,
delay, SLA deadline and escalation, declines, reassignments, reopenings, loops and the feedback.

The facts are a function of the *set* of stored events and nothing else (no clock), so the live
projection, updated event by event in whatever order the events arrive, and a rebuild from the log
give the same facts. Whatever depends on "now" (ages, clocks still running) is evaluated later by
:mod:`services.metrics.kpis`.

SLA clocks. Routing owns the SLA math (business hours, holidays, pauses); metrics never recomputes
it. A clock is *breached* when routing escalated it, or when it finished (or, still running, is
observed) after its deadline: the latest deadline routing announced for that clock in an
``sla_warning``/``escalated`` notice, else the ``accept_by``/``resolve_by`` of the ``routed``
event. A pausing delay (``waiting_on_requester``; ``waiting_on_vendor`` or ``waiting_on_department``
with a ``blocking_department``) moves the resolve deadline by an amount only routing knows: when such
a delay started before the deadline (and no later notice restated it), only routing's ``escalated``
decides a resolve breach.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

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

#: Delay reason codes with which routing pauses the holder's resolve clock (the last two only with a
#: ``blocking_department`` to charge the wait to; see docs/routing.md, "Waits").
PAUSING_REASONS: frozenset[str] = frozenset({"waiting_on_requester", "waiting_on_vendor", "waiting_on_department"})


def pauses(reason_code: str | None, blocking_department: str | None) -> bool:
    return reason_code == "waiting_on_requester" or (reason_code in PAUSING_REASONS and blocking_department is not None)


#: Request states after which the request is no longer open.
TERMINAL_STATES: frozenset[str] = frozenset({"resolved", "closed", "returned"})

Via = Literal["routed", "reassigned", "reopened"]
EndKind = Literal["resolved", "declined", "reassigned", "returned", "handed_off"]
ClockName = Literal["accept", "resolve"]


class _Fact(BaseModel):
    model_config = ConfigDict(frozen=False, extra="forbid")


class DelayFact(_Fact):
    department: str
    at: datetime
    until: datetime | None = None  # the next event that moved the request on; None while it runs
    #: For ``waiting_on_requester``: when the requester answered with a comment (ends the wait, not the delay).
    answered_at: datetime | None = None
    reason: str
    reason_code: str | None = None
    blocking_department: str | None = None
    previous_eta: datetime | None = None
    new_eta: datetime


class EscalationFact(_Fact):
    clock: ClockName
    at: datetime
    deadline: datetime
    overdue_seconds: float
    episode: int = 1


class Stint(_Fact):
    """One department holding the request as its provider, from a handoff to the end of that hold."""

    department: str
    via: Via
    from_department: str | None = None
    start: datetime
    accept_by: datetime | None = None
    resolve_by: datetime | None = None
    accepted_at: datetime | None = None
    assignee: str | None = None
    first_eta: datetime | None = None
    eta: datetime | None = None  # the last committed ETA
    end: datetime | None = None
    end_kind: EndKind | None = None
    outcome: str | None = None
    delays: list[DelayFact] = []
    escalations: list[EscalationFact] = []
    #: The latest deadline routing announced per clock (sla_warning / escalated), if any.
    notice_accept_by: datetime | None = None
    notice_resolve_by: datetime | None = None
    #: When a pausing delay started (since the last resolve-deadline notice): a deadline after it is
    #: no longer known to metrics, and only ``escalated`` decides.
    paused_since: datetime | None = None

    def escalated(self, clock: ClockName) -> EscalationFact | None:
        return next((e for e in self.escalations if e.clock == clock), None)


class LoopFact(_Fact):
    at: datetime
    pattern: str
    chain: list[str]


class DeclineFact(_Fact):
    at: datetime
    department: str
    reason: str


class ReopenFact(_Fact):
    at: datetime
    department: str | None  # who had resolved it
    reason: str


class FeedbackFact(_Fact):
    at: datetime
    department: str | None  # who had resolved it
    rating: int
    comment: str = ""


class RequestFacts(_Fact):
    request_id: str
    title: str | None = None
    category: str | None = None
    priority: str | None = None
    requester: str | None = None
    watchers: list[str] = []
    created_at: datetime | None = None
    state: str | None = None
    holder: str | None = None  # the provider holding it now (None while unassigned or back with the requester)
    resolved_at: datetime | None = None  # the latest resolution (reopening clears it)
    first_resolved_at: datetime | None = None
    returned_at: datetime | None = None
    last_event_at: datetime | None = None
    derived_through: int = 0
    last_sequence: int = 0
    stints: list[Stint] = []
    declines: list[DeclineFact] = []
    reopens: list[ReopenFact] = []
    loops: list[LoopFact] = []
    feedback: FeedbackFact | None = None

    @property
    def open(self) -> bool:
        return self.state is not None and self.state not in TERMINAL_STATES

    @property
    def current(self) -> Stint | None:
        last = self.stints[-1] if self.stints else None
        return last if last is not None and last.end is None else None

    def last_resolver(self) -> str | None:
        return next((s.department for s in reversed(self.stints) if s.end_kind == "resolved"), None)

    def departments(self) -> set[str]:
        out = {s.department for s in self.stints}
        if self.requester:
            out.add(self.requester)
        return out


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _opt(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


@dataclass
class _Fold:
    facts: RequestFacts

    def end_stint(self, at: datetime, kind: EndKind, outcome: str | None = None) -> None:
        stint = self.facts.current
        if stint is not None:
            stint.end, stint.end_kind, stint.outcome = at, kind, outcome
        self.end_delay(at)

    def end_delay(self, at: datetime) -> None:
        for stint in self.facts.stints[-1:]:
            for delay in stint.delays[-1:]:
                if delay.until is None:
                    delay.until = at

    def start_stint(self, department: str, via: Via, at: datetime, from_department: str | None) -> Stint:
        stint = Stint(department=department, via=via, from_department=from_department, start=at)
        self.facts.stints.append(stint)
        self.facts.holder = department
        return stint

    def stint_of(self, department: str) -> Stint | None:
        current = self.facts.current
        if current is not None and current.department == department:
            return current
        return next((s for s in reversed(self.facts.stints) if s.department == department), None)

    def apply(self, event: LifecycleEvent) -> None:
        f = self.facts
        at = _utc(event.occurred_at)
        f.last_event_at = at
        stint: Stint | None
        if isinstance(event, Created):
            f.title, f.category, f.priority = event.title, event.category, event.priority.value
            f.requester, f.watchers, f.created_at = event.requester.department, list(event.watchers), at
            f.state = "created"
        elif isinstance(event, Routed):
            current = f.current
            if current is not None and current.department == event.provider_department and current.accepted_at is None:
                stint = current  # routing restating the deadlines of a handoff that already happened
            else:
                self.end_stint(at, "handed_off")
                previous = event.previous_department or (f.stints[-1].department if f.stints else None)
                stint = self.start_stint(event.provider_department, "routed", at, previous)
            stint.accept_by, stint.resolve_by = _opt(event.accept_by), _opt(event.resolve_by)
            f.state = "routed"
        elif isinstance(event, Accepted):
            self.end_delay(at)
            stint = f.current
            if stint is not None:
                if stint.accepted_at is None:
                    stint.accepted_at, stint.assignee, stint.first_eta = at, event.assignee, _utc(event.eta)
                stint.eta = _utc(event.eta)
            f.state = "accepted"
        elif isinstance(event, Delayed):
            self.end_delay(at)
            stint = f.current
            if stint is not None:
                code = event.reason_code.value if event.reason_code else None
                stint.delays.append(
                    DelayFact(
                        department=stint.department,
                        at=at,
                        reason=event.reason,
                        reason_code=code,
                        blocking_department=event.blocking_department,
                        previous_eta=stint.eta,
                        new_eta=_utc(event.new_eta),
                    )
                )
                stint.eta = _utc(event.new_eta)
                if pauses(code, event.blocking_department) and stint.paused_since is None:
                    stint.paused_since = at
            f.state = "delayed"
        elif isinstance(event, Resolved):
            self.end_stint(at, "resolved", event.outcome.value)
            f.resolved_at = at
            f.first_resolved_at = f.first_resolved_at or at
            f.state = "resolved"
        elif isinstance(event, Declined):
            self.end_stint(at, "declined")
            f.declines.append(DeclineFact(at=at, department=event.actor.department, reason=event.reason))
            f.holder = None
            f.state = "declined"
        elif isinstance(event, Reassigned):
            self.end_stint(at, "reassigned")
            self.start_stint(event.to_department, "reassigned", at, event.actor.department)
            f.state = "reassigned"
        elif isinstance(event, Reopened):
            resolver = f.last_resolver()
            f.reopens.append(ReopenFact(at=at, department=resolver, reason=event.reason))
            if resolver is not None:
                self.start_stint(resolver, "reopened", at, None)
            f.resolved_at = None
            f.state = "reopened"
        elif isinstance(event, Returned):
            self.end_stint(at, "returned")
            f.holder = None
            f.returned_at = at
            f.state = "returned"
        elif isinstance(event, Feedback):
            f.feedback = FeedbackFact(at=at, department=f.last_resolver(), rating=event.rating, comment=event.comment)
            f.state = "closed"
        elif isinstance(event, SlaWarning | Escalated):
            stint = self.stint_of(event.department)
            if stint is not None:
                deadline = _utc(event.deadline)
                if event.clock.value == "accept":
                    stint.notice_accept_by = deadline
                else:
                    stint.notice_resolve_by = deadline
                    stint.paused_since = None
                if isinstance(event, Escalated):
                    stint.escalations.append(
                        EscalationFact(
                            clock=event.clock.value,
                            at=at,
                            deadline=deadline,
                            overdue_seconds=event.overdue_seconds,
                            episode=event.episode,
                        )
                    )
        elif isinstance(event, HandoffLoopDetected):
            f.loops.append(LoopFact(at=at, pattern=event.pattern.value, chain=list(event.chain)))
        else:
            assert isinstance(event, Commented)
            current = f.current
            if current is not None and current.delays and event.actor.department == f.requester:
                wait = current.delays[-1]
                if wait.reason_code == "waiting_on_requester" and wait.until is None and wait.answered_at is None:
                    wait.answered_at = at  # the requester answered: the wait charged to it ends


def build_facts(events: Iterable[LifecycleEvent]) -> RequestFacts:
    """The facts of one request from its canonical events, in any order (duplicate sequences ignored).

    Only the contiguous prefix ``1..k`` is folded. Raises ``ValueError`` without events.
    """
    by_sequence: dict[int, LifecycleEvent] = {}
    for event in events:
        if event.sequence is None:
            raise ValueError(f"event {event.event_id} has no sequence: not a canonical event")
        by_sequence.setdefault(event.sequence, event)
    if not by_sequence:
        raise ValueError("facts need at least one event")
    first = by_sequence[min(by_sequence)]
    fold = _Fold(RequestFacts(request_id=first.request_id, last_sequence=max(by_sequence)))
    while fold.facts.derived_through + 1 in by_sequence:
        fold.facts.derived_through += 1
        fold.apply(by_sequence[fold.facts.derived_through])
    return fold.facts


# --- SLA clocks ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Clock:
    """One SLA clock of one stint, as far as it can be judged at ``now``."""

    department: str
    clock: ClockName
    deadline: datetime | None
    settled_at: datetime | None  # when it was met or breached; None while it runs within its deadline
    breached: bool
    escalated: bool


def _judge(
    stint: Stint,
    clock: ClockName,
    deadline: datetime | None,
    done_at: datetime | None,
    now: datetime,
    trust_deadline: bool,
) -> Clock | None:
    escalation = stint.escalated(clock)
    if deadline is None and escalation is None:
        return None
    if escalation is not None:
        settled = min(escalation.at, done_at) if done_at is not None else escalation.at
        return Clock(stint.department, clock, deadline or escalation.deadline, settled, True, True)
    assert deadline is not None
    if done_at is not None:
        late = trust_deadline and done_at > deadline
        return Clock(stint.department, clock, deadline, deadline if late else done_at, late, False)
    if trust_deadline and now > deadline:
        return Clock(stint.department, clock, deadline, deadline, True, False)
    return Clock(stint.department, clock, deadline, None, False, False)


def accept_clock(stint: Stint, now: datetime) -> Clock | None:
    """The accept clock: answered by accepting, declining or handing on; None without a deadline."""
    deadline = stint.notice_accept_by or stint.accept_by
    answered = stint.accepted_at or (stint.end if stint.end_kind in {"declined", "reassigned", "handed_off"} else None)
    if stint.end is not None and answered is None:
        answered = stint.end  # returned before an answer: the clock stopped there
    return _judge(stint, "accept", deadline, answered, now, trust_deadline=True)


def resolve_clock(stint: Stint, now: datetime) -> Clock | None:
    """The resolve clock: met by resolving; a hold that ends otherwise counts only if it was already late."""
    if stint.accepted_at is None and stint.escalated("resolve") is None:
        return None
    deadline = stint.notice_resolve_by or stint.resolve_by
    trust = stint.paused_since is None or (deadline is not None and deadline <= stint.paused_since)
    if stint.end is not None and stint.end_kind != "resolved":
        result = _judge(stint, "resolve", deadline, None, min(now, stint.end), trust)
        return result if result is not None and result.breached else None
    return _judge(stint, "resolve", deadline, stint.end, now, trust)


# --- what changed (for Prometheus' business metrics) -------------------------------------------
@dataclass(frozen=True)
class Changes:
    """What became known when a request's facts moved from ``before`` to ``after``."""

    accepted: list[tuple[str, float]]  # (department, seconds from handoff to acceptance)
    resolved: list[tuple[str, float]]  # (department, seconds from handoff to resolution)
    delays: list[tuple[str, str]]  # (department, reason code or "unspecified")
    escalations: list[tuple[str, str]]  # (department, clock)


def changes(before: RequestFacts | None, after: RequestFacts) -> Changes:
    accepted: list[tuple[str, float]] = []
    resolved: list[tuple[str, float]] = []
    delays: list[tuple[str, str]] = []
    escalations: list[tuple[str, str]] = []
    old = before.stints if before is not None else []
    for index, stint in enumerate(after.stints):
        prior = old[index] if index < len(old) else None
        if stint.accepted_at is not None and (prior is None or prior.accepted_at is None):
            accepted.append((stint.department, max(0.0, (stint.accepted_at - stint.start).total_seconds())))
        if stint.end_kind == "resolved" and stint.end is not None and (prior is None or prior.end_kind != "resolved"):
            resolved.append((stint.department, max(0.0, (stint.end - stint.start).total_seconds())))
        for delay in stint.delays[len(prior.delays) if prior else 0 :]:
            delays.append((stint.department, delay.reason_code or "unspecified"))
        for escalation in stint.escalations[len(prior.escalations) if prior else 0 :]:
            escalations.append((stint.department, escalation.clock))
    return Changes(accepted, resolved, delays, escalations)
