"""Intake's behaviour: checking an inbound message and the request lifecycle state machine.

Pure functions, no I/O and no FastStream: everything here is unit-tested directly.

The machine (contract v1; the diagram is in docs/lifecycle.md)::

    created --routed--> routed --accepted--> accepted --delayed*--> accepted --resolved--> resolved
                         |  ^                   |                                |      |
                declined |  | routed            | reassigned           reopened |      | feedback
                         v  |                   v                                v      v
                       declined            routed (new holder)         routed (same)  closed

* ``created``, ``reopened``, ``feedback``: only the requester's department;
* ``routed`` / ``returned``: only Baton's routing service, while nobody holds the request (created, declined);
* ``sla_warning``, ``escalated``, ``handoff_loop_detected``: only routing; they join the sequence, state unchanged;
* ``accepted``, ``delayed``, ``resolved``, ``declined``, ``reassigned``: only the holding department;
* ``commented``: the requester or the holding department, in any state but closed;
* ``delayed`` needs a ``new_eta`` later than the current ETA; ``reassigned`` needs another department;
* ``feedback`` closes the request: nothing may follow it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson
from pydantic import ValidationError

from libs.contracts import EVENT_ADAPTER, INBOUND_TYPES, SERVICE_TYPES, SYSTEM_DEPARTMENT, error_list
from libs.contracts.envelope import Envelope
from libs.contracts.events import (
    Accepted,
    Commented,
    Created,
    Declined,
    Delayed,
    Escalated,
    Feedback,
    HandoffLoopDetected,
    LifecycleEvent,
    Reassigned,
    Reopened,
    Resolved,
    Returned,
    Routed,
    SlaWarning,
)
from libs.contracts.notifications import FieldError, RejectionCode
from libs.contracts.subjects import ParsedInbound, parse_inbound_subject

#: Largest inbound payload intake accepts (the stream allows 1 MiB; a lifecycle event is far smaller).
MAX_PAYLOAD_BYTES = 64 * 1024


class State(StrEnum):
    CREATED = "created"  # waiting for routing
    ROUTED = "routed"  # a provider holds it, not yet accepted (also after reassigned / reopened)
    ACCEPTED = "accepted"  # in progress (possibly delayed)
    DECLINED = "declined"  # the provider refused it; waiting for routing again
    RETURNED = "returned"  # routing handed it back to the requester (nobody could serve it)
    RESOLVED = "resolved"
    CLOSED = "closed"  # the requester gave feedback: final


@dataclass(frozen=True)
class RequestState:
    """What intake knows about one request; the row intake keeps per request."""

    request_id: str
    state: State
    requester_department: str
    holder_department: str | None
    last_sequence: int
    eta: datetime | None
    delay_count: int
    title: str
    trace_id: str | None
    declined_by: tuple[str, ...] = ()
    reopen_count: int = 0


@dataclass(frozen=True)
class Refusal:
    """Why an event is refused: a machine code, a human message, and field-level errors."""

    code: RejectionCode
    message: str
    errors: tuple[FieldError, ...] = ()


@dataclass(frozen=True)
class Checked:
    """An inbound message that passed every check that needs no stored state."""

    event: LifecycleEvent
    payload_hash: str
    department: str | None  # publishing department (None for Baton's services)


@dataclass(frozen=True)
class Rejected:
    refusal: Refusal
    parsed: ParsedInbound
    document: dict[str, Any] | None  # the decoded JSON object, when it was one


def payload_hash(event: Envelope) -> str:
    """Hash of an event's meaning (canonical JSON, stamps excluded): equal events hash equal."""
    doc = event.model_dump(mode="json", exclude=set(Envelope.STAMPED_FIELDS), exclude_none=True)
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def check_inbound(subject: str, data: bytes) -> Checked | Rejected:
    """Everything that can be checked about an inbound message without stored state."""
    parsed = parse_inbound_subject(subject)
    if parsed.problems:
        return Rejected(Refusal(RejectionCode.BAD_SUBJECT, "; ".join(parsed.problems)), parsed, None)
    document = decode_document(data)
    if isinstance(document, Refusal):
        return Rejected(document, parsed, None)
    return check_document(parsed, document)


