"""Notifier domain: who hears what, the sentence each department reads, and the sequence decisions."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from libs.contracts import Catalog, Notification, Role, parse_event
from libs.contracts.catalog_file import load_catalog
from libs.contracts.events import Accepted, Created, Delayed, LifecycleEvent, Resolved, Routed
from services.notifier.domain import (
    Directory,
    Order,
    Plan,
    Poison,
    Projection,
    Recipient,
    advance,
    check_event,
    clip,
    gap_delay,
    notification_id,
    order,
    ordinal,
    plan,
    recipients,
    render,
    when,
)

pytestmark = pytest.mark.unit

RID = "REQ-8F2K0001"
TRACE = "0af7651916cd43dd8448eb211c80319c"
T0 = datetime(2025, 11, 20, 9, 0, tzinfo=UTC)
NOW = datetime(2025, 11, 24, 12, 0, tzinfo=UTC)
#: Mon 24 Nov 17:00 and Tue 25 Nov 14:00 in Paris (UTC+1 in November).
OLD_ETA = datetime(2025, 11, 24, 16, 0, tzinfo=UTC)
NEW_ETA = datetime(2025, 11, 25, 13, 0, tzinfo=UTC)

CATALOG = Catalog.model_validate(
    {
        "fallback_department": "service-desk",
        "departments": [
            {"slug": "service-desk", "name": "Service Desk", "timezone": "Europe/Paris"},
            {"slug": "it", "name": "IT", "timezone": "Europe/Paris"},
            {"slug": "finance", "name": "Finance", "timezone": "Europe/Paris"},
            {"slug": "legal", "name": "Legal", "timezone": "America/New_York"},
            {"slug": "acme-it", "name": "ACME", "timezone": "Asia/Kolkata", "kind": "vendor"},
            {"slug": "hr", "name": "HR"},
        ],
    }
)
DIRECTORY = Directory(CATALOG)


def _envelope(seq: int, actor: str, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"evt-{RID}-{seq:03d}",
        "request_id": RID,
        "occurred_at": (T0 + timedelta(minutes=seq)).isoformat(),
        "actor": {"department": actor, "person": "Sam"},
        "sequence": seq,
        "recorded_at": (T0 + timedelta(minutes=seq, seconds=1)).isoformat(),
        "trace_id": TRACE,
        **extra,
    }


def created(
    seq: int = 1,
    *,
    requester: str = "finance",
    watchers: tuple[str, ...] = (),
    title: str = "Laptop for new hire",
    **extra: Any,
) -> Created:
    doc = _envelope(
        seq,
        requester,
        type="created",
        title=title,
        category="laptop",
        priority="high",
        requester={"department": requester, "person": "Ana"},
        watchers=list(watchers),
        **extra,
    )
    return Created.model_validate(doc)


def routed(seq: int = 2, *, provider: str = "it", rule: str = "category:laptop", **extra: Any) -> Routed:
    doc = _envelope(
        seq, "baton", type="routed", provider_department=provider, rule=rule, caused_by=f"evt-{RID}-001", **extra
    )
    return Routed.model_validate(doc)


def accepted(seq: int = 3, *, by: str = "it", eta: datetime = NEW_ETA) -> Accepted:
    return Accepted.model_validate(_envelope(seq, by, type="accepted", assignee="Sam", eta=eta.isoformat()))


def delayed(seq: int = 4, *, by: str = "it", new_eta: datetime = NEW_ETA, **extra: Any) -> Delayed:
    doc = _envelope(seq, by, type="delayed", reason="supplier backorder", new_eta=new_eta.isoformat(), **extra)
    return Delayed.model_validate(doc)


def resolved(seq: int = 5, *, by: str = "it", outcome: str = "done") -> Resolved:
    doc = _envelope(seq, by, type="resolved", resolution="delivered to desk 4", outcome=outcome)
    return Resolved.model_validate(doc)


def projection(**changes: Any) -> Projection:
    base = Projection(
        request_id=RID,
        requester_department="finance",
        holder_department="it",
        past_holders=("service-desk", "it"),
        watchers=("legal", "hr"),
        title="Laptop for new hire",
        eta=OLD_ETA,
        delay_count=1,
        last_sequence=3,
    )
    return replace(base, **changes)


def who(event: LifecycleEvent, before: Projection | None) -> dict[str, Role]:
    result = plan(before, event, DIRECTORY, NOW)
    assert isinstance(result, Plan)
    return {n.department: n.role for n in result.notifications}


R, P, W = Role.REQUESTER, Role.PROVIDER, Role.WATCHER


# --- who hears what ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "before", "expected"),
    [
        pytest.param(created(watchers=("legal", "hr")), None, {"finance": R, "legal": W, "hr": W}, id="created"),
        pytest.param(
            routed(seq=2),
            projection(holder_department=None, past_holders=(), eta=None, delay_count=0, last_sequence=1),
            {"it": P, "finance": R},
            id="routed: new provider and requester, not the watchers",
        ),
        pytest.param(accepted(seq=4), projection(), {"finance": R, "it": P}, id="accepted: requester and holder only"),
        pytest.param(
            delayed(seq=4),
            projection(),
            {"finance": R, "it": P, "service-desk": P, "legal": W, "hr": W},
            id="delayed: requester, holder, every past holder, watchers",
        ),
        pytest.param(
            resolved(seq=4),
            projection(),
            {"finance": R, "it": P, "service-desk": P, "legal": W, "hr": W},
            id="resolved: requester, holder, every past holder, watchers",
        ),
    ],
)
def test_who_hears_what(event: LifecycleEvent, before: Projection | None, expected: dict[str, Role]) -> None:
    assert who(event, before) == expected


@pytest.mark.parametrize(
    ("event", "before", "expected"),
    [
        pytest.param(
            created(watchers=("finance", "legal")), None, {"finance": R, "legal": W}, id="requester also watches"
        ),
        pytest.param(created(watchers=("legal", "legal")), None, {"finance": R, "legal": W}, id="watcher listed twice"),
        pytest.param(
            routed(seq=2, provider="finance"),
            projection(holder_department=None, past_holders=(), last_sequence=1),
            {"finance": P},
            id="routed to the requesting department itself",
        ),
        pytest.param(
            delayed(seq=4),
            projection(watchers=("service-desk", "it", "legal")),
            {"finance": R, "it": P, "service-desk": P, "legal": W},
            id="watchers that hold or held it hear as provider",
        ),
        pytest.param(
            resolved(seq=4, by="finance"),
            projection(holder_department="finance", past_holders=("finance",), watchers=("finance",)),
            {"finance": P},
            id="requester, holder and watcher at once",
        ),
        pytest.param(created(watchers=("baton",)), None, {"finance": R}, id="Baton itself is never told"),
    ],
)
def test_one_notification_per_department_in_the_strongest_role(
    event: LifecycleEvent, before: Projection | None, expected: dict[str, Role]
) -> None:
    result = plan(before, event, DIRECTORY, NOW)
    assert isinstance(result, Plan)
    departments = [n.department for n in result.notifications]
    assert len(departments) == len(set(departments))
    assert {n.department: n.role for n in result.notifications} == expected


def test_recipients_keep_a_stable_order() -> None:
    after = projection()
    assert recipients(after, after, delayed()) == [
        Recipient("finance", R),
        Recipient("it", P),
        Recipient("service-desk", P),
        Recipient("legal", W),
        Recipient("hr", W),
    ]


# --- the sentence --------------------------------------------------------------------------------


def text_for(event: LifecycleEvent, before: Projection | None, department: str, role: Role) -> str:
    after = advance(before, event)
    assert isinstance(after, Projection)
    return render(event, before, after, Recipient(department, role), DIRECTORY)


def test_created_text() -> None:
    event = created(provider_department="it")
    expected = "Finance raised 'Laptop for new hire' (REQ-8F2K0001) for IT — priority high"
    assert text_for(event, None, "finance", R) == expected


def test_created_text_without_provider_with_due_date_in_the_recipients_zone() -> None:
    event = created(due_by=NEW_ETA.isoformat())
    assert text_for(event, None, "legal", W) == (
        "Finance raised 'Laptop for new hire' (REQ-8F2K0001) in category laptop — priority high, "
        "due by Tue 25 Nov 08:00"
    )


def test_routed_text_for_the_requester() -> None:
    before = projection(holder_department=None, past_holders=(), last_sequence=1)
    expected = "'Laptop for new hire' (REQ-8F2K0001) was routed to IT (category laptop)"
    assert text_for(routed(), before, "finance", R) == expected


def test_routed_text_for_the_new_provider_is_new_work() -> None:
    before = projection(holder_department=None, past_holders=(), last_sequence=1)
    event = routed(accept_by=OLD_ETA.isoformat(), reason="hardware goes to IT")
    assert text_for(event, before, "it", P) == (
        "New work from Finance: 'Laptop for new hire' (REQ-8F2K0001) was routed to IT (category laptop): "
        "hardware goes to IT — accept by Mon 24 Nov 17:00"
    )


@pytest.mark.parametrize(
    ("rule", "shown"),
    [
        ("explicit-provider", "as the requester asked"),
        ("fallback", "fallback: no department serves its category"),
        ("vip", "rule vip"),
    ],
)
def test_routed_text_explains_the_rule(rule: str, shown: str) -> None:
    before = projection(holder_department=None, past_holders=(), last_sequence=1)
    text = text_for(routed(rule=rule, previous_department="service-desk"), before, "finance", R)
    assert text == f"'Laptop for new hire' (REQ-8F2K0001) was routed from Service Desk to IT ({shown})"


def test_accepted_text() -> None:
    before = projection(eta=None, delay_count=0, last_sequence=2)
    expected = "IT accepted 'Laptop for new hire' (REQ-8F2K0001): Sam will deliver by Tue 25 Nov 14:00"
    assert text_for(accepted(), before, "finance", R) == expected


@pytest.mark.parametrize(
    ("department", "new", "old"),
    [
        pytest.param("finance", "Tue 25 Nov 14:00", "Mon 24 Nov 17:00", id="Europe/Paris"),
        pytest.param("legal", "Tue 25 Nov 08:00", "Mon 24 Nov 11:00", id="America/New_York"),
        pytest.param("acme-it", "Tue 25 Nov 18:30", "Mon 24 Nov 21:30", id="Asia/Kolkata"),
        pytest.param("hr", "Tue 25 Nov 13:00", "Mon 24 Nov 16:00", id="catalog default UTC"),
        pytest.param("unknown-dept", "Tue 25 Nov 13:00", "Mon 24 Nov 16:00", id="not in the catalog: UTC"),
    ],
)
def test_delayed_text_in_the_recipients_time_zone(department: str, new: str, old: str) -> None:
    text = text_for(delayed(), projection(), department, R)
    assert text == (
        f"IT delayed 'Laptop for new hire' (REQ-8F2K0001): supplier backorder — new ETA {new}, was {old} (2nd delay)"
    )


def test_first_delay_without_a_previous_eta() -> None:
    text = text_for(delayed(blocking_department="acme-it"), projection(eta=None, delay_count=0), "finance", R)
    expected = (
        "IT delayed 'Laptop for new hire' (REQ-8F2K0001): supplier backorder (waiting on ACME) — "
        "new ETA Tue 25 Nov 14:00 (1st delay)"
    )
    assert text == expected


@pytest.mark.parametrize(("outcome", "shown"), [("done", "done"), ("wont_fix", "won't fix"), ("declined", "declined")])
def test_resolved_text(outcome: str, shown: str) -> None:
    text = text_for(resolved(outcome=outcome), projection(), "finance", R)
    assert text == f"IT resolved 'Laptop for new hire' (REQ-8F2K0001): {shown} — delivered to desk 4"


def test_unknown_department_is_shown_by_its_slug() -> None:
    before = projection(holder_department=None, past_holders=(), last_sequence=1)
    text = text_for(routed(provider="payroll-vendor"), before, "finance", R)
    assert "was routed to payroll-vendor (category laptop)" in text


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, "1st"),
        (2, "2nd"),
        (3, "3rd"),
        (4, "4th"),
        (11, "11th"),
        (12, "12th"),
        (13, "13th"),
        (21, "21st"),
        (22, "22nd"),
        (101, "101st"),
        (111, "111th"),
    ],
)
def test_ordinal(n: int, expected: str) -> None:
    assert ordinal(n) == expected


def test_when_uses_english_names_and_the_zone() -> None:
    assert when(NEW_ETA, DIRECTORY.zone("finance")) == "Tue 25 Nov 14:00"
    assert when(datetime(2026, 7, 5, 6, 5, tzinfo=UTC), UTC) == "Sun 5 Jul 06:05"


def test_clip_flattens_and_cuts() -> None:
    assert clip("a\n  b\tc", 10) == "a b c"
    assert clip("x" * 30, 10) == "x" * 9 + "…"


def test_long_titles_are_cut_in_the_sentence_but_not_in_the_title_field() -> None:
    result = plan(None, created(title="T" * 200), DIRECTORY, NOW)
    assert isinstance(result, Plan)
    (notification,) = result.notifications
    assert notification.title == "T" * 200
    assert "'" + "T" * 79 + "…'" in notification.text


# --- order, gaps and poison ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "seq", "expected"),
    [
        (0, 1, Order.APPLY),
        (3, 4, Order.APPLY),
        (3, 3, Order.ALREADY_APPLIED),
        (3, 1, Order.ALREADY_APPLIED),
        (0, 2, Order.GAP),
        (3, 6, Order.GAP),
    ],
)
def test_order(last: int, seq: int, expected: Order) -> None:
    assert order(last, seq) is expected


@pytest.mark.parametrize(("delivered", "expected"), [(1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (10_000, 30.0)])
def test_gap_delay_grows_and_is_capped(delivered: int, expected: float) -> None:
    assert gap_delay(delivered, 0.5, 30.0) == expected


def test_check_event() -> None:
    event = routed()
    assert check_event(event, f"baton.events.{RID}.routed") is None
    mismatch = check_event(event, f"baton.events.{RID}.created")
    assert isinstance(mismatch, Poison)
    assert mismatch.code == "subject_mismatch"
    unstamped = check_event(event.model_copy(update={"sequence": None}), f"baton.events.{RID}.routed")
    assert isinstance(unstamped, Poison)
    assert unstamped.code == "unstamped_event"


def test_advance_rejects_a_first_event_that_is_not_created_and_a_second_created() -> None:
    first = advance(None, routed(seq=1))
    assert isinstance(first, Poison)
    assert first.code == "unexpected_event"
    again = advance(projection(last_sequence=1), created(seq=2))
    assert isinstance(again, Poison)
    assert again.code == "unexpected_event"


def test_the_projection_follows_the_lifecycle() -> None:
    state: Projection | None = None
    for event in (created(watchers=("legal",)), routed(), accepted(eta=OLD_ETA), delayed(), resolved()):
        nxt = advance(state, event)
        assert isinstance(nxt, Projection)
        state = nxt
    assert state == Projection(
        request_id=RID,
        requester_department="finance",
        holder_department="it",
        past_holders=("it",),
        watchers=("legal",),
        title="Laptop for new hire",
        eta=NEW_ETA,
        delay_count=1,
        last_sequence=5,
    )


def test_notification_fields_and_id() -> None:
    event = delayed()
    result = plan(projection(), event, DIRECTORY, NOW)
    assert isinstance(result, Plan)
    first = result.notifications[0]
    assert first.notification_id == notification_id(event.event_id, "finance")
    assert first.notification_id.startswith("n-")
    assert len(first.notification_id) == 42
    assert notification_id(event.event_id, "it") != first.notification_id
    assert notification_id(event.event_id, "finance") == first.notification_id  # deterministic
    assert (first.request_id, first.type, first.sequence, first.trace_id) == (RID, "delayed", 4, TRACE)
    assert (first.title, first.created_at, first.event) == ("Laptop for new hire", NOW, event)
    # the body round-trips through the contract
    again = Notification.model_validate_json(first.model_dump_json())
    assert again == first
    assert parse_event(first.event.model_dump_json()) == event


# --- the catalog loader ----------------------------------------------------------------------------


def test_the_example_catalog_loads() -> None:
    catalog = load_catalog(Path(__file__).parents[2] / "deploy" / "catalog.yaml")
    assert "it" in catalog.slugs
