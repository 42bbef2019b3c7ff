"""Following a request through its handoffs: SLA clocks per holding department, waits, the handoff
chain, and what routing emits in answer. Pure: no I/O, no FastStream; the clock is passed in.

**Clocks.** Every handoff (``routed``, ``reassigned``, ``reopened``) opens two clocks for the
department that now holds the request, when the catalog gives it an SLA for the request's
priority: ``accept`` (stopped by ``accepted``) and ``resolve`` (stopped by ``resolved``). Both
count the holder's *business time* from the handoff. ``declined``, ``reassigned`` and
``returned`` close the holder's open clocks. The n-th time a department's clock of one kind runs
for a request is its *episode* n (e.g. after A -> B -> A, A's accept clock is in episode 2).

**Waits.** A ``delayed`` with ``reason_code: waiting_on_requester`` pauses the holder's resolve
clock and charges the wait to the requester; ``waiting_on_vendor`` / ``waiting_on_department``
with a ``blocking_department`` pause it and charge the wait to that department (without a
``blocking_department`` the clock keeps running: there is nobody else to charge). A wait ends
with the holder's next ``delayed`` (another reason resumes the clock; the same reason and party
continue the wait), ``resolved``, ``reassigned``, or, for ``waiting_on_requester``, a
``commented`` from the requester (the requester answered).

**Breaches.** A clock is breached once its used business time reaches its target. Routing emits
``escalated`` once per clock episode: at the deadline (a durable timer), or, when routing learns
of the breach from an event (it was down at the deadline and the clock stopped or paused since),
right then. ``sla_warning`` comes from the warning timer only (at ``warning_fraction`` of the
target) while the clock runs and has not breached. No notice is emitted for a request that is
resolved, returned or closed: intake refuses notices then, and the breach stays visible on the
clock (``GET /v1/requests/{id}/routing``).

**Handoff loops.** ``handoff_loop_detected`` when a handoff goes back to a department that held
the request before (A -> B -> A), when the chain has more than ``max_hops`` hops, or when a
department reassigns a request within ``quick_reassign_within`` of accepting it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from libs.contracts import Catalog, Created, Envelope, LifecycleEvent, Priority
from libs.contracts.events import (
    Accepted,
    Commented,
    Declined,
    Delayed,
    DelayReasonCode,
    Escalated,
    Feedback,
    LoopPattern,
    Reassigned,
    Reopened,
    Resolved,
    Returned,
    Routed,
    SlaClock,
)

from .business_time import BusinessCalendar, NoBusinessTime
from .domain import (
    RoutingRequest,
    build_escalated,
    build_loop,
    build_returned,
    build_routed,
    build_warning,
    calendar_of,
    choose,
    sla_targets,
)

ZERO = timedelta(0)


class Phase(StrEnum):
    CREATED = "created"
    ROUTED = "routed"  # held, not accepted yet (also after reassigned / reopened)
    ACCEPTED = "accepted"
    DECLINED = "declined"  # waiting for routing's next decision
    RETURNED = "returned"
    RESOLVED = "resolved"
    CLOSED = "closed"


#: Phases in which intake refuses routing's notices (sla_warning, escalated, handoff_loop_detected).
QUIET_PHASES = frozenset({Phase.RETURNED, Phase.RESOLVED, Phase.CLOSED})


class TimerKind(StrEnum):
    WARNING = "warning"
    BREACH = "breach"


@dataclass(frozen=True)
class Policy:
    """Routing's tunables (settings ``BATON_ROUTING_WARNING_FRACTION``, ``_MAX_HOPS``, ``_QUICK_REASSIGN_WITHIN``)."""

    warning_fraction: float = 0.75
    max_hops: int = 4
    quick_reassign_within: timedelta = timedelta(minutes=10)

    def __post_init__(self) -> None:
        if not 0 < self.warning_fraction < 1:
            raise ValueError("warning_fraction must be between 0 and 1")
        if self.max_hops < 1:
            raise ValueError("max_hops must be at least 1")


