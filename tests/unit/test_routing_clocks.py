"""SLA clocks per handoff, waits, declines, loops and timers (services/routing/tracking.py), on a controllable clock.

Every scenario drives the pure tracker with canonical events stamped as intake would (sequence,
``recorded_at``) and passes "now" explicitly: no sleeping, no I/O.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from libs.contracts import Catalog, Envelope, Routed, parse_event
from libs.contracts.events import (
    Escalated,
    HandoffLoopDetected,
    LoopPattern,
    Returned,
    SlaClock,
    SlaWarning,
)
from services.routing.tracking import (
    Context,
    Phase,
    Policy,
    TimerKind,
    TimerOutcome,
    Track,
    follow,
    on_timer,
    start,
    wanted_timers,
)

pytestmark = pytest.mark.unit

PARIS = ZoneInfo("Europe/Paris")

CATALOG = Catalog.model_validate(
    {
        "fallback_department": "service-desk",
        "departments": [
            {
                "slug": "service-desk",
                "name": "Service Desk",
                "categories": ["general"],
                "business_hours": {"always": True},
            },
            {
                "slug": "it",
                "name": "IT",
                "categories": ["laptop", "hardware"],
                "timezone": "Europe/Paris",
                "business_hours": {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "08:30", "end": "18:00"},
                "holidays": ["2026-12-25"],
                "sla": {
                    "normal": {"accept_within": "4h", "resolve_within": "3d"},
                    "urgent": {"accept_within": "15m", "resolve_within": "4h"},
                },
            },
            {
                "slug": "acme-it",
                "name": "ACME IT (vendor)",
                "kind": "vendor",
                "categories": ["hardware", "laptop"],
                "timezone": "Asia/Kolkata",
                "business_hours": {"always": True},
                "sla": {
                    "normal": {"accept_within": "2h", "resolve_within": "1d"},
                    "urgent": {"accept_within": "1h", "resolve_within": "8h"},
                },
            },
            {"slug": "marketing", "name": "Marketing", "categories": ["campaign"]},
            {"slug": "finance", "name": "Finance", "categories": ["invoice"]},
        ],
    }
)


def paris(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=PARIS).astimezone(UTC)


class Story:
    """One request told event by event, as intake would append it; ``at`` is the controllable clock."""

    def __init__(self, at: datetime, *, priority: str = "normal", policy: Policy | None = None, **created: Any) -> None:
        self.policy = policy or Policy()
        self.ids = itertools.count(1)
        self.sequence = 1
        doc = self._envelope("created", "marketing", at) | {
            "title": "Laptop for a new hire",
            "category": "laptop",
            "priority": priority,
            "requester": {"department": "marketing", "person": "Ana"},
            "sequence": 1,
            "recorded_at": at.isoformat(),
        }
        doc.update(created)
        track, emits = start(parse_event(orjson_dumps(doc)), self.ctx(at))  # type: ignore[arg-type]
        self.track: Track = track
        self.last: list[Envelope] = emits

    def ctx(self, at: datetime) -> Context:
        return Context(CATALOG, self.policy, at)

    def _envelope(self, event_type: str, dept: str, at: datetime) -> dict[str, Any]:
        return {
            "type": event_type,
            "event_id": f"ev-{event_type}-{next(self.ids):04d}",
            "request_id": "REQ-STORY001",
            "occurred_at": at.isoformat(),
            "actor": {"department": dept, "person": "someone"},
        }

    def append(self, event: Envelope, at: datetime) -> list[Envelope]:
        """Append an event (e.g. one routing emitted) to the canonical log and follow it."""
        self.sequence += 1
        stamped = event.model_copy(update={"sequence": self.sequence, "recorded_at": at})
        self.last = follow(self.track, stamped, self.ctx(at))  # type: ignore[arg-type]
        return self.last

    def say(self, event_type: str, dept: str, at: datetime, **fields: Any) -> list[Envelope]:
        doc = self._envelope(event_type, dept, at) | fields
        return self.append(parse_event(orjson_dumps(doc)), at)

    def route(self, at: datetime) -> Routed:
        """Append the routed event routing emitted last."""
        (routed,) = [e for e in self.last if isinstance(e, Routed)]
        self.append(routed, at)
        return routed

    def clock(self, dept: str, kind: SlaClock, episode: int = 1) -> Any:
        found = self.track.clock(f"REQ-STORY001.{dept}.{kind.value}.{episode}")
        assert found is not None, (dept, kind, episode)
        return found

    def timer(self, dept: str, kind: SlaClock, which: TimerKind, at: datetime, episode: int = 1) -> Any:
        return on_timer(self.track, f"REQ-STORY001.{dept}.{kind.value}.{episode}", which, self.ctx(at))

    def due(self, at: datetime) -> dict[tuple[str, str, str], datetime]:
        return {(t.department, t.clock.value, t.kind.value): t.due_at for t in wanted_timers(self.track, self.ctx(at))}


def orjson_dumps(doc: dict[str, Any]) -> bytes:
    import orjson

    return orjson.dumps(doc)


# --- business hours across a weekend and a holiday ---------------------------------------------------------
def test_accept_clock_runs_in_business_hours_across_a_holiday_and_a_weekend() -> None:
    thursday_5pm = paris(2026, 12, 24, 17, 0)  # one working hour left; Friday 25 is a holiday
    story = Story(thursday_5pm)
    routed = story.route(thursday_5pm)
    assert routed.provider_department == "it"
    monday_1130 = paris(2026, 12, 28, 11, 30)
    assert routed.accept_by == monday_1130  # 1 h on Thursday + 3 h on Monday from 08:30
    assert story.due(thursday_5pm)[("it", "accept", "breach")] == monday_1130
    assert story.due(thursday_5pm)[("it", "accept", "warning")] == paris(2026, 12, 28, 10, 30)  # 75 % of 4 h

    # Saturday: nothing is due, whatever the wall clock says.
    saturday = paris(2026, 12, 26, 12, 0)
    assert story.timer("it", SlaClock.ACCEPT, TimerKind.BREACH, saturday).outcome is TimerOutcome.EARLY
    assert story.clock("it", SlaClock.ACCEPT).used(story.ctx(saturday).calendar("it"), saturday) == timedelta(hours=1)

    warning = story.timer("it", SlaClock.ACCEPT, TimerKind.WARNING, paris(2026, 12, 28, 10, 30))
    assert warning.outcome is TimerOutcome.FIRED
    (notice,) = warning.emits
    assert isinstance(notice, SlaWarning)
    assert (notice.department, notice.clock, notice.fraction, notice.remaining_seconds) == (
        "it",
        SlaClock.ACCEPT,
        0.75,
        3600,
    )

    breach = story.timer("it", SlaClock.ACCEPT, TimerKind.BREACH, monday_1130 + timedelta(seconds=2))
    assert breach.outcome is TimerOutcome.FIRED
    (escalated,) = breach.emits
    assert isinstance(escalated, Escalated)
    assert (escalated.department, escalated.clock, escalated.episode) == ("it", SlaClock.ACCEPT, 1)
    assert escalated.deadline == monday_1130
    assert escalated.overdue_seconds == 2.0
    # Exactly once per episode: the same timer again (a redelivery) only republishes.
    assert (
        story.timer("it", SlaClock.ACCEPT, TimerKind.BREACH, monday_1130 + timedelta(hours=1)).outcome
        is TimerOutcome.ALREADY
    )
    assert ("it", "accept", "breach") not in story.due(monday_1130)


def test_accepting_in_time_stops_the_accept_clock_and_its_timers() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at)
    story.route(start_at)
    story.say("accepted", "it", paris(2026, 11, 24, 11, 0), assignee="Sam", eta=paris(2026, 11, 30, 9, 0).isoformat())
    accept = story.clock("it", SlaClock.ACCEPT)
    assert (accept.closed_at, accept.close_reason, accept.consumed) == (
        paris(2026, 11, 24, 11, 0),
        "accepted",
        timedelta(hours=2),
    )
    assert not accept.breached(story.ctx(start_at).calendar("it"), paris(2026, 11, 30, 9, 0))
    late = story.timer("it", SlaClock.ACCEPT, TimerKind.BREACH, paris(2026, 11, 24, 13, 0))
    assert late.outcome is TimerOutcome.STALE
    assert set(story.due(start_at)) == {("it", "resolve", "warning"), ("it", "resolve", "breach")}
    # The resolve clock started at the handoff: 3d is three working days, the same time on Friday.
    assert story.due(start_at)[("it", "resolve", "breach")] == paris(2026, 11, 27, 9, 0)


# --- waits --------------------------------------------------------------------------------------------------
def test_waiting_on_requester_pauses_the_providers_clock() -> None:
    start_at = paris(2026, 11, 24, 9, 0)  # Tuesday
    story = Story(start_at, priority="urgent")  # IT urgent: accept 15 min, resolve 4 h
    story.route(start_at)
    story.say("accepted", "it", paris(2026, 11, 24, 9, 10), assignee="Sam", eta=paris(2026, 11, 25, 9, 0).isoformat())
    assert story.due(start_at)[("it", "resolve", "breach")] == paris(2026, 11, 24, 13, 0)

    emits = story.say(
        "delayed",
        "it",
        paris(2026, 11, 24, 10, 0),
        reason="which keyboard layout?",
        new_eta=paris(2026, 11, 26, 9, 0).isoformat(),
        reason_code="waiting_on_requester",
    )
    assert emits == []
    resolve = story.clock("it", SlaClock.RESOLVE)
    assert (resolve.is_running, resolve.consumed) == (False, timedelta(hours=1))
    assert story.due(paris(2026, 11, 24, 10, 0)) == {}  # paused: no timer armed
    # The old deadline passes during the pause: the timer that still fires is stale.
    assert (
        story.timer("it", SlaClock.RESOLVE, TimerKind.BREACH, paris(2026, 11, 24, 13, 0)).outcome is TimerOutcome.STALE
    )
    # A comment from the provider does not end the wait; one from the requester does.
    story.say("commented", "it", paris(2026, 11, 24, 14, 0), comment="still waiting")
    assert not resolve.is_running
    story.say("commented", "marketing", paris(2026, 11, 24, 16, 0), comment="AZERTY please")
    assert resolve.is_running
    (wait,) = story.track.waits
    assert (wait.holder, wait.charged_to, wait.started_at, wait.ended_at) == (
        "it",
        "marketing",
        paris(2026, 11, 24, 10, 0),
        paris(2026, 11, 24, 16, 0),
    )
    # 3 h left from 16:00: 2 h today until 18:00, 1 h tomorrow from 08:30.
    new_deadline = paris(2026, 11, 25, 9, 30)
    assert story.due(paris(2026, 11, 24, 16, 0))[("it", "resolve", "breach")] == new_deadline
    early = story.timer("it", SlaClock.RESOLVE, TimerKind.BREACH, paris(2026, 11, 24, 17, 0))
    assert (early.outcome, early.due_at) == (TimerOutcome.EARLY, new_deadline)
    (escalated,) = story.timer("it", SlaClock.RESOLVE, TimerKind.BREACH, new_deadline).emits
    assert isinstance(escalated, Escalated)
    assert (escalated.clock, escalated.deadline, escalated.overdue_seconds) == (SlaClock.RESOLVE, new_deadline, 0.0)


def test_waiting_on_a_vendor_charges_the_blocking_department() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at, priority="urgent")
    story.route(start_at)
    story.say("accepted", "it", paris(2026, 11, 24, 9, 5), assignee="Sam", eta=paris(2026, 11, 25, 9, 0).isoformat())
    story.say(
        "delayed",
        "it",
        paris(2026, 11, 24, 10, 0),
        reason="part on order",
        new_eta=paris(2026, 11, 26, 9, 0).isoformat(),
        reason_code="waiting_on_vendor",
        blocking_department="acme-it",
    )
    resolve = story.clock("it", SlaClock.RESOLVE)
    assert not resolve.is_running
    assert story.track.waits[-1].charged_to == "acme-it"
    # A later delay for another reason resumes the clock: the wait is over.
    story.say(
        "delayed",
        "it",
        paris(2026, 11, 24, 15, 0),
        reason="part arrived, installing",
        new_eta=paris(2026, 11, 27, 9, 0).isoformat(),
        reason_code="capacity",
    )
    assert resolve.is_running
    assert resolve.used(story.ctx(start_at).calendar("it"), paris(2026, 11, 24, 16, 0)) == timedelta(hours=2)
    assert story.track.waits[-1].ended_at == paris(2026, 11, 24, 15, 0)


def test_waiting_on_a_department_without_naming_it_keeps_the_clock_running() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at, priority="urgent")
    story.route(start_at)
    story.say("accepted", "it", paris(2026, 11, 24, 9, 5), assignee="Sam", eta=paris(2026, 11, 25, 9, 0).isoformat())
    story.say(
        "delayed",
        "it",
        paris(2026, 11, 24, 10, 0),
        reason="someone else",
        new_eta=paris(2026, 11, 26, 9, 0).isoformat(),
        reason_code="waiting_on_department",
    )
    assert story.clock("it", SlaClock.RESOLVE).is_running
    assert story.track.waits == []


# --- reassignment -------------------------------------------------------------------------------------------
def test_reassignment_closes_the_old_holders_clock_and_opens_the_new_holders() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at)
    story.route(start_at)
    story.say("accepted", "it", paris(2026, 11, 24, 10, 0), assignee="Sam", eta=paris(2026, 11, 30, 9, 0).isoformat())
    handoff = paris(2026, 11, 24, 14, 0)
    emits = story.say("reassigned", "it", handoff, reason="the vendor repairs these", to_department="acme-it")
    assert emits == []  # 4 h after accepting: not a quick reassignment, no loop

    it_resolve = story.clock("it", SlaClock.RESOLVE)
    assert (it_resolve.closed_at, it_resolve.close_reason) == (handoff, "reassigned")
    vendor_accept = story.clock("acme-it", SlaClock.ACCEPT)
    vendor_resolve = story.clock("acme-it", SlaClock.RESOLVE)
    assert (vendor_accept.opened_at, vendor_accept.is_running, vendor_resolve.is_running) == (handoff, True, True)
    assert (story.track.holder, story.track.chain, story.track.phase) == ("acme-it", ["it", "acme-it"], Phase.ROUTED)
    due = story.due(handoff)
    assert {k for k in due if k[0] == "it"} == set()
    assert due[("acme-it", "accept", "breach")] == handoff + timedelta(hours=2)  # the vendor works 24/7
    # IT's old timer is stale; the vendor's fires and names the vendor.
    assert (
        story.timer("it", SlaClock.RESOLVE, TimerKind.BREACH, paris(2026, 11, 27, 9, 0)).outcome is TimerOutcome.STALE
    )
    (escalated,) = story.timer("acme-it", SlaClock.ACCEPT, TimerKind.BREACH, handoff + timedelta(hours=2)).emits
    assert isinstance(escalated, Escalated)
    assert escalated.department == "acme-it"


def test_a_handoff_back_is_a_bounce_and_a_new_episode() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at)
    story.route(start_at)
    story.say("reassigned", "it", paris(2026, 11, 24, 9, 30), reason="vendor", to_department="acme-it")
    emits = story.say("reassigned", "acme-it", paris(2026, 11, 24, 10, 0), reason="not ours", to_department="it")
    (loop,) = emits
    assert isinstance(loop, HandoffLoopDetected)
    assert (loop.pattern, loop.chain) == (LoopPattern.BOUNCE, ["it", "acme-it", "it"])
    assert loop.detail == "it held this request before: it -> acme-it -> it"
    assert story.clock("it", SlaClock.ACCEPT, episode=2).is_running
    assert not story.clock("it", SlaClock.ACCEPT, episode=1).is_open


def test_too_many_hops_and_a_quick_reassignment() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at, policy=Policy(max_hops=1, quick_reassign_within=timedelta(minutes=10)))
    story.route(start_at)
    story.say("reassigned", "it", paris(2026, 11, 24, 9, 10), reason="r", to_department="acme-it")
    story.say(
        "accepted", "acme-it", paris(2026, 11, 24, 9, 20), assignee="Raj", eta=paris(2026, 11, 30, 9, 0).isoformat()
    )
    emits = story.say("reassigned", "acme-it", paris(2026, 11, 24, 9, 25), reason="r", to_department="finance")
    assert [e.pattern for e in emits if isinstance(e, HandoffLoopDetected)] == [
        LoopPattern.TOO_MANY_HOPS,
        LoopPattern.QUICK_REASSIGN,
    ]
    hops, quick = emits
    assert isinstance(hops, HandoffLoopDetected)
    assert isinstance(quick, HandoffLoopDetected)
    assert hops.chain == quick.chain == ["it", "acme-it", "finance"]
    assert hops.detail == "2 handoffs (more than 1): it -> acme-it -> finance"
    assert quick.detail == (
        "acme-it accepted and then reassigned to finance within 10 minutes: it -> acme-it -> finance"
    )


def test_a_reassignment_long_after_accepting_is_not_quick() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at, policy=Policy(quick_reassign_within=timedelta(minutes=10)))
    story.route(start_at)
    story.say("accepted", "it", paris(2026, 11, 24, 9, 20), assignee="Sam", eta=paris(2026, 11, 30, 9, 0).isoformat())
    assert story.say("reassigned", "it", paris(2026, 11, 24, 9, 31), reason="r", to_department="acme-it") == []


# --- declines -----------------------------------------------------------------------------------------------
def test_a_decline_reroutes_to_the_suggested_department() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at)
    story.route(start_at)
    emits = story.say(
        "declined",
        "it",
        paris(2026, 11, 24, 9, 20),
        reason="hardware goes to the vendor",
        suggested_department="acme-it",
    )
    (routed,) = emits
    assert isinstance(routed, Routed)
    assert (routed.provider_department, routed.previous_department, routed.rule) == ("acme-it", "it", "suggested")
    assert routed.reason == "it declined: hardware goes to the vendor; it suggested acme-it, which serves 'laptop'"
    assert not story.clock("it", SlaClock.ACCEPT).is_open
    story.route(paris(2026, 11, 24, 9, 21))
    assert story.track.chain == ["it", "acme-it"]


def test_when_everyone_declined_the_request_is_returned_with_the_reasons() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at)
    story.route(start_at)
    story.say("declined", "it", paris(2026, 11, 24, 9, 20), reason="not ours")
    story.route(paris(2026, 11, 24, 9, 21))
    assert story.track.holder == "acme-it"
    story.say("declined", "acme-it", paris(2026, 11, 24, 9, 30), reason="no stock")
    story.route(paris(2026, 11, 24, 9, 31))
    assert story.track.holder == "service-desk"  # the triage department gets its turn
    (returned,) = story.say("declined", "service-desk", paris(2026, 11, 24, 9, 40), reason="nobody can")
    assert isinstance(returned, Returned)
    assert returned.declined_by == ["it", "acme-it", "service-desk"]
    assert returned.reason.startswith(
        "it declined: not ours; acme-it declined: no stock; service-desk declined: nobody can."
    )
    story.append(returned, paris(2026, 11, 24, 9, 41))
    assert story.track.phase is Phase.RETURNED
    assert story.track.open_clocks() == []


def test_a_late_decline_escalates_before_rerouting() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at, priority="urgent")  # 15 min to accept
    story.route(start_at)
    emits = story.say("declined", "it", paris(2026, 11, 24, 9, 40), reason="not ours")
    assert [type(e) for e in emits] == [Escalated, Routed]
    escalated = emits[0]
    assert isinstance(escalated, Escalated)
    assert (escalated.deadline, escalated.overdue_seconds) == (paris(2026, 11, 24, 9, 15), 25 * 60)


# --- breaches found on the way ---------------------------------------------------------------------------------
def test_a_breach_routing_missed_is_escalated_when_the_clock_stops() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at, priority="urgent")
    story.route(start_at)
    (escalated,) = story.say(
        "accepted", "it", paris(2026, 11, 24, 9, 45), assignee="Sam", eta=paris(2026, 11, 25, 9, 0).isoformat()
    )
    assert isinstance(escalated, Escalated)
    assert (escalated.clock, escalated.overdue_seconds) == (SlaClock.ACCEPT, 30 * 60)
    # The breach timer that comes later finds it done.
    assert (
        story.timer("it", SlaClock.ACCEPT, TimerKind.BREACH, paris(2026, 11, 24, 10, 0)).outcome is TimerOutcome.ALREADY
    )


def test_no_notice_once_resolved_but_the_breach_stays_on_the_clock() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at, priority="urgent")
    story.route(start_at)
    story.say("accepted", "it", paris(2026, 11, 24, 9, 5), assignee="Sam", eta=paris(2026, 11, 25, 9, 0).isoformat())
    assert story.say("resolved", "it", paris(2026, 11, 24, 15, 0), resolution="done", outcome="done") == []
    resolve = story.clock("it", SlaClock.RESOLVE)
    assert resolve.breach_at == paris(2026, 11, 24, 13, 0)
    assert not resolve.escalated
    assert (
        story.timer("it", SlaClock.RESOLVE, TimerKind.BREACH, paris(2026, 11, 24, 15, 1)).outcome
        is TimerOutcome.SUPPRESSED
    )


def test_a_warning_is_not_sent_for_a_clock_that_already_breached() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at, priority="urgent")
    story.route(start_at)
    late = story.timer("it", SlaClock.ACCEPT, TimerKind.WARNING, paris(2026, 11, 24, 9, 20))
    assert late.outcome is TimerOutcome.STALE
    early = story.timer("it", SlaClock.ACCEPT, TimerKind.WARNING, paris(2026, 11, 24, 9, 5))
    assert (early.outcome, early.due_at) == (TimerOutcome.EARLY, paris(2026, 11, 24, 9, 11, 15))


def test_reopened_opens_new_episodes_for_the_same_holder() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at)
    story.route(start_at)
    story.say("accepted", "it", paris(2026, 11, 24, 9, 5), assignee="Sam", eta=paris(2026, 11, 25, 9, 0).isoformat())
    story.say("resolved", "it", paris(2026, 11, 24, 10, 0), resolution="done", outcome="done")
    story.say("reopened", "marketing", paris(2026, 11, 24, 11, 0), reason="still broken")
    assert story.clock("it", SlaClock.ACCEPT, episode=2).is_running
    assert story.clock("it", SlaClock.RESOLVE, episode=2).is_running
    assert story.track.chain == ["it"]  # not a new hop


def test_a_department_without_an_sla_for_the_priority_has_no_clocks() -> None:
    start_at = paris(2026, 11, 24, 9, 0)
    story = Story(start_at, priority="low")
    story.route(start_at)
    assert story.track.clocks == []
    assert story.due(start_at) == {}