def decode_document(data: bytes) -> dict[str, Any] | Refusal:
    """The payload as a JSON object, or why it is not one (too large, not JSON, not an object)."""
    if len(data) > MAX_PAYLOAD_BYTES:
        return Refusal(RejectionCode.TOO_LARGE, f"payload is {len(data)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return Refusal(RejectionCode.MALFORMED_JSON, f"payload is not valid JSON: {exc}")
    if not isinstance(document, dict):
        return Refusal(RejectionCode.MALFORMED_JSON, "payload must be a JSON object")
    return document


def check_document(parsed: ParsedInbound, document: dict[str, Any]) -> Checked | Rejected:
    """The checks on a decoded JSON object published on the (already checked) subject ``parsed``."""
    stamped = sorted(k for k in Envelope.STAMPED_FIELDS if k in document)
    if stamped:
        errors = tuple(FieldError(loc=[k], code="stamped_field", message="set by intake; omit it") for k in stamped)
        msg = f"fields set by intake must be omitted: {', '.join(stamped)}"
        return Rejected(Refusal(RejectionCode.STAMPED_FIELD, msg, errors), parsed, document)

    if parsed.source == "department" and parsed.department == SYSTEM_DEPARTMENT:
        msg = f"the slug {SYSTEM_DEPARTMENT!r} is reserved for Baton's own services"
        return Rejected(Refusal(RejectionCode.NOT_ALLOWED, msg), parsed, document)
    if parsed.source == "department" and parsed.event_type not in INBOUND_TYPES:
        msg = f"departments may publish {sorted(INBOUND_TYPES)}, not {parsed.event_type!r}"
        return Rejected(Refusal(RejectionCode.NOT_ALLOWED, msg), parsed, document)
    if parsed.source == "service" and SERVICE_TYPES.get(parsed.event_type or "") != parsed.service:
        msg = f"service {parsed.service!r} does not own event type {parsed.event_type!r}"
        return Rejected(Refusal(RejectionCode.NOT_ALLOWED, msg), parsed, document)

    try:
        event = EVENT_ADAPTER.validate_python(document)
    except ValidationError as exc:
        errors = tuple(error_list(exc))
        summary = "; ".join(f"{'.'.join(map(str, e.loc)) or '(root)'}: {e.message}" for e in errors[:5])
        return Rejected(Refusal(RejectionCode.VALIDATION_FAILED, f"invalid event: {summary}", errors), parsed, document)

    if event.type != parsed.event_type:
        err = FieldError(loc=["type"], code="subject_mismatch", message=f"subject says {parsed.event_type!r}")
        msg = f"event type {event.type!r} does not match the subject's {parsed.event_type!r}"
        return Rejected(Refusal(RejectionCode.SUBJECT_MISMATCH, msg, (err,)), parsed, document)

    expected_actor = parsed.department if parsed.source == "department" else SYSTEM_DEPARTMENT
    if event.actor.department != expected_actor:
        err = FieldError(loc=["actor", "department"], code="subject_mismatch", message=f"must be {expected_actor!r}")
        msg = f"actor.department {event.actor.department!r} does not match the publisher {expected_actor!r}"
        return Rejected(Refusal(RejectionCode.SUBJECT_MISMATCH, msg, (err,)), parsed, document)

    return Checked(event, payload_hash(event), parsed.department)


def _refuse(code: RejectionCode, message: str, *loc: str) -> Refusal:
    errors = (FieldError(loc=list(loc), code=code.value, message=message),) if loc else ()
    return Refusal(code, message, errors)


def decide(current: RequestState | None, event: LifecycleEvent) -> RequestState | Refusal:
    """Apply ``event`` to ``current``: the next state, or why the event is refused.

    ``current.last_sequence`` is advanced by one on success; the caller stamps that
    sequence on the canonical event.
    """
    if isinstance(event, Created):
        if current is not None:
            return _refuse(RejectionCode.DUPLICATE_REQUEST, f"request {event.request_id} already exists", "request_id")
        if event.requester.department != event.actor.department:
            return _refuse(
                RejectionCode.NOT_ALLOWED,
                "a request is created by the requester's own department (requester.department must equal "
                "actor.department)",
                "requester",
                "department",
            )
        return RequestState(
            request_id=event.request_id,
            state=State.CREATED,
            requester_department=event.requester.department,
            holder_department=None,
            last_sequence=1,
            eta=None,
            delay_count=0,
            title=event.title,
            trace_id=None,
        )

    if current is None:
        return _refuse(RejectionCode.UNKNOWN_REQUEST, f"request {event.request_id} does not exist", "request_id")
    if current.state is State.CLOSED:
        return _refuse(
            RejectionCode.ILLEGAL_TRANSITION,
            f"request {event.request_id} is closed: feedback was given, nothing follows",
        )

    nxt = replace(current, last_sequence=current.last_sequence + 1)
    dept = event.actor.department

    if isinstance(event, Routed):
        if current.state not in (State.CREATED, State.DECLINED):
            return _refuse(RejectionCode.ILLEGAL_TRANSITION, f"cannot route a request that is {current.state}")
        return replace(nxt, state=State.ROUTED, holder_department=event.provider_department)

    if isinstance(event, Returned):
        if current.state not in (State.CREATED, State.DECLINED):
            return _refuse(RejectionCode.ILLEGAL_TRANSITION, f"cannot return a request that is {current.state}")
        return replace(nxt, state=State.RETURNED, holder_department=None)

    if isinstance(event, SlaWarning | Escalated | HandoffLoopDetected):
        # Notices join the sequence without changing the state; a timer racing a resolution is refused.
        if current.state in (State.RESOLVED, State.RETURNED):
            return _refuse(RejectionCode.ILLEGAL_TRANSITION, f"no {event.type} for a request that is {current.state}")
        return nxt

    if isinstance(event, Commented):
        parties = {current.requester_department, current.holder_department} - {None}
        if dept not in parties:
            return _refuse(
                RejectionCode.NOT_ALLOWED,
                f"only the requester ({current.requester_department}) or the holder "
                f"({current.holder_department or 'nobody yet'}) may comment",
                "actor",
                "department",
            )
        return nxt

    if isinstance(event, Reopened | Feedback):
        if dept != current.requester_department:
            return _refuse(
                RejectionCode.NOT_ALLOWED,
                f"only the requester's department ({current.requester_department}) may publish {event.type}",
                "actor",
                "department",
            )
        if current.state is not State.RESOLVED:
            return _refuse(
                RejectionCode.ILLEGAL_TRANSITION, f"{event.type} needs a resolved request; it is {current.state}"
            )
        if isinstance(event, Feedback):
            return replace(nxt, state=State.CLOSED)
        return replace(nxt, state=State.ROUTED, eta=None, reopen_count=current.reopen_count + 1)

    # accepted / delayed / resolved / declined / reassigned: only the department holding the request
    if current.holder_department is None or dept != current.holder_department:
        holder = current.holder_department or "no department yet"
        return _refuse(
            RejectionCode.NOT_ALLOWED,
            f"only the department holding the request ({holder}) may publish {event.type}",
            "actor",
            "department",
        )

    if isinstance(event, Accepted):
        if current.state is not State.ROUTED:
            return _refuse(RejectionCode.ILLEGAL_TRANSITION, f"cannot accept a request that is {current.state}")
        return replace(nxt, state=State.ACCEPTED, eta=event.eta)

    if isinstance(event, Declined):
        if current.state is not State.ROUTED:
            return _refuse(
                RejectionCode.ILLEGAL_TRANSITION,
                f"cannot decline a request that is {current.state}; decline before accepting, or reassign it",
            )
        return replace(
            nxt, state=State.DECLINED, holder_department=None, declined_by=(*current.declined_by, dept), eta=None
        )

    if isinstance(event, Reassigned):
        if current.state not in (State.ROUTED, State.ACCEPTED):
            return _refuse(RejectionCode.ILLEGAL_TRANSITION, f"cannot reassign a request that is {current.state}")
        if event.to_department == dept:
            return _refuse(
                RejectionCode.ILLEGAL_TRANSITION, "reassign to another department, not to yourself", "to_department"
            )
        if event.to_department == SYSTEM_DEPARTMENT:
            return _refuse(
                RejectionCode.NOT_ALLOWED, f"{SYSTEM_DEPARTMENT!r} is reserved for Baton's services", "to_department"
            )
        return replace(nxt, state=State.ROUTED, holder_department=event.to_department, eta=None)

    if isinstance(event, Delayed):
        if current.state is not State.ACCEPTED:
            return _refuse(
                RejectionCode.ILLEGAL_TRANSITION, f"cannot delay a request that is {current.state}; accept it first"
            )
        if current.eta is not None and event.new_eta <= current.eta:
            return _refuse(
                RejectionCode.ILLEGAL_TRANSITION,
                f"new_eta {event.new_eta.isoformat()} must be later than the current ETA {current.eta.isoformat()}",
                "new_eta",
            )
        return replace(nxt, eta=event.new_eta, delay_count=current.delay_count + 1)

    if isinstance(event, Resolved):
        if current.state is not State.ACCEPTED:
            return _refuse(
                RejectionCode.ILLEGAL_TRANSITION, f"cannot resolve a request that is {current.state}; accept it first"
            )
        return replace(nxt, state=State.RESOLVED)

    return _refuse(RejectionCode.NOT_ALLOWED, f"unsupported event type {event.type}")  # pragma: no cover


def stamp(event: LifecycleEvent, sequence: int, recorded_at: datetime, trace_id: str | None) -> LifecycleEvent:
    """The canonical form of an accepted event: the published event plus intake's stamps."""
    return event.model_copy(update={"sequence": sequence, "recorded_at": recorded_at, "trace_id": trace_id})