@dataclass
class Clock:
    """One department's accept or resolve clock for one request, in one episode."""

    request_id: str
    department: str
    kind: SlaClock
    episode: int
    target: timedelta
    opened_at: datetime
    consumed: timedelta = ZERO  # business time used in finished running segments
    running_since: datetime | None = None  # None: paused or closed
    closed_at: datetime | None = None
    close_reason: str | None = None
    breach_at: datetime | None = None  # set when a segment ends past the target
    warned: bool = False
    escalated: bool = False

    @property
    def clock_id(self) -> str:
        return f"{self.request_id}.{self.department}.{self.kind.value}.{self.episode}"

    @property
    def is_open(self) -> bool:
        return self.closed_at is None

    @property
    def is_running(self) -> bool:
        return self.running_since is not None

    def used(self, calendar: BusinessCalendar, at: datetime) -> timedelta:
        """Business time used up to ``at``."""
        if self.running_since is None:
            return self.consumed
        return self.consumed + calendar.elapsed(self.running_since, at)

    def deadline(self, calendar: BusinessCalendar) -> datetime | None:
        """When the clock breaches (or breached); None while paused before breaching, or without working time."""
        if self.breach_at is not None:
            return self.breach_at
        if self.running_since is None:
            return None
        try:
            return calendar.add(self.running_since, self.target - self.consumed)
        except NoBusinessTime:
            return None

    def warn_at(self, calendar: BusinessCalendar, fraction: float) -> datetime | None:
        """When the warning is due (None once warned, breached, paused or closed)."""
        if self.running_since is None or self.warned or self.escalated or self.breach_at is not None:
            return None
        try:
            return calendar.add(self.running_since, self.target * fraction - self.consumed)
        except NoBusinessTime:
            return None

    def breached(self, calendar: BusinessCalendar, at: datetime) -> bool:
        return self.breach_at is not None or (self.is_running and self.used(calendar, at) >= self.target)

    def stop(self, calendar: BusinessCalendar, at: datetime) -> None:
        """End the running segment at ``at`` (a pause, or before closing)."""
        if self.running_since is None:
            return
        at = max(at, self.running_since)
        spent = calendar.elapsed(self.running_since, at)
        if self.breach_at is None and self.consumed + spent >= self.target:
            self.breach_at = calendar.add(self.running_since, self.target - self.consumed)
        self.consumed += spent
        self.running_since = None

    def resume(self, at: datetime) -> None:
        if self.is_open and self.running_since is None:
            self.running_since = at

    def close(self, calendar: BusinessCalendar, at: datetime, reason: str) -> None:
        if not self.is_open:
            return
        self.stop(calendar, at)
        self.closed_at = at
        self.close_reason = reason


@dataclass
class Wait:
    """A pause of the holder's resolve clock, charged to another party."""

    holder: str
    charged_to: str
    reason_code: DelayReasonCode
    started_at: datetime
    caused_by: str
    ended_at: datetime | None = None


@dataclass
class Decline:
    department: str
    reason: str
    suggested: str | None
    event_id: str


@dataclass
class Track:
    """Everything routing keeps about one request."""

    request_id: str
    requester: str
    category: str
    priority: Priority
    title: str
    attributes: dict[str, str]
    requested_provider: str | None
    phase: Phase = Phase.CREATED
    holder: str | None = None
    chain: list[str] = field(default_factory=list)  # every department that held it, in order (with repeats)
    declines: list[Decline] = field(default_factory=list)
    accepted_at: datetime | None = None
    last_sequence: int = 0
    last_stream_seq: int = 0  # BATON_EVENTS sequence of the last canonical event applied
    clocks: list[Clock] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)

    @classmethod
    def of(cls, created: Created) -> Track:
        return cls(
            request_id=created.request_id,
            requester=created.requester.department,
            category=created.category,
            priority=created.priority,
            title=created.title,
            attributes=dict(created.attributes),
            requested_provider=created.provider_department,
        )

    @property
    def request(self) -> RoutingRequest:
        return RoutingRequest(
            category=self.category,
            title=self.title,
            priority=self.priority,
            requester=self.requester,
            requested_provider=self.requested_provider,
            attributes=self.attributes,
        )

    @property
    def open_wait(self) -> Wait | None:
        return next((w for w in reversed(self.waits) if w.ended_at is None), None)

    def clock(self, clock_id: str) -> Clock | None:
        return next((c for c in self.clocks if c.clock_id == clock_id), None)

    def open_clocks(self, department: str | None = None) -> list[Clock]:
        return [c for c in self.clocks if c.is_open and (department is None or c.department == department)]


