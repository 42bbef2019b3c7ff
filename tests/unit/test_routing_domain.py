"""Routing rules, reasons, SLA deadlines and the routed event itself (services/routing/domain.py)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from libs.contracts import SYSTEM_DEPARTMENT, Catalog, Created, Priority, Routed, dumps, parse_event
from services.routing.domain import (
    RULE_EXPLICIT,
    RULE_FALLBACK,
    build_routed,
    choose_provider,
    decide,
    routed_event_id,
    sla_deadlines,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)

CATALOG = Catalog.model_validate(
    {
        "fallback_department": "service-desk",
        "departments": [
            {
                "slug": "service-desk",
                "name": "Service Desk",
                "categories": ["general"],
                "sla": {"normal": {"accept_within": "4h", "resolve_within": "2d"}},
            },
            {
                "slug": "it",
                "name": "IT",
                "categories": ["hardware", "laptop"],
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
                "sla": {"normal": {"accept_within": "1d", "resolve_within": "7d"}},
            },
        ],
    }
)


def created(**overrides: Any) -> Created:
    fields: dict[str, Any] = {
        "event_id": "ev-created-0001",
        "request_id": "REQ-0000001",
        "occurred_at": T0,
        "actor": {"department": "hr", "person": "Ana"},
        "title": "New laptop for a new hire",
        "category": "laptop",
        "priority": "normal",
        "requester": {"department": "hr", "person": "Ana"},
        "sequence": 1,
        "recorded_at": T0 + timedelta(seconds=1),
        "trace_id": "0" * 31 + "1",
    }
    fields.update(overrides)
    return Created.model_validate(fields)


# --- the rules ------------------------------------------------------------------------
def test_explicit_provider_wins_when_it_serves_the_category() -> None:
    dept, rule, reason = choose_provider(CATALOG, "hardware", "acme-it")
    assert (dept.slug, rule) == ("acme-it", RULE_EXPLICIT)
    assert reason == "acme-it was asked for and serves category 'hardware'"


def test_explicit_provider_ignored_when_it_does_not_serve_the_category() -> None:
    dept, rule, reason = choose_provider(CATALOG, "laptop", "finance")
    assert (dept.slug, rule) == ("it", "category:laptop")
    assert reason == "finance does not serve 'laptop'; it serves category 'laptop'"


def test_explicit_provider_ignored_when_unknown() -> None:
    dept, rule, reason = choose_provider(CATALOG, "laptop", "nowhere")
    assert (dept.slug, rule) == ("it", "category:laptop")
    assert reason == "requested provider nowhere is not in the catalog; it serves category 'laptop'"


def test_category_match_takes_the_first_department_in_catalog_order() -> None:
    dept, rule, reason = choose_provider(CATALOG, "hardware", None)
    assert (dept.slug, rule) == ("it", "category:hardware")  # it comes before acme-it
    assert reason == "it serves category 'hardware'"


def test_fallback_when_no_department_serves_the_category() -> None:
    dept, rule, reason = choose_provider(CATALOG, "catering", None)
    assert (dept.slug, rule) == ("service-desk", RULE_FALLBACK)
    assert reason == "no department serves 'catering'; fallback to triage department service-desk"


def test_fallback_explains_the_ignored_explicit_provider() -> None:
    dept, rule, reason = choose_provider(CATALOG, "catering", "finance")
    assert (dept.slug, rule) == ("service-desk", RULE_FALLBACK)
    assert reason == "finance does not serve 'catering'; fallback to triage department service-desk"


def test_fallback_with_an_unknown_explicit_provider() -> None:
    _, rule, reason = choose_provider(CATALOG, "catering", "nowhere")
    assert rule == RULE_FALLBACK
    assert reason == ("requested provider nowhere is not in the catalog; fallback to triage department service-desk")


def test_explicit_fallback_department_still_needs_to_serve_the_category() -> None:
    dept, rule, _ = choose_provider(CATALOG, "laptop", "service-desk")
    assert (dept.slug, rule) == ("it", "category:laptop")


# --- SLA deadlines --------------------------------------------------------------------
def test_deadlines_are_occurred_at_plus_the_providers_sla_for_the_priority() -> None:
    decision = decide(CATALOG, created(priority="urgent"))
    assert decision.provider_department == "it"
    assert decision.accept_by == T0 + timedelta(minutes=15)
    assert decision.resolve_by == T0 + timedelta(hours=4)


def test_no_sla_for_the_priority_means_no_deadline() -> None:
    decision = decide(CATALOG, created(priority="low"))
    assert (decision.accept_by, decision.resolve_by) == (None, None)
    finance = CATALOG.get("finance")
    assert finance is not None
    assert sla_deadlines(finance, Priority.NORMAL, T0) == (None, None)


def test_deadlines_are_wall_clock_in_utc_whatever_the_input_offset() -> None:
    paris = timezone(timedelta(hours=1))
    start = datetime(2026, 11, 27, 17, 0, tzinfo=paris)  # a Friday evening: no business-hours math yet
    it = CATALOG.get("it")
    assert it is not None
    accept_by, resolve_by = sla_deadlines(it, Priority.NORMAL, start)
    assert accept_by == datetime(2026, 11, 27, 20, 0, tzinfo=UTC)
    assert resolve_by == datetime(2026, 11, 30, 16, 0, tzinfo=UTC)
    assert accept_by is not None
    assert accept_by.utcoffset() == timedelta(0)


# --- the routed event -----------------------------------------------------------------
def test_routed_event_id_is_deterministic() -> None:
    expected = "rt-" + hashlib.sha256(b"ev-created-0001").hexdigest()[:40]
    assert routed_event_id("ev-created-0001") == expected
    assert routed_event_id("ev-created-0001") == routed_event_id("ev-created-0001")
    assert routed_event_id("ev-created-0002") != expected
    assert len(expected) == 43


def test_build_routed_carries_the_decision_and_no_intake_stamps() -> None:
    event = created(provider_department="acme-it", category="hardware", priority="normal")
    now = datetime(2026, 11, 24, 9, 31, 5, tzinfo=UTC)
    routed = build_routed(event, decide(CATALOG, event), now)
    assert isinstance(routed, Routed)
    assert routed.event_id == routed_event_id(event.event_id)
    assert routed.request_id == event.request_id
    assert (routed.actor.department, routed.actor.person) == (SYSTEM_DEPARTMENT, "routing")
    assert routed.occurred_at == now
    assert routed.caused_by == event.event_id
    assert (routed.provider_department, routed.rule) == ("acme-it", RULE_EXPLICIT)
    assert routed.accept_by == T0 + timedelta(days=1)
    assert routed.resolve_by == T0 + timedelta(days=7)
    assert (routed.sequence, routed.recorded_at, routed.trace_id) == (None, None, None)
    body = dumps(routed)
    for stamped in (b'"sequence"', b'"recorded_at"', b'"trace_id"'):
        assert stamped not in body
    assert parse_event(body) == routed  # round-trips through the contract
