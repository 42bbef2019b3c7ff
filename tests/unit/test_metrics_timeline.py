"""Metrics' timeline, computed from canonical events with known timestamps, and its message checks."""

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from libs.contracts import Accepted, Created, Delayed, LifecycleEvent, Resolved, Routed, dumps
from libs.contracts.notifications import Role
from services.metrics.domain import (
    Canonical,
    Poison,
    SegmentKind,
    build_timeline,
    check_canonical,
    detail,
    parties,
    summarize,
    summary_of,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
RID = "REQ-8F2K0001"
TRACE = "0af7651916cd43dd8448eb211c80319c"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def env(event_id: str, dept: str, minutes: float, sequence: int) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "request_id": RID,
        "occurred_at": at(minutes),
        "actor": {"department": dept, "person": "Ana" if dept == "marketing" else "Sam"},
        "sequence": sequence,
        "recorded_at": at(minutes) + timedelta(seconds=1),
        "trace_id": TRACE,
    }


def created(seq: int = 1, minutes: float = 0, **kw: Any) -> Created:
    return Created(
        **env("evt-created1", "marketing", minutes, seq),
        title="Laptop for new hire",
        category="laptop",
        priority="high",
        requester={"department": "marketing", "person": "Ana"},
        due_by=at(5 * 24 * 60),
        **kw,
    )


def routed(seq: int = 2, minutes: float = 10, to: str = "it", deadlines: bool = True) -> Routed:
    extra = {"accept_by": at(60), "resolve_by": at(24 * 60)} if deadlines else {}
    return Routed(
        **env(f"evt-routed{seq:02d}", "baton", minutes, seq),
        provider_department=to,
        rule="category:laptop",
        reason="it serves laptop",
        caused_by="evt-created1",
        **extra,
    )


def accepted(seq: int = 3, minutes: float = 40, dept: str = "it") -> Accepted:
    return Accepted(**env(f"evt-accept{seq:02d}", dept, minutes, seq), assignee="Sam", eta=at(20 * 60))


def delayed(seq: int = 4, minutes: float = 120, dept: str = "it", eta_min: float = 30 * 60) -> Delayed:
    return Delayed(
        **env(f"evt-delay{seq:03d}", dept, minutes, seq),
        reason="supplier backorder",
        new_eta=at(eta_min),
        reason_code="waiting_on_vendor",
        blocking_department="procurement",
    )


def resolved(seq: int = 5, minutes: float = 26 * 60, dept: str = "it") -> Resolved:
    return Resolved(**env(f"evt-resolv{seq:02d}", dept, minutes, seq), resolution="Laptop delivered", outcome="done")


def lifecycle() -> list[LifecycleEvent]:
    return [created(), routed(), accepted(), delayed(), resolved()]


NOW = at(40 * 60)


# --- the full lifecycle ------------------------------------------------------------------
def test_full_lifecycle_summary_fields() -> None:
    tl = build_timeline(lifecycle(), NOW)
    assert tl.request_id == RID
    assert (tl.title, tl.category, tl.priority) == ("Laptop for new hire", "laptop", "high")
    assert tl.state == "resolved"
    assert tl.requester_department == "marketing"
    assert tl.holder_department == "it"
    assert tl.trace_id == TRACE
    assert tl.complete is True
    assert tl.missing_sequences == []
    assert (tl.last_sequence, tl.derived_through) == (5, 5)
    assert [e.sequence for e in tl.events] == [1, 2, 3, 4, 5]
    assert [e.type for e in tl.events] == ["created", "routed", "accepted", "delayed", "resolved"]
    assert tl.computed_at == NOW


def test_holds_requester_until_routed_then_provider_until_resolved() -> None:
    holds = build_timeline(lifecycle(), NOW).holds
    assert [(h.department, h.role, h.from_, h.to, h.seconds) for h in holds] == [
        ("marketing", Role.REQUESTER, at(0), at(10), 600.0),
        ("it", Role.PROVIDER, at(10), at(26 * 60), (26 * 60 - 10) * 60.0),
    ]
    assert holds[0].note == "waiting for routing"