@dataclass(frozen=True)
class Context:
    catalog: Catalog
    policy: Policy
    now: datetime  # routing's clock: the occurred_at of what it emits

    def calendar(self, department: str) -> BusinessCalendar:
        return calendar_of(self.catalog, department)


@dataclass(frozen=True)
class TimerSpec:
    """A timer the clock wants armed: ``kind`` is due at ``due_at``."""

    clock_id: str
    request_id: str
    department: str
    clock: SlaClock
    episode: int
    kind: TimerKind
    due_at: datetime


def event_time(event: Envelope) -> datetime:
    """When an event counts for the clocks: intake's ``recorded_at`` (a department cannot backdate it);
    for routing's own ``routed``, the decision time its deadlines were computed from."""
    if isinstance(event, Routed) or event.recorded_at is None:
        return event.occurred_at.astimezone(UTC)
    return event.recorded_at.astimezone(UTC)


# --- following the canonical log ---------------------------------------------------------------
def start(created: Created, ctx: Context) -> tuple[Track, list[Envelope]]:
    """A new request: its track, and the ``routed`` (or, with no department at all, ``returned``) event."""
    track = Track.of(created)
    track.last_sequence = created.sequence or 1
    return track, _route(track, created.event_id, ctx, previous=None)


def follow(track: Track, event: LifecycleEvent, ctx: Context) -> list[Envelope]:
    """Apply the next canonical event of ``track``'s request; what routing emits in answer, in order."""
    at = event_time(event)
    if event.sequence is not None:
        track.last_sequence = event.sequence
    emits: list[Envelope] = []

    if isinstance(event, Routed):
        emits += _handoff(track, event.provider_department, event, at, ctx, quick=False)
    elif isinstance(event, Accepted):
        for clock in _holder_clocks(track, SlaClock.ACCEPT):
            clock.close(ctx.calendar(clock.department), at, "accepted")
        track.phase = Phase.ACCEPTED
        track.accepted_at = at
        emits += _escalations(track, ctx, at)
    elif isinstance(event, Delayed):
        emits += _delayed(track, event, at, ctx)
    elif isinstance(event, Commented):
        wait = track.open_wait
        if (
            wait is not None
            and wait.reason_code is DelayReasonCode.WAITING_ON_REQUESTER
            and event.actor.department == track.requester
        ):
            _end_wait(track, at)
    elif isinstance(event, Resolved):
        _end_wait(track, at)
        _close_all(track, ctx, at, "resolved")
        track.phase = Phase.RESOLVED
    elif isinstance(event, Declined):
        _end_wait(track, at)
        _close_all(track, ctx, at, "declined")
        track.phase = Phase.DECLINED
        emits += _escalations(track, ctx, at)
        track.declines.append(Decline(event.actor.department, event.reason, event.suggested_department, event.event_id))
        track.holder = None
        emits += _route(
            track,
            event.event_id,
            ctx,
            previous=event.actor.department,
            suggested=event.suggested_department,
            suggested_by=event.actor.department,
        )
    elif isinstance(event, Reassigned):
        quick = (
            track.phase is Phase.ACCEPTED
            and track.accepted_at is not None
            and at - track.accepted_at <= ctx.policy.quick_reassign_within
        )
        _end_wait(track, at)
        _close_all(track, ctx, at, "reassigned")
        emits += _escalations(track, ctx, at)
        emits += _handoff(track, event.to_department, event, at, ctx, quick=quick)
    elif isinstance(event, Reopened):
        track.phase = Phase.ROUTED
        track.accepted_at = None
        if track.holder is not None:
            _open_clocks(track, track.holder, at, ctx)
    elif isinstance(event, Feedback):
        track.phase = Phase.CLOSED
    elif isinstance(event, Returned):
        _end_wait(track, at)
        _close_all(track, ctx, at, "returned")
        track.phase = Phase.RETURNED
        track.holder = None
    # created (a duplicate), sla_warning, escalated, handoff_loop_detected: nothing changes
    return emits


