"""Intake's state machine and inbound checks, without I/O."""

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from libs.contracts import Accepted, Created, Delayed, Resolved, Routed
from libs.contracts.notifications import RejectionCode
from services.intake.domain import (
    MAX_PAYLOAD_BYTES,
    Checked,
    Refusal,
    Rejected,
    RequestState,
    State,
    check_inbound,
    decide,
    payload_hash,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
RID = "REQ-8F2K0001"


def env(event_id: str, dept: str, minutes: int = 0) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "request_id": RID,
        "occurred_at": T0 + timedelta(minutes=minutes),
        "actor": {"department": dept, "person": "someone"},
    }


def created() -> Created:
    return Created(
        **env("evt-created1", "marketing"),
        title="Laptop for new hire",
        category="laptop",
        priority="high",
        requester={"department": "marketing", "person": "Ana"},
    )


def routed(to: str = "it") -> Routed:
    return Routed(**env("evt-routed01", "baton", 1), provider_department=to, rule="category:laptop", caused_by="x" * 8)


def accepted(dept: str = "it", eta_h: int = 24) -> Accepted:
    return Accepted(**env("evt-accept01", dept, 2), assignee="Sam", eta=T0 + timedelta(hours=eta_h))


def delayed(dept: str = "it", eta_h: int = 48) -> Delayed:
    return Delayed(**env("evt-delay001", dept, 3), reason="supplier backorder", new_eta=T0 + timedelta(hours=eta_h))


def resolved(dept: str = "it") -> Resolved:
    return Resolved(**env("evt-resolve1", dept, 4), resolution="delivered", outcome="done")


def run(*events: Any) -> RequestState | Refusal:
    state: RequestState | None = None
    for event in events:
        result = decide(state, event)
        if isinstance(result, Refusal):
            return result
        state = result
    assert state is not None
    return state


def test_happy_path_counts_sequences() -> None:
    state = run(created(), routed(), accepted(), delayed(), delayed(eta_h=72), resolved())
    assert isinstance(state, RequestState)
    assert state.state is State.RESOLVED
    assert state.last_sequence == 6
    assert state.delay_count == 2
    assert state.holder_department == "it"


@pytest.mark.parametrize(
    ("events", "code"),
    [
        ((routed(),), RejectionCode.UNKNOWN_REQUEST),
        ((created(), created()), RejectionCode.DUPLICATE_REQUEST),
        ((created(), resolved()), RejectionCode.NOT_ALLOWED),  # nobody holds it yet
        ((created(), routed(), resolved()), RejectionCode.ILLEGAL_TRANSITION),  # resolve before accept
        ((created(), routed(), accepted("finance")), RejectionCode.NOT_ALLOWED),  # wrong department
        ((created(), routed(), delayed()), RejectionCode.ILLEGAL_TRANSITION),  # delay before accept
        ((created(), routed(), accepted(eta_h=48), delayed(eta_h=24)), RejectionCode.ILLEGAL_TRANSITION),
        ((created(), routed(), routed()), RejectionCode.ILLEGAL_TRANSITION),
        ((created(), routed(), accepted(), accepted()), RejectionCode.ILLEGAL_TRANSITION),
        ((created(), routed(), accepted(), resolved(), delayed(eta_h=100)), RejectionCode.ILLEGAL_TRANSITION),
    ],
)
def test_illegal_transitions_are_refused_with_a_reason(events: tuple[Any, ...], code: RejectionCode) -> None:
    result = run(*events)
    assert isinstance(result, Refusal)
    assert result.code is code
    assert result.message


def test_created_must_come_from_the_requester() -> None:
    event = created().model_copy(update={"requester": created().requester.model_copy(update={"department": "hr"})})
    result = decide(None, event)
    assert isinstance(result, Refusal)
    assert result.code is RejectionCode.NOT_ALLOWED


def doc(event: Any) -> bytes:
    return orjson.dumps(event.model_dump(mode="json", exclude_none=True))


def test_check_inbound_accepts_a_good_event() -> None:
    result = check_inbound("baton.in.marketing.created", doc(created()))
    assert isinstance(result, Checked)
    assert result.department == "marketing"
    assert result.payload_hash == payload_hash(created())


@pytest.mark.parametrize(
    ("subject", "data", "code"),
    [
        ("baton.in.IT.created", None, RejectionCode.BAD_SUBJECT),
        ("baton.in.marketing", None, RejectionCode.BAD_SUBJECT),
        ("baton.in.marketing.created", b"{not json", RejectionCode.MALFORMED_JSON),
        ("baton.in.marketing.created", b"[1, 2]", RejectionCode.MALFORMED_JSON),
        ("baton.in.marketing.created", b"{}", RejectionCode.VALIDATION_FAILED),
        ("baton.in.marketing.created", b"x" * (MAX_PAYLOAD_BYTES + 1), RejectionCode.TOO_LARGE),
        ("baton.in.finance.created", None, RejectionCode.SUBJECT_MISMATCH),  # actor is marketing
        ("baton.in.marketing.accepted", None, RejectionCode.SUBJECT_MISMATCH),  # type mismatch
        ("baton.in.marketing.routed", None, RejectionCode.NOT_ALLOWED),  # departments can't route
        ("baton.svc.routing.created", None, RejectionCode.NOT_ALLOWED),  # routing owns only routed
    ],
)
def test_check_inbound_refusals(subject: str, data: bytes | None, code: RejectionCode) -> None:
    result = check_inbound(subject, doc(created()) if data is None else data)
    assert isinstance(result, Rejected)
    assert result.refusal.code is code
    assert result.refusal.message


def test_stamped_fields_are_refused() -> None:
    payload = orjson.loads(doc(created()))
    payload["sequence"] = 7
    result = check_inbound("baton.in.marketing.created", orjson.dumps(payload))
    assert isinstance(result, Rejected)
    assert result.refusal.code is RejectionCode.STAMPED_FIELD
    assert result.refusal.errors[0].loc == ["sequence"]


def test_service_events_need_the_system_actor() -> None:
    result = check_inbound("baton.svc.routing.routed", doc(routed()))
    assert isinstance(result, Checked)
    assert result.department is None
    forged = routed().model_copy(update={"actor": routed().actor.model_copy(update={"department": "it"})})
    result = check_inbound("baton.svc.routing.routed", doc(forged))
    assert isinstance(result, Rejected)
    assert result.refusal.code is RejectionCode.SUBJECT_MISMATCH


def test_payload_hash_ignores_formatting_but_not_meaning() -> None:
    a = created()
    b = Created.model_validate_json(orjson.dumps(orjson.loads(doc(a)), option=orjson.OPT_INDENT_2))
    assert payload_hash(a) == payload_hash(b)
    assert payload_hash(a) != payload_hash(a.model_copy(update={"title": "Other"}))