def test_segments_waiting_working_delayed() -> None:
    tl = build_timeline(lifecycle(), NOW)
    assert [(s.kind, s.department, s.from_, s.to, s.seconds) for s in tl.segments] == [
        (SegmentKind.WAITING, None, at(0), at(10), 600.0),
        (SegmentKind.WAITING, "it", at(10), at(40), 1800.0),
        (SegmentKind.WORKING, "it", at(40), at(120), 4800.0),
        (SegmentKind.DELAYED, "it", at(120), at(26 * 60), 24 * 3600.0),
    ]
    assert tl.segments[3].note == "delayed: supplier backorder"
    assert tl.totals == {"waiting": 2400.0, "working": 4800.0, "delayed": 86400.0}


def test_deadlines_and_breaches_of_a_resolved_request() -> None:
    tl = build_timeline(lifecycle(), NOW)
    assert tl.deadlines.accept_by == at(60)
    assert tl.deadlines.resolve_by == at(24 * 60)
    assert tl.deadlines.eta == at(30 * 60)  # moved by the delay
    assert tl.deadlines.due_by == at(5 * 24 * 60)
    assert tl.sla.accept_breached is False  # accepted after 40 min, allowed 60
    assert tl.sla.resolve_breached is True  # resolved after 26 h, allowed 24


def test_resolved_request_does_not_depend_on_now() -> None:
    early, late = build_timeline(lifecycle(), at(27 * 60)), build_timeline(lifecycle(), at(999 * 60))
    assert early.model_dump(exclude={"computed_at"}) == late.model_dump(exclude={"computed_at"})


def test_working_until_resolved_without_delay() -> None:
    tl = build_timeline([created(), routed(), accepted(), resolved(seq=4, minutes=5 * 60)], NOW)
    assert [(s.kind, s.from_, s.to) for s in tl.segments][-1] == (SegmentKind.WORKING, at(40), at(5 * 60))
    assert (tl.sla.accept_breached, tl.sla.resolve_breached) == (False, False)
    assert tl.deadlines.eta == at(20 * 60)


def test_two_delays_make_two_delayed_segments() -> None:
    events: list[LifecycleEvent] = [created(), routed(), accepted(), delayed(), delayed(5, 180, eta_min=40 * 60)]
    tl = build_timeline(events, at(200))
    assert [(s.kind, s.from_, s.to) for s in tl.segments[2:]] == [
        (SegmentKind.WORKING, at(40), at(120)),
        (SegmentKind.DELAYED, at(120), at(180)),
        (SegmentKind.DELAYED, at(180), None),
    ]
    assert tl.segments[-1].seconds == 20 * 60.0
    assert tl.deadlines.eta == at(40 * 60)
    assert tl.state == "delayed"


# --- open requests: the clock runs to "now" ------------------------------------------------
def test_open_request_last_hold_and_segment_run_to_now() -> None:
    tl = build_timeline([created(), routed(), accepted()], at(100))
    assert tl.state == "accepted"
    assert tl.holder_department == "it"
    assert (tl.holds[-1].department, tl.holds[-1].to, tl.holds[-1].seconds) == ("it", None, 90 * 60.0)
    last = tl.segments[-1]
    assert (last.kind, last.to, last.seconds) == (SegmentKind.WORKING, None, 60 * 60.0)
    assert tl.sla.accept_breached is False
    assert tl.sla.resolve_breached is False  # 100 min < 24 h


def test_created_only_is_held_by_the_requester_unassigned() -> None:
    tl = build_timeline([created()], at(5))
    assert tl.state == "created"
    assert tl.holder_department == "marketing"
    assert [(h.department, h.role, h.to, h.seconds) for h in tl.holds] == [("marketing", Role.REQUESTER, None, 300.0)]
    assert [(s.kind, s.department, s.seconds) for s in tl.segments] == [(SegmentKind.WAITING, None, 300.0)]
    assert tl.deadlines.accept_by is None
    assert (tl.sla.accept_breached, tl.sla.resolve_breached) == (None, None)


@pytest.mark.parametrize(
    ("now_minutes", "breached"),
    [(59, False), (61, True)],
)
def test_accept_breach_while_waiting_uses_now(now_minutes: int, breached: bool) -> None:
    tl = build_timeline([created(), routed()], at(now_minutes))
    assert tl.state == "routed"
    assert tl.sla.accept_breached is breached
    assert tl.segments[-1].note == "waiting for acceptance"


