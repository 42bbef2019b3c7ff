"""Routing steps, rules, reasons, business-hours deadlines and the events routing emits (services/routing/domain.py)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs.contracts import SYSTEM_DEPARTMENT, Catalog, Envelope, Priority, Routed, dumps, parse_event
from libs.contracts.events import LoopPattern, SlaClock
from services.routing.domain import (
    RULE_EXPLICIT,
    RULE_FALLBACK,
    RULE_SUGGESTED,
    RoutingRequest,
    build_escalated,
    build_loop,
    build_returned,
    build_routed,
    build_warning,
    business_amount,
    choose,
    clock_event_id,
    explain,
    match_rule,
    routed_event_id,
    sla_deadlines,
    workday,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)  # a Tuesday

CATALOG = Catalog.model_validate(
    {
        "fallback_department": "service-desk",
        "departments": [
            {
                "slug": "service-desk",
                "name": "Service Desk",
                "categories": ["general"],
                "business_hours": {"always": True},
                "sla": {"normal": {"accept_within": "4h", "resolve_within": "2d"}},
            },
            {
                "slug": "it",
                "name": "IT",
                "categories": ["hardware", "laptop"],
                "timezone": "Europe/Paris",
                "business_hours": {"start": "08:30", "end": "18:00"},
                "holidays": ["2026-12-25"],
                "sla": {
                    "normal": {"accept_within": "4h", "resolve_within": "3d"},
                    "urgent": {"accept_within": "15m", "resolve_within": "4h"},
                },
            },
            {"slug": "finance", "name": "Finance", "categories": ["invoice"]},
            {
                "slug": "acme-it",
                "name": "ACME",
                "kind": "vendor",
                "categories": ["hardware", "laptop-supply"],
                "business_hours": {"always": True},
                "sla": {"normal": {"accept_within": "1d", "resolve_within": "7d"}},
            },
            {"slug": "legal", "name": "Legal", "categories": ["contract-review"]},
        ],
        "rules": [
            {
                "name": "repairs-to-vendor",
                "when": {"categories": ["hardware", "laptop"], "title_keywords": ["broken", "repair"]},
                "route_to": "acme-it",
            },
            {
                "name": "paris-contracts",
                "when": {"attributes": {"site": ["paris", "lyon"]}, "title_keywords": ["contract"]},
                "route_to": "legal",
            },
            {
                "name": "urgent-from-finance",
                "when": {"priorities": ["urgent"], "requesters": ["finance"]},
                "route_to": "it",
            },
        ],
    }
)


def req(category: str = "laptop", title: str = "New laptop for a new hire", **kw: Any) -> RoutingRequest:
    return RoutingRequest(category=category, title=title, **kw)


# --- the steps ----------------------------------------------------------------------------------------
def test_explicit_provider_wins_when_it_serves_the_category() -> None:
    choice = choose(CATALOG, req("hardware", "Broken screen", requested_provider="it"))
    assert choice.department is not None
    assert (choice.department.slug, choice.rule) == ("it", RULE_EXPLICIT)  # even though a rule would match
    assert choice.reason == "it was asked for and serves category 'hardware'"


def test_explicit_provider_ignored_when_it_does_not_serve_the_category() -> None:
    choice = choose(CATALOG, req(requested_provider="finance"))
    assert choice.department is not None
    assert (choice.department.slug, choice.rule) == ("it", "category:laptop")
    assert choice.reason == "finance does not serve 'laptop'; it serves category 'laptop'"


def test_explicit_provider_ignored_when_unknown() -> None:
    choice = choose(CATALOG, req(requested_provider="nowhere"))
    assert choice.rule == "category:laptop"
    assert choice.reason == "requested provider nowhere is not in the catalog; it serves category 'laptop'"


def test_a_rule_on_category_and_title_keywords() -> None:
    choice = choose(CATALOG, req("laptop", "Laptop screen BROKEN after the move"))
    assert choice.department is not None
    assert (choice.department.slug, choice.rule) == ("acme-it", "rule:repairs-to-vendor")
    assert (
        choice.reason
        == "rule 'repairs-to-vendor' matched: category 'laptop' is in [hardware, laptop]; title has 'broken'"
    )


def test_keywords_match_whole_words_only() -> None:
    rule = CATALOG.rules[0]
    assert match_rule(rule, req("laptop", "Repair my laptop"))[0]
    assert not match_rule(rule, req("laptop", "Unbroken record"))[0]
    assert not match_rule(rule, req("laptop", "repairs pending"))[0]


def test_a_rule_on_attributes_is_case_insensitive_and_needs_every_condition() -> None:
    rule = CATALOG.rules[1]
    assert match_rule(rule, req("nda", "Contract for ACME", attributes={"site": "Paris"}))[0]
    matched, notes = match_rule(rule, req("nda", "Contract for ACME", attributes={"site": "berlin"}))
    assert not matched
    assert "attribute site is 'berlin', not one of [paris, lyon]" in notes
    matched, notes = match_rule(rule, req("nda", "Contract", attributes={}))
    assert not matched
    assert "attribute site is missing" in notes


def test_a_rule_on_priority_and_requester() -> None:
    choice = choose(CATALOG, req("invoice", "Pay now", priority=Priority.URGENT, requester="finance"))
    assert choice.department is not None
    assert (choice.department.slug, choice.rule) == ("it", "rule:urgent-from-finance")
    choice = choose(CATALOG, req("invoice", "Pay now", priority=Priority.URGENT, requester="hr"))
    assert choice.rule == "category:invoice"


def test_category_match_takes_the_first_department_in_catalog_order() -> None:
    choice = choose(CATALOG, req("hardware", "Dock"))
    assert choice.department is not None
    assert (choice.department.slug, choice.rule) == ("it", "category:hardware")  # it comes before acme-it
    assert choice.reason == "it serves category 'hardware'"


def test_fallback_when_no_department_serves_the_category() -> None:
    choice = choose(CATALOG, req("catering", "Lunch"))
    assert choice.department is not None
    assert (choice.department.slug, choice.rule) == ("service-desk", RULE_FALLBACK)
    assert choice.reason == "no department serves 'catering'; fallback to triage department service-desk"


def test_fallback_explains_the_ignored_explicit_provider() -> None:
    choice = choose(CATALOG, req("catering", "Lunch", requested_provider="finance"))
    assert choice.rule == RULE_FALLBACK
    assert choice.reason == (
        "finance does not serve 'catering'; no department serves 'catering'; fallback to triage department service-desk"
    )


def test_explicit_fallback_department_still_needs_to_serve_the_category() -> None:
    choice = choose(CATALOG, req(requested_provider="service-desk"))
    assert choice.rule == "category:laptop"


# --- after declines ---------------------------------------------------------------------------------------
def test_decliners_are_never_chosen_again() -> None:
    choice = choose(CATALOG, req("hardware", "Dock"), excluded=frozenset({"it"}))
    assert choice.department is not None
    assert (choice.department.slug, choice.rule) == ("acme-it", "category:hardware")


def test_the_decliners_suggestion_wins_when_it_serves_the_category() -> None:
    choice = choose(
        CATALOG, req("hardware", "Dock"), excluded=frozenset({"it"}), suggested="acme-it", suggested_by="it"
    )
    assert choice.department is not None
    assert (choice.department.slug, choice.rule) == ("acme-it", RULE_SUGGESTED)
    assert choice.reason == "it suggested acme-it, which serves 'hardware'"


def test_a_suggestion_that_does_not_serve_the_category_is_skipped() -> None:
    choice = choose(
        CATALOG, req("hardware", "Dock"), excluded=frozenset({"it"}), suggested="finance", suggested_by="it"
    )
    assert choice.rule == "category:hardware"
    assert choice.reason.startswith("suggested finance does not serve 'hardware'; ")


def test_a_rule_whose_target_declined_is_skipped() -> None:
    choice = choose(CATALOG, req("laptop", "Broken laptop"), excluded=frozenset({"acme-it"}))
    assert choice.department is not None
    assert (choice.department.slug, choice.rule) == ("it", "category:laptop")
    assert "rule 'repairs-to-vendor' matched but acme-it already declined" in choice.reason


def test_nobody_left_means_returned() -> None:
    choice = choose(CATALOG, req("hardware", "Dock"), excluded=frozenset({"it", "acme-it", "service-desk"}))
    assert choice.department is None
    assert choice.rule == "returned"
    assert "every department serving 'hardware' already declined (it, acme-it)" in choice.reason


# --- explain -------------------------------------------------------------------------------------------------
def test_explain_lists_every_step_with_its_outcome() -> None:
    choice = explain(CATALOG, req("laptop", "Broken laptop", requested_provider="finance"))
    outcomes = [(s.name, s.outcome) for s in choice.steps]
    assert outcomes == [
        (RULE_EXPLICIT, "skipped"),
        ("rule:repairs-to-vendor", "chosen"),
        ("rule:paris-contracts", "not reached"),
        ("rule:urgent-from-finance", "not reached"),
        ("category", "not reached"),
        (RULE_FALLBACK, "not reached"),
    ]
    assert choice.steps[0].detail == "finance does not serve 'laptop'"


def test_explain_says_why_each_rule_did_not_match() -> None:
    choice = explain(CATALOG, req("laptop", "New laptop"))
    rule_steps = {s.name: s for s in choice.steps if s.name.startswith("rule:")}
    assert rule_steps["rule:repairs-to-vendor"].detail == (
        "category 'laptop' is in [hardware, laptop]; title has none of [broken, repair]"
    )
    assert rule_steps["rule:urgent-from-finance"].outcome == "skipped"
    assert choice.rule == "category:laptop"


# --- SLA deadlines in business time -------------------------------------------------------------------------
def test_deadlines_count_the_providers_business_hours() -> None:
    it = CATALOG.get("it")
    assert it is not None
    friday_evening = datetime(2026, 11, 27, 16, 0, tzinfo=UTC)  # 17:00 in Paris: 1 working hour left
    accept_by, resolve_by = sla_deadlines(it, Priority.NORMAL, friday_evening)
    assert accept_by == datetime(2026, 11, 30, 10, 30, tzinfo=UTC)  # Monday 11:30 in Paris
    assert resolve_by is not None
    assert resolve_by.weekday() < 5
    assert accept_by.utcoffset() == timedelta(0)


def test_no_sla_for_the_priority_means_no_deadline() -> None:
    finance = CATALOG.get("finance")
    assert finance is not None
    assert sla_deadlines(finance, Priority.NORMAL, T0) == (None, None)
    it = CATALOG.get("it")
    assert it is not None
    assert sla_deadlines(it, Priority.LOW, T0) == (None, None)


# --- the events ------------------------------------------------------------------------------------------------
def test_routed_event_id_is_deterministic() -> None:
    expected = "rt-" + hashlib.sha256(b"ev-created-0001").hexdigest()[:40]
    assert routed_event_id("ev-created-0001") == expected
    assert routed_event_id("ev-created-0002") != expected


def test_build_routed_carries_the_decision_and_business_deadlines() -> None:
    choice = choose(CATALOG, req("hardware", "Dock", requested_provider="acme-it"))
    now = datetime(2026, 11, 24, 9, 31, 5, tzinfo=UTC)
    routed = build_routed("REQ-0000001", "ev-created-0001", choice, now, priority=Priority.NORMAL)
    assert isinstance(routed, Routed)
    assert routed.event_id == routed_event_id("ev-created-0001")
    assert (routed.actor.department, routed.actor.person) == (SYSTEM_DEPARTMENT, "routing")
    assert routed.occurred_at == now
    assert routed.caused_by == "ev-created-0001"
    assert (routed.provider_department, routed.rule) == ("acme-it", RULE_EXPLICIT)
    assert routed.accept_by == now + timedelta(days=1)  # acme-it works around the clock in this catalog
    assert routed.resolve_by == now + timedelta(days=7)
    assert (routed.sequence, routed.recorded_at, routed.trace_id) == (None, None, None)
    assert parse_event(dumps(routed)) == routed


def test_notice_ids_are_one_per_clock_episode() -> None:
    one = clock_event_id("esc", "REQ-0000001", "it", SlaClock.ACCEPT, 1)
    assert one == clock_event_id("esc", "REQ-0000001", "it", SlaClock.ACCEPT, 1)
    assert one != clock_event_id("esc", "REQ-0000001", "it", SlaClock.ACCEPT, 2)
    assert one != clock_event_id("esc", "REQ-0000001", "it", SlaClock.RESOLVE, 1)
    assert one.startswith("esc-")
    assert 8 <= len(one) <= 64


def test_returned_warning_escalated_and_loop_events_validate() -> None:
    escalated = build_escalated("REQ-0000001", "it", SlaClock.ACCEPT, 1, T0, timedelta(seconds=-3), T0)
    assert escalated.overdue_seconds == 0.0  # never negative
    events: list[Envelope] = [
        escalated,
        build_returned("REQ-0000001", "ev-declined-1", "it declined: not ours", ["it"], T0),
        build_warning(
            "REQ-0000001", "it", SlaClock.ACCEPT, 1, T0 + timedelta(hours=1), 0.75, timedelta(minutes=15), T0
        ),
        build_loop("REQ-0000001", "ev-reassigned1", LoopPattern.BOUNCE, ["it", "acme-it", "it"], "bounced", T0),
    ]
    for event in events:
        assert parse_event(dumps(event)) == event


def test_a_day_of_sla_is_one_working_day_of_the_department() -> None:
    it, acme = CATALOG.get("it"), CATALOG.get("acme-it")
    assert it is not None
    assert acme is not None
    assert workday(it) == timedelta(hours=9, minutes=30)
    assert business_amount(timedelta(days=2, hours=1), it) == timedelta(hours=20)
    assert business_amount(timedelta(minutes=15), it) == timedelta(minutes=15)
    assert business_amount(timedelta(days=2), acme) == timedelta(days=2)  # around the clock: 24 h days
    tuesday_10 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)  # 10:00 in Paris
    _, resolve_by = sla_deadlines(it, Priority.NORMAL, tuesday_10)  # 3d
    assert resolve_by == datetime(2026, 11, 27, 9, 0, tzinfo=UTC)  # the same time, three working days later