def _route(
    track: Track,
    caused_by: str,
    ctx: Context,
    *,
    previous: str | None,
    suggested: str | None = None,
    suggested_by: str | None = None,
) -> list[Envelope]:
    declined = [d.department for d in track.declines]
    choice = choose(
        ctx.catalog, track.request, excluded=frozenset(declined), suggested=suggested, suggested_by=suggested_by
    )
    if choice.department is None:
        reasons = "; ".join(f"{d.department} declined: {d.reason}" for d in track.declines)
        reason = f"{reasons}. {choice.reason}" if reasons else choice.reason
        return [build_returned(track.request_id, caused_by, reason, declined, ctx.now)]
    if track.declines and previous is not None:
        last = track.declines[-1]
        choice = replace(choice, reason=f"{last.department} declined: {last.reason}; {choice.reason}")
    return [build_routed(track.request_id, caused_by, choice, ctx.now, priority=track.priority, previous=previous)]


def _handoff(
    track: Track, to: str, event: Routed | Reassigned, at: datetime, ctx: Context, *, quick: bool
) -> list[Envelope]:
    """``to`` now holds the request: close what the previous holder had open, open ``to``'s clocks, check loops."""
    previous = track.holder
    if previous is not None and previous != to:
        _close_all(track, ctx, at, "handed off")
    track.holder = to
    track.phase = Phase.ROUTED
    track.accepted_at = None
    track.chain.append(to)
    _open_clocks(track, to, at, ctx)
    return _loops(track, event, quick, ctx)


def _open_clocks(track: Track, department: str, at: datetime, ctx: Context) -> None:
    targets = sla_targets(ctx.catalog.get(department), track.priority)
    if targets is None:
        return
    for kind, target in zip((SlaClock.ACCEPT, SlaClock.RESOLVE), targets, strict=True):
        episode = 1 + sum(1 for c in track.clocks if c.department == department and c.kind is kind)
        track.clocks.append(Clock(track.request_id, department, kind, episode, target, opened_at=at, running_since=at))


def _holder_clocks(track: Track, kind: SlaClock) -> list[Clock]:
    return [c for c in track.open_clocks(track.holder) if c.kind is kind]


def _close_all(track: Track, ctx: Context, at: datetime, reason: str) -> None:
    for clock in track.open_clocks():
        clock.close(ctx.calendar(clock.department), at, reason)


def _delayed(track: Track, event: Delayed, at: datetime, ctx: Context) -> list[Envelope]:
    code = event.reason_code
    charged_to: str | None = None
    if code is DelayReasonCode.WAITING_ON_REQUESTER:
        charged_to = track.requester
    elif code in (DelayReasonCode.WAITING_ON_VENDOR, DelayReasonCode.WAITING_ON_DEPARTMENT):
        charged_to = event.blocking_department
    if charged_to == track.holder:
        charged_to = None  # a department cannot wait on itself: its clock keeps running
    current = track.open_wait
    if current is not None and charged_to == current.charged_to and code is current.reason_code:
        return []  # the same wait goes on
    _end_wait(track, at)
    if charged_to is None or code is None or track.holder is None:
        return []
    track.waits.append(Wait(track.holder, charged_to, code, at, event.event_id))
    for clock in _holder_clocks(track, SlaClock.RESOLVE):
        clock.stop(ctx.calendar(clock.department), at)
    return _escalations(track, ctx, at)


def _end_wait(track: Track, at: datetime) -> None:
    wait = track.open_wait
    if wait is None:
        return
    wait.ended_at = at
    for clock in track.open_clocks(wait.holder):
        if clock.kind is SlaClock.RESOLVE:
            clock.resume(at)


def _escalations(track: Track, ctx: Context, at: datetime) -> list[Envelope]:
    """``escalated`` for every clock found breached (at ``at``) that has not been escalated yet."""
    out: list[Envelope] = []
    for clock in track.clocks:
        if clock.escalated:
            continue
        calendar = ctx.calendar(clock.department)
        if clock.breached(calendar, at):
            event = _escalate(track, clock, calendar, at, ctx)
            if event is not None:
                out.append(event)
    return out


def _escalate(track: Track, clock: Clock, calendar: BusinessCalendar, at: datetime, ctx: Context) -> Escalated | None:
    deadline = clock.deadline(calendar)
    if deadline is None or track.phase in QUIET_PHASES:
        return None
    clock.escalated = True
    until = clock.closed_at if clock.closed_at is not None else at
    return build_escalated(
        track.request_id, clock.department, clock.kind, clock.episode, deadline, until - deadline, ctx.now
    )