def test_late_acceptance_is_a_breach() -> None:
    tl = build_timeline([created(), routed(), accepted(minutes=90)], at(91))
    assert tl.sla.accept_breached is True


def test_no_deadlines_means_no_breach_flags() -> None:
    tl = build_timeline([created(), routed(deadlines=False), accepted()], at(10_000))
    assert (tl.sla.accept_breached, tl.sla.resolve_breached) == (None, None)
    assert (tl.deadlines.accept_by, tl.deadlines.resolve_by) == (None, None)


def test_rerouting_moves_the_hold_and_resets_deadlines() -> None:
    second = Routed(
        **env("evt-routed03", "baton", 30, 3),
        provider_department="facilities",
        previous_department="it",
        rule="manual",
        caused_by="evt-created1",
        accept_by=at(200),
    )
    tl = build_timeline([created(), routed(), second], at(100))
    assert [(h.department, h.to) for h in tl.holds] == [("marketing", at(10)), ("it", at(30)), ("facilities", None)]
    assert tl.holder_department == "facilities"
    assert (tl.deadlines.accept_by, tl.deadlines.resolve_by) == (at(200), None)
    assert tl.sla.accept_breached is False


# --- order, duplicates and gaps --------------------------------------------------------------
def test_arrival_order_and_duplicates_do_not_matter() -> None:
    events = lifecycle()
    shuffled = [events[3], events[0], events[4], events[1], events[0], events[2], events[3]]
    assert build_timeline(shuffled, NOW) == build_timeline(events, NOW)


def test_gap_is_reported_and_derivation_stops_before_it() -> None:
    tl = build_timeline([created(), routed(), delayed(), resolved()], NOW)
    assert tl.complete is False
    assert tl.missing_sequences == [3]
    assert (tl.last_sequence, tl.derived_through) == (5, 2)
    assert [e.sequence for e in tl.events] == [1, 2, 4, 5]  # every stored event is listed
    assert tl.state == "routed"  # but the derived view stops at the gap
    assert tl.holds[-1].to is None


def test_first_event_missing_gives_an_empty_derivation() -> None:
    tl = build_timeline([routed(), accepted()], NOW)
    assert tl.missing_sequences == [1]
    assert (tl.state, tl.title, tl.requester_department, tl.holder_department) == (None, None, None, None)
    assert (tl.holds, tl.segments, tl.derived_through) == ([], [], 0)
    assert tl.trace_id == TRACE


def test_several_gaps() -> None:
    tl = build_timeline([created(), accepted(), resolved(seq=6)], NOW)
    assert tl.missing_sequences == [2, 4, 5]
    assert tl.derived_through == 1


@pytest.mark.parametrize(
    ("count", "state"),
    [(1, "created"), (2, "routed"), (3, "accepted"), (4, "delayed"), (5, "resolved")],
)
def test_state_is_named_after_the_last_event(count: int, state: str) -> None:
    assert build_timeline(lifecycle()[:count], NOW).state == state


def test_no_events_or_unsequenced_events_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one event"):
        build_timeline([], NOW)
    with pytest.raises(ValueError, match="no sequence"):
        build_timeline([created().model_copy(update={"sequence": None})], NOW)


def test_clock_disagreement_never_gives_negative_seconds() -> None:
    tl = build_timeline([created(minutes=30), routed(minutes=10)], at(5))
    assert all(h.seconds >= 0 for h in tl.holds)
    assert all(s.seconds >= 0 for s in tl.segments)


def test_times_with_offsets_are_compared_as_instants() -> None:
    paris = timezone(timedelta(hours=1))
    late_accept = accepted().model_copy(update={"occurred_at": datetime(2026, 11, 24, 10, 40, tzinfo=paris)})
    tl = build_timeline([created(), routed(), late_accept], NOW)  # 09:40 UTC
    assert tl.segments[1].seconds == 1800.0
    assert tl.segments[2].from_ == at(40)
    assert tl.segments[2].from_.tzinfo == UTC


