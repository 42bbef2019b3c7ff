"""Contract v1: what is accepted, what is refused, and how refusals are explained."""

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from libs.contracts import Created, Delayed, dumps, error_list, parse_event
from libs.contracts.subjects import (
    SubjectError,
    event_subject,
    inbound_subject,
    notify_subject,
    parse_inbound_subject,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


def created_doc(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "type": "created",
        "event_id": "evt-00000001",
        "request_id": "REQ-8F2K0001",
        "occurred_at": T0.isoformat(),
        "actor": {"department": "marketing", "person": "Ana"},
        "schema_version": 1,
        "title": "Laptop for new hire",
        "category": "laptop",
        "priority": "high",
        "requester": {"department": "marketing", "person": "Ana"},
    }
    doc.update(over)
    return doc


@pytest.mark.parametrize("slug", ["it", "finance", "acme-it", "a1", "x" * 32])
def test_valid_slugs_make_subjects(slug: str) -> None:
    assert inbound_subject(slug, "created") == f"baton.in.{slug}.created"
    assert notify_subject(slug, "routed") == f"baton.notify.{slug}.routed"


@pytest.mark.parametrize("slug", ["it.>", "it *", "IT", "", "é", "i", "1t", "it\n", "x" * 33, "it.x", "*", ">"])
def test_bad_slugs_never_reach_a_subject(slug: str) -> None:
    with pytest.raises(SubjectError):
        inbound_subject(slug, "created")
    with pytest.raises(SubjectError):
        notify_subject(slug, "created")
    with pytest.raises(ValidationError):
        Created.model_validate(created_doc(actor={"department": slug, "person": "Ana"}))


@pytest.mark.parametrize("request_id", ["short", "has space1", "has.dot.123", "x" * 65, "REQ*0000001", "REQ>0000001"])
def test_bad_request_ids_never_reach_a_subject(request_id: str) -> None:
    with pytest.raises(SubjectError):
        event_subject(request_id, "created")


def test_parse_inbound_subject() -> None:
    ok = parse_inbound_subject("baton.in.it.accepted")
    assert (ok.source, ok.department, ok.event_type, ok.problems) == ("department", "it", "accepted", ())
    bad = parse_inbound_subject("baton.in.IT.accepted")
    assert bad.department is None
    assert bad.problems
    svc = parse_inbound_subject("baton.svc.routing.routed")
    assert (svc.source, svc.service, svc.event_type) == ("service", "routing", "routed")
    assert parse_inbound_subject("baton.in.it.created.extra").problems
    assert parse_inbound_subject("baton.svc.unknown.routed").source == "unknown"


def test_created_round_trips_through_json() -> None:
    event = parse_event(dumps(Created.model_validate(created_doc())))
    assert isinstance(event, Created)
    assert event.title == "Laptop for new hire"
    assert event.watchers == []


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValidationError) as info:
        Created.model_validate(created_doc(occurred_at="2026-11-24T09:00:00"))
    assert error_list(info.value)[0].loc == ["occurred_at"]


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError):
        Created.model_validate(created_doc(colour="blue"))


def test_field_errors_are_machine_and_human_readable() -> None:
    doc = created_doc()
    del doc["title"]
    doc["priority"] = "whenever"
    with pytest.raises(ValidationError) as info:
        parse_event(dumps_doc(doc))
    errors = {tuple(e.loc): e for e in error_list(info.value)}
    assert errors[("title",)].code == "missing"
    assert errors[("priority",)].code == "enum"
    assert "low" in errors[("priority",)].message


def test_delay_needs_reason_and_a_later_eta() -> None:
    base = {
        "type": "delayed",
        "event_id": "evt-00000004",
        "request_id": "REQ-8F2K0001",
        "occurred_at": T0.isoformat(),
        "actor": {"department": "it", "person": "Sam"},
    }
    with pytest.raises(ValidationError) as info:
        Delayed.model_validate({**base, "reason": "   ", "new_eta": (T0 + timedelta(days=1)).isoformat()})
    assert error_list(info.value)[0].loc == ["reason"]
    with pytest.raises(ValidationError) as info:
        Delayed.model_validate({**base, "reason": "backorder", "new_eta": (T0 - timedelta(hours=1)).isoformat()})
    assert "new_eta" in error_list(info.value)[0].message


def test_attributes_and_watchers_are_bounded() -> None:
    with pytest.raises(ValidationError):
        Created.model_validate(created_doc(attributes={f"k{i}": "v" for i in range(33)}))
    with pytest.raises(ValidationError):
        Created.model_validate(created_doc(watchers=["hr"] * 21))
    with pytest.raises(ValidationError):
        Created.model_validate(created_doc(title="x" * 201))


def dumps_doc(doc: dict[str, object]) -> bytes:
    import orjson

    return orjson.dumps(doc)
