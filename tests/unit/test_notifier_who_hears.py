"""Who hears what, for every event type of the contract, for every role, and the sentence each one reads.

One request, one cast: Finance raised it (requester), Legal watches it, the Service Desk held it
first, IT holds it now, Facilities is where it may go next, and HR is a bystander that never
hears anything.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from libs.contracts import EVENT_ADAPTER, Catalog, LifecycleEvent, Role
from libs.contracts.events import EVENT_MODELS
from services.notifier.domain import (
    WHO_HEARS,
    Delivery,
    Directory,
    Plan,
    Projection,
    digest_window,
    plan,
    span,
    who_hears_table,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RID = "REQ-8F2K0001"
T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)  # Tue 24 Nov 2026, 10:00 in Paris
NOW = T0 + timedelta(hours=1)
ETA = datetime(2026, 11, 25, 13, 0, tzinfo=UTC)  # Wed 25 Nov 14:00 Paris, 08:00 New York

CATALOG = Catalog.model_validate(
    {
        "fallback_department": "service-desk",
        "departments": [
            {"slug": "service-desk", "name": "Service Desk", "timezone": "Europe/Paris"},
            {"slug": "it", "name": "IT", "timezone": "Europe/Paris"},
            {"slug": "finance", "name": "Finance", "timezone": "Europe/Paris"},
            {"slug": "legal", "name": "Legal", "timezone": "America/New_York"},
            {"slug": "facilities", "name": "Facilities", "timezone": "Europe/Paris"},
            {"slug": "hr", "name": "HR"},
        ],
    }
)
DIRECTORY = Directory(CATALOG)
R, P, W = Role.REQUESTER, Role.PROVIDER, Role.WATCHER

#: IT holds it (accepted, ETA set); the Service Desk held it before; Legal watches.
HELD = Projection(
    request_id=RID,
    requester_department="finance",
    holder_department="it",
    past_holders=("service-desk", "it"),
    watchers=("legal",),
    title="Laptop for new hire",
    eta=ETA - timedelta(days=1),
    delay_count=0,
    last_sequence=5,
)
#: Nobody holds it (the Service Desk declined it): what routing and returning start from.
UNHELD = replace(HELD, holder_department=None, past_holders=("service-desk",), eta=None)
#: IT resolved it.
RESOLVED = replace(HELD, eta=None)


def event(kind: str, actor: str, **fields: Any) -> LifecycleEvent:
    doc = {
        "type": kind,
        "event_id": f"evt-{kind}-{actor}",
        "request_id": RID,
        "occurred_at": T0.isoformat(),
        "actor": {"department": actor, "person": "Sam"},
        "sequence": 6,
        "recorded_at": (T0 + timedelta(seconds=1)).isoformat(),
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        **fields,
    }
    return EVENT_ADAPTER.validate_python(doc)


CREATED = event(
    "created",
    "finance",
    sequence=1,
    title="Laptop for new hire",
    category="laptop",
    priority="high",
    requester={"department": "finance", "person": "Ana"},
    watchers=["legal"],
)
SLA = {"clock": "accept", "department": "it", "deadline": ETA.isoformat()}

#: (event, projection before it, {department: role} told). Every event type appears (checked below).
CASES: list[tuple[str, LifecycleEvent, Projection | None, dict[str, Role]]] = [
    ("created", CREATED, None, {"finance": R, "legal": W}),
    (
        "routed",
        event("routed", "baton", provider_department="it", rule="category:laptop", caused_by="evt-created-x"),
        UNHELD,
        {"it": P, "finance": R},
    ),
    ("accepted", event("accepted", "it", assignee="Sam", eta=ETA.isoformat()), HELD, {"finance": R, "it": P}),
    (
        "delayed",
        event("delayed", "it", reason="supplier backorder", new_eta=ETA.isoformat()),
        HELD,
        {"finance": R, "it": P, "service-desk": P, "legal": W},
    ),
    (
        "resolved",
        event("resolved", "it", resolution="delivered to desk 4", outcome="done"),
        HELD,
        {"finance": R, "it": P, "service-desk": P, "legal": W},
    ),
    ("declined", event("declined", "it", reason="not ours"), HELD, {"finance": R, "it": P}),
    (
        "reassigned",
        event("reassigned", "it", reason="desks are Facilities'", to_department="facilities"),
        HELD,
        {"finance": R, "it": P, "facilities": P},
    ),
    ("reopened", event("reopened", "finance", reason="it does not boot"), RESOLVED, {"finance": R, "it": P}),
    ("feedback", event("feedback", "finance", rating=5, comment="fast"), RESOLVED, {"finance": R, "it": P}),
    ("commented by the requester", event("commented", "finance", comment="any news?"), HELD, {"it": P}),
    ("commented by the holder", event("commented", "it", comment="ordered"), HELD, {"finance": R}),
    (
        "returned",
        event("returned", "baton", reason="nobody serves it", declined_by=["service-desk"], caused_by="evt-x-0001"),
        UNHELD,
        {"finance": R, "legal": W},
    ),
    (
        "sla_warning",
        event("sla_warning", "baton", **SLA, fraction=0.75, remaining_seconds=5400),
        HELD,
        {"it": P},
    ),
    ("escalated", event("escalated", "baton", **SLA, overdue_seconds=600), HELD, {"finance": R, "it": P}),
    (
        "handoff_loop_detected",
        event("handoff_loop_detected", "baton", pattern="bounce", chain=["service-desk", "it", "service-desk"]),
        HELD,
        {"finance": R, "it": P, "service-desk": P, "legal": W},
    ),
]


def told(ev: LifecycleEvent, before: Projection | None) -> dict[str, Role]:
    result = plan(before, ev, DIRECTORY, NOW)
    assert isinstance(result, Plan)
    departments = [n.department for n in result.notifications]
    assert len(departments) == len(set(departments)), "one notification per department"
    return {n.department: n.role for n in result.notifications}


@pytest.mark.parametrize(("ev", "before", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_event_type_reaches_exactly_these_departments_in_these_roles(
    ev: LifecycleEvent, before: Projection | None, expected: dict[str, Role]
) -> None:
    got = told(ev, before)
    assert got == expected
    assert "hr" not in got  # the bystander
    assert "baton" not in got  # Baton's own services are never told


def test_the_table_covers_every_event_type_of_the_contract() -> None:
    assert {c[1].type for c in CASES} == set(EVENT_MODELS) == set(WHO_HEARS)


def test_the_documented_table_is_the_code_table() -> None:
    table = who_hears_table()
    assert table in (ROOT / "docs" / "notifications.md").read_text(encoding="utf-8")
    import services.notifier.domain as domain

    assert "\n".join("    " + line for line in table.splitlines()) in (domain.__doc__ or "")


@pytest.mark.parametrize(
    ("before", "expected"),
    [
        pytest.param(replace(HELD, watchers=("finance", "it", "legal")), None, id="requester and holder also watch"),
        pytest.param(
            replace(HELD, requester_department="it", past_holders=("it",)),
            {"it": P, "legal": W},
            id="a department serving itself",
        ),
    ],
)
def test_overlapping_roles_give_one_notification_in_the_strongest_role(
    before: Projection, expected: dict[str, Role] | None
) -> None:
    delayed = next(c[1] for c in CASES if c[0] == "delayed")
    got = told(delayed, before)
    assert got == (expected or {"finance": R, "it": P, "service-desk": P, "legal": W})


def test_a_repeated_sla_notice_of_the_same_episode_tells_nobody() -> None:
    warning = next(c[1] for c in CASES if c[0] == "sla_warning")
    first = plan(HELD, warning, DIRECTORY, NOW)
    assert isinstance(first, Plan)
    assert len(first.notifications) == 1
    tick = warning.model_copy(update={"event_id": "evt-tick-0002", "sequence": 7, "remaining_seconds": 3000})
    second = plan(first.projection, tick, DIRECTORY, NOW)
    assert isinstance(second, Plan)
    assert second.notifications == ()
    assert second.projection.last_sequence == 7  # applied all the same
    other_clock = tick.model_copy(update={"event_id": "evt-tick-0003", "sequence": 8, "clock": "resolve"})
    next_episode = tick.model_copy(update={"event_id": "evt-tick-0004", "sequence": 9, "episode": 2})
    state = second.projection
    for ev in (other_clock, next_episode):
        result = plan(state, ev, DIRECTORY, NOW)
        assert isinstance(result, Plan)
        assert [n.department for n in result.notifications] == ["it"]
        state = result.projection
    escalated = next(c[1] for c in CASES if c[0] == "escalated")
    once = plan(state, escalated.model_copy(update={"sequence": 10}), DIRECTORY, NOW)
    assert isinstance(once, Plan)
    assert len(once.notifications) == 2  # a warning does not silence the escalation
    again = plan(
        once.projection, escalated.model_copy(update={"sequence": 11, "event_id": "evt-esc-2"}), DIRECTORY, NOW
    )
    assert isinstance(again, Plan)
    assert again.notifications == ()


# --- the sentences ---------------------------------------------------------------------------------


def text(case: str, department: str) -> str:
    ev, before = next((c[1], c[2]) for c in CASES if c[0] == case)
    result = plan(before, ev, DIRECTORY, NOW)
    assert isinstance(result, Plan)
    return next(n.text for n in result.notifications if n.department == department)


W_ = "'Laptop for new hire' (REQ-8F2K0001)"


@pytest.mark.parametrize(
    ("case", "department", "expected"),
    [
        ("declined", "finance", f"IT declined {W_}: not ours"),
        ("reassigned", "finance", f"IT handed {W_} to Facilities: desks are Facilities'"),
        (
            "reassigned",
            "facilities",
            f"New work from IT: IT handed {W_} to Facilities: desks are Facilities' — please accept it",
        ),
        ("reopened", "it", f"Finance reopened {W_}: it does not boot — IT must accept it again"),
        ("feedback", "it", f"Finance rated {W_} 5/5: fast — request closed"),
        ("commented by the requester", "it", f"Sam (Finance) commented on {W_}: any news?"),
        ("returned", "legal", f"{W_} was returned to Finance: nobody serves it (declined by Service Desk)"),
        (
            "sla_warning",
            "it",
            f"{W_}: IT has used 75% of its time to accept — deadline Wed 25 Nov 14:00 (1h 30m left)",
        ),
        (
            "escalated",
            "finance",
            f"{W_} is overdue: IT missed its accept deadline Wed 25 Nov 14:00 by 10m — escalated",
        ),
        ("escalated", "legal", None),
        (
            "handoff_loop_detected",
            "legal",
            f"{W_} is being passed around (bounce): Service Desk → IT → Service Desk",
        ),
    ],
)
def test_sentences(case: str, department: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(StopIteration):
            text(case, department)
        return
    assert text(case, department) == expected


def test_deadlines_are_shown_in_the_recipients_zone() -> None:
    escalated = next(c[1] for c in CASES if c[0] == "escalated")
    before = replace(HELD, requester_department="legal")
    result = plan(before, escalated, DIRECTORY, NOW)
    assert isinstance(result, Plan)
    by_dept = {n.department: n for n in result.notifications}
    assert "deadline Wed 25 Nov 08:00" in by_dept["legal"].text
    assert "deadline Wed 25 Nov 14:00" in by_dept["it"].text
    assert (by_dept["legal"].time_zone, by_dept["it"].time_zone) == ("America/New_York", "Europe/Paris")


def test_structured_fields() -> None:
    delayed = next(c[1] for c in CASES if c[0] == "delayed")
    result = plan(HELD, delayed, DIRECTORY, NOW)
    assert isinstance(result, Plan)
    note = result.notifications[0]
    assert (note.requester_department, note.holder_department) == ("finance", "it")
    assert (note.eta, note.previous_eta, note.delay_count) == (ETA, HELD.eta, 1)


@pytest.mark.parametrize(
    ("seconds", "shown"), [(20, "<1m"), (600, "10m"), (5400, "1h 30m"), (7200, "2h"), (93600, "1d 2h"), (86400, "1d")]
)
def test_span(seconds: float, shown: str) -> None:
    assert span(seconds) == shown


def test_digest_windows_follow_the_department_clock() -> None:
    paris = DIRECTORY.zone("it")
    moment = datetime(2026, 11, 24, 9, 40, tzinfo=UTC)  # 10:40 Paris
    assert digest_window(Delivery.HOURLY, moment, paris) == (
        datetime(2026, 11, 24, 9, 0, tzinfo=UTC),
        datetime(2026, 11, 24, 10, 0, tzinfo=UTC),
    )
    # daily at 08:00 Paris = 07:00 UTC in November
    assert digest_window(Delivery.DAILY, moment, paris) == (
        datetime(2026, 11, 24, 7, 0, tzinfo=UTC),
        datetime(2026, 11, 25, 7, 0, tzinfo=UTC),
    )
    early = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)  # 07:00 Paris: still yesterday's window
    assert digest_window(Delivery.DAILY, early, paris)[1] == datetime(2026, 11, 24, 7, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="immediate"):
        digest_window(Delivery.IMMEDIATE, moment, paris)