# --- event lines and JSON shape --------------------------------------------------------------------
def test_summary_lines() -> None:
    c, r, a, d, z = (summarize(e) for e in lifecycle())
    assert c == 'Ana (marketing) raised "Laptop for new hire" (laptop, high priority, due 2026-11-29 09:00 UTC)'
    assert r == "Routed to it by rule category:laptop: it serves laptop"
    assert a == "Sam (it) accepted; Sam expects to finish by 2026-11-25 05:00 UTC"
    assert d == "Sam (it) moved the ETA to 2026-11-25 15:00 UTC: supplier backorder"
    assert z == "Sam (it) resolved it (done): Laptop delivered"


def test_long_free_text_is_shortened() -> None:
    long = resolved().model_copy(update={"resolution": "word " * 100})
    assert len(summarize(long)) < 200
    assert summarize(long).endswith("…")


def test_detail_is_the_event_without_its_envelope() -> None:
    d = detail(delayed())
    assert d == {
        "reason": "supplier backorder",
        "new_eta": "2026-11-25T15:00:00Z",
        "reason_code": "waiting_on_vendor",
        "blocking_department": "procurement",
    }


def test_json_uses_from_and_iso_times() -> None:
    doc = orjson.loads(build_timeline(lifecycle(), NOW).model_dump_json())
    assert doc["holds"][0]["from"] == "2026-11-24T09:00:00Z"
    assert doc["holds"][0]["to"] == "2026-11-24T09:10:00Z"
    assert doc["segments"][0] == {
        "kind": "waiting",
        "department": None,
        "note": "unassigned: waiting for routing",
        "from": "2026-11-24T09:00:00Z",
        "to": "2026-11-24T09:10:00Z",
        "seconds": 600.0,
    }
    assert doc["events"][0]["actor"] == {"department": "marketing", "person": "Ana"}
    assert set(doc["events"][0]) == {
        "sequence",
        "type",
        "event_id",
        "occurred_at",
        "recorded_at",
        "actor",
        "summary",
        "detail",
    }
    assert doc["sla"] == {"accept_breached": False, "resolve_breached": True}


def test_summary_of_a_timeline() -> None:
    s = summary_of(build_timeline(lifecycle()[:4], at(200)))
    assert (s.state, s.holder_department, s.eta, s.last_event_at, s.complete) == (
        "delayed",
        "it",
        at(30 * 60),
        at(120),
        True,
    )


# --- parties ------------------------------------------------------------------------------------
def test_parties() -> None:
    assert parties(created(watchers=["finance"])) == {("marketing", Role.REQUESTER), ("finance", Role.WATCHER)}
    assert parties(routed()) == {("it", Role.PROVIDER)}
    assert parties(accepted()) == {("it", Role.PROVIDER)}


# --- checking messages from the canonical log ---------------------------------------------------
def test_check_accepts_a_canonical_event() -> None:
    event = routed()
    result = check_canonical(f"baton.events.{RID}.routed", dumps(event))
    assert isinstance(result, Canonical)
    assert (result.event, result.sequence, result.recorded_at) == (event, 2, at(10) + timedelta(seconds=1))


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{not json", "malformed_json"),
        (b"[1, 2]", "validation_failed"),
        (b'{"type": "created"}', "validation_failed"),
        (b'{"type": "exploded"}', "validation_failed"),
    ],
)
def test_check_refuses_garbage(data: bytes, code: str) -> None:
    result = check_canonical(f"baton.events.{RID}.created", data)
    assert isinstance(result, Poison)
    assert result.code == code
    assert result.message


def test_check_refuses_an_unstamped_event() -> None:
    doc = orjson.loads(dumps(created()))
    del doc["sequence"], doc["recorded_at"]
    result = check_canonical(f"baton.events.{RID}.created", orjson.dumps(doc))
    assert isinstance(result, Poison)
    assert (result.code, result.event_id) == ("not_canonical", "evt-created1")
    assert [e.loc for e in result.errors] == [["sequence"], ["recorded_at"]]


@pytest.mark.parametrize(
    "subject", [f"baton.events.{RID}.routed", "baton.events.REQ-OTHER0001.created", "baton.in.it.created"]
)
def test_check_refuses_a_subject_that_does_not_match(subject: str) -> None:
    result = check_canonical(subject, dumps(created()))
    assert isinstance(result, Poison)
    assert result.code == "subject_mismatch"
