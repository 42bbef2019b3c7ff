"""Timelines through declines, reassignments, reopenings, returns, comments, notices and feedback."""

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from libs.contracts import parse_event
from libs.contracts.events import LifecycleEvent
from services.metrics.domain import build_timeline

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
RID = "REQ-HANDOFF1"


def ev(seq: int, event_type: str, dept: str, minutes: int, **fields: Any) -> LifecycleEvent:
    at = T0 + timedelta(minutes=minutes)
    doc = {
        "type": event_type,
        "event_id": f"evt-{seq:08d}",
        "request_id": RID,
        "occurred_at": at.isoformat(),
        "actor": {"department": dept, "person": "p"},
        "sequence": seq,
        "recorded_at": at.isoformat(),
        **fields,
    }
    return parse_event(orjson.dumps(doc))


def created() -> LifecycleEvent:
    requester = {"department": "hr", "person": "Priya"}
    return ev(1, "created", "hr", 0, title="Laptop", category="laptop", priority="high", requester=requester)


def routed(seq: int, to: str, minutes: int) -> LifecycleEvent:
    return ev(seq, "routed", "baton", minutes, provider_department=to, rule="category:laptop", caused_by="evt-00000001")


def test_decline_then_reroute_charges_each_department_its_own_hold() -> None:
    events = [
        created(),
        routed(2, "it", 10),
        ev(3, "declined", "it", 40, reason="not ours"),
        routed(4, "acme-it", 50),
        ev(5, "accepted", "acme-it", 60, assignee="Raj", eta=(T0 + timedelta(days=1)).isoformat()),
    ]
    t = build_timeline(events, T0 + timedelta(minutes=120))
    assert t.state == "accepted"
    assert t.holder_department == "acme-it"
    holds = [(h.department, h.role, h.seconds) for h in t.holds]
    assert holds == [
        ("hr", "requester", 600.0),
        ("it", "provider", 1800.0),
        ("hr", "requester", 600.0),
        ("acme-it", "provider", 4200.0),
    ]
    assert "declined by it: not ours" in t.segments[2].note
    assert t.segments[2].department is None


def test_reassignment_moves_the_hold_and_resets_the_eta() -> None:
    events = [
        created(),
        routed(2, "it", 0),
        ev(3, "accepted", "it", 10, assignee="Sam", eta=(T0 + timedelta(days=1)).isoformat()),
        ev(4, "reassigned", "it", 30, reason="vendor repair", to_department="acme-it"),
    ]
    t = build_timeline(events, T0 + timedelta(minutes=60))
    assert (t.state, t.holder_department, t.deadlines.eta) == ("reassigned", "acme-it", None)
    assert [(h.department, h.to is None) for h in t.holds][-2:] == [("it", False), ("acme-it", True)]
    assert t.segments[-1].note.startswith("reassigned by it")


def test_reopen_comment_notice_and_feedback() -> None:
    eta = (T0 + timedelta(days=1)).isoformat()
    events = [
        created(),
        routed(2, "it", 0),
        ev(3, "accepted", "it", 10, assignee="Sam", eta=eta),
        ev(4, "commented", "hr", 15, comment="Blue one please"),
        ev(
            5,
            "sla_warning",
            "baton",
            16,
            clock="resolve",
            department="it",
            deadline=eta,
            fraction=0.75,
            remaining_seconds=60.0,
        ),
        ev(6, "resolved", "it", 20, resolution="done", outcome="done"),
        ev(7, "reopened", "hr", 30, reason="wrong colour"),
    ]
    t = build_timeline(events, T0 + timedelta(minutes=40))
    assert t.state == "reopened"
    assert t.holder_department == "it"
    assert t.holds[-1].note == "reopened"
    assert t.segments[-1].note == "reopened: wrong colour"
    assert "commented: Blue one please" in t.events[3].summary
    assert t.events[4].summary.startswith("SLA warning: it must resolve")

    closing = [*events[:6], ev(7, "feedback", "hr", 30, rating=5, comment="Thanks!")]
    closed = build_timeline(closing, T0 + timedelta(minutes=40))
    assert closed.state == "closed"
    assert closed.events[-1].summary == "p (hr) rated it 5/5: Thanks!"


def test_returned_to_the_requester() -> None:
    events = [
        created(),
        routed(2, "it", 0),
        ev(3, "declined", "it", 10, reason="not ours"),
        ev(
            4, "returned", "baton", 11, reason="nobody else serves laptop", declined_by=["it"], caused_by="evt-00000003"
        ),
    ]
    t = build_timeline(events, T0 + timedelta(minutes=20))
    assert (t.state, t.holder_department) == ("returned", None)
    assert t.holds[-1].department == "hr"
    assert t.holds[-1].note == "returned: nobody else serves laptop"