def _loops(track: Track, event: Routed | Reassigned, quick: bool, ctx: Context) -> list[Envelope]:
    if track.phase in QUIET_PHASES:
        return []
    chain = list(track.chain)
    shown = " -> ".join(chain)
    found: list[tuple[LoopPattern, str]] = []
    new = chain[-1]
    if new in chain[:-1]:
        found.append((LoopPattern.BOUNCE, f"{new} held this request before: {shown}"))
    hops = len(chain) - 1
    if hops > ctx.policy.max_hops:
        found.append((LoopPattern.TOO_MANY_HOPS, f"{hops} handoffs (more than {ctx.policy.max_hops}): {shown}"))
    if quick and isinstance(event, Reassigned):
        limit = int(ctx.policy.quick_reassign_within.total_seconds() // 60)
        found.append(
            (
                LoopPattern.QUICK_REASSIGN,
                f"{event.actor.department} accepted and then reassigned to {event.to_department} "
                f"within {limit} minutes: {shown}",
            )
        )
    return [build_loop(track.request_id, event.event_id, pattern, chain, detail, ctx.now) for pattern, detail in found]


# --- timers --------------------------------------------------------------------------------------
class TimerOutcome(StrEnum):
    FIRED = "fired"  # the notice is emitted now
    ALREADY = "already"  # emitted before (republish the stored event)
    EARLY = "early"  # not due yet (the deadline moved, or the server's clock is ahead): arm again
    STALE = "stale"  # the clock is closed or paused, or the notice no longer applies
    SUPPRESSED = "suppressed"  # breached, but the request is resolved/returned/closed: intake refuses notices
    UNKNOWN = "unknown"  # no such clock


@dataclass(frozen=True)
class TimerResult:
    outcome: TimerOutcome
    emits: tuple[Envelope, ...] = ()
    due_at: datetime | None = None  # for EARLY: when it is really due


def on_timer(track: Track, clock_id: str, kind: TimerKind, ctx: Context) -> TimerResult:
    """A durable timer went off at ``ctx.now``: emit the warning or the escalation if (still) due."""
    clock = track.clock(clock_id)
    if clock is None:
        return TimerResult(TimerOutcome.UNKNOWN)
    calendar = ctx.calendar(clock.department)
    now = ctx.now
    if kind is TimerKind.BREACH:
        if clock.escalated:
            return TimerResult(TimerOutcome.ALREADY)
        if not clock.breached(calendar, now):
            return TimerResult(
                TimerOutcome.EARLY if clock.is_running else TimerOutcome.STALE, due_at=clock.deadline(calendar)
            )
        event = _escalate(track, clock, calendar, now, ctx)
        if event is None:
            return TimerResult(TimerOutcome.SUPPRESSED)
        return TimerResult(TimerOutcome.FIRED, (event,))

    if clock.warned:
        return TimerResult(TimerOutcome.ALREADY)
    if not clock.is_running or clock.escalated or clock.breached(calendar, now):
        return TimerResult(TimerOutcome.STALE)
    fraction = ctx.policy.warning_fraction
    if clock.used(calendar, now) < clock.target * fraction:
        return TimerResult(TimerOutcome.EARLY, due_at=clock.warn_at(calendar, fraction))
    deadline = clock.deadline(calendar)
    if deadline is None or track.phase in QUIET_PHASES:
        return TimerResult(TimerOutcome.SUPPRESSED)
    clock.warned = True
    warning = build_warning(
        track.request_id, clock.department, clock.kind, clock.episode, deadline, fraction, deadline - now, now
    )
    return TimerResult(TimerOutcome.FIRED, (warning,))


def wanted_timers(track: Track, ctx: Context) -> list[TimerSpec]:
    """The timers the request's clocks want armed now: a warning and a breach per running clock."""
    out: list[TimerSpec] = []
    for clock in track.clocks:
        if not clock.is_open or not clock.is_running or clock.escalated:
            continue
        calendar = ctx.calendar(clock.department)
        warn_at = clock.warn_at(calendar, ctx.policy.warning_fraction)
        if warn_at is not None:
            out.append(_spec(clock, TimerKind.WARNING, warn_at))
        deadline = clock.deadline(calendar)
        if deadline is not None:
            out.append(_spec(clock, TimerKind.BREACH, deadline))
    return out


def _spec(clock: Clock, kind: TimerKind, due_at: datetime) -> TimerSpec:
    return TimerSpec(clock.clock_id, clock.request_id, clock.department, clock.kind, clock.episode, kind, due_at)
