"""Property: intake's gatekeeper (``check_inbound`` + ``decide``) always agrees with a reference model.

Random sequences of events for a few requests, published by the requester, the holder, outsiders
and Baton's routing service, valid and invalid, are fed through ``check_inbound`` (subject and
payload) and ``decide`` (the lifecycle). After every step the outcome (applied, or refused with which
code) and the whole request state must equal what the reference model below says.

The reference model is written from the documented machine (docs/lifecycle.md): two small tables
(who may publish each event type, and which state each event type moves each state to) plus a few
guards. It never calls intake's code. Generation resolves abstract roles ("the holder", "an
outsider") against the *model's* state, so sequences reach deep states (resolved, reopened, closed)
instead of being refused at the first step.

``BATON_PROPERTY_EXAMPLES=5000`` runs more examples than the default 200.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.contracts import Actor, Reassigned
from libs.contracts.notifications import RejectionCode
from services.intake.domain import Checked, Refusal, RequestState, State, check_inbound, decide

pytestmark = pytest.mark.unit

#: More examples on demand (``BATON_PROPERTY_EXAMPLES=5000``); set on the test, not as a global profile,
#: so other hypothesis users in the session (schemathesis) keep their own settings.
MAX_EXAMPLES = int(os.environ.get("BATON_PROPERTY_EXAMPLES", "200"))

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
PLUS_ONE = timezone(timedelta(hours=1))
REQUEST_IDS = ("REQ-PROP0001", "REQ-PROP0002", "REQ-PROP0003")
DEFAULT_REQUESTER = {"REQ-PROP0001": "marketing", "REQ-PROP0002": "hr", "REQ-PROP0003": "marketing"}
PROVIDERS = ("it", "finance", "legal")
ROUTING = "routing"  # the publisher id of Baton's routing service (subject baton.svc.routing.<type>)
MAX_STEPS = 60
COVERAGE_SEED = 2026


# --- the reference model ------------------------------------------------------------------
class S(StrEnum):
    CREATED = "created"
    ROUTED = "routed"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    RETURNED = "returned"
    RESOLVED = "resolved"
    CLOSED = "closed"


class Party(StrEnum):
    REQUESTER = "requester"  # the department that created the request
    HOLDER = "holder"  # the department currently holding it
    EITHER = "either"  # the requester or the holder
    ROUTING = "routing"  # Baton's routing service (baton.svc.routing.<type>)


NOTICES = ("sla_warning", "escalated", "handoff_loop_detected")

#: Who may publish each event type (``created`` is the requester's by definition: it names the requester).
PUBLISHER: dict[str, Party] = {
    "created": Party.REQUESTER,
    "reopened": Party.REQUESTER,
    "feedback": Party.REQUESTER,
    "accepted": Party.HOLDER,
    "delayed": Party.HOLDER,
    "resolved": Party.HOLDER,
    "declined": Party.HOLDER,
    "reassigned": Party.HOLDER,
    "commented": Party.EITHER,
    "routed": Party.ROUTING,
    "returned": Party.ROUTING,
    **dict.fromkeys(NOTICES, Party.ROUTING),
}
EVENT_TYPES = tuple(PUBLISHER)

#: (event type, state before) -> state after. Anything missing is an illegal transition.
NEXT: dict[tuple[str, S], S] = {
    ("routed", S.CREATED): S.ROUTED,
    ("routed", S.DECLINED): S.ROUTED,
    ("returned", S.CREATED): S.RETURNED,
    ("returned", S.DECLINED): S.RETURNED,
    ("accepted", S.ROUTED): S.ACCEPTED,
    ("declined", S.ROUTED): S.DECLINED,
    ("reassigned", S.ROUTED): S.ROUTED,
    ("reassigned", S.ACCEPTED): S.ROUTED,
    ("delayed", S.ACCEPTED): S.ACCEPTED,
    ("resolved", S.ACCEPTED): S.RESOLVED,
    ("reopened", S.RESOLVED): S.ROUTED,
    ("feedback", S.RESOLVED): S.CLOSED,
    # comments: in every state but closed; notices: while the request is open and not resolved/returned
    **{("commented", s): s for s in S if s is not S.CLOSED},
    **{(n, s): s for n in NOTICES for s in (S.CREATED, S.ROUTED, S.ACCEPTED, S.DECLINED)},
}


@dataclass(frozen=True)
class Model:
    """The model's view of one request."""

    state: S
    requester: str
    holder: str | None
    sequence: int
    title: str
    eta: datetime | None = None
    delays: int = 0
    declined_by: tuple[str, ...] = ()
    reopens: int = 0


@dataclass(frozen=True)
class Event:
    """A concrete event to publish, with what the model needs to know about it."""

    request_id: str
    type: str
    publisher: str  # a department slug, or ROUTING
    actor: str  # actor.department in the payload
    invalid: bool  # the payload breaks the contract's field rules
    payload: dict[str, Any]

    @property
    def subject(self) -> str:
        if self.publisher == ROUTING:
            return f"baton.svc.routing.{self.type}"
        return f"baton.in.{self.publisher}.{self.type}"

    @property
    def department(self) -> str:
        return "baton" if self.publisher == ROUTING else self.publisher


Outcome = Model | RejectionCode


def model_step(current: Model | None, ev: Event) -> Outcome:
    """The documented machine, from the tables above. Checks in the documented order."""
    # 1. the subject: departments publish department types, routing publishes its own types
    if (PUBLISHER[ev.type] is Party.ROUTING) != (ev.publisher == ROUTING):
        return RejectionCode.NOT_ALLOWED
    # 2. the payload, then 3. the actor must be the publisher
    if ev.invalid:
        return RejectionCode.VALIDATION_FAILED
    if ev.actor != ev.department:
        return RejectionCode.SUBJECT_MISMATCH
    p = ev.payload
    # 4. the lifecycle
    if ev.type == "created":
        if current is not None:
            return RejectionCode.DUPLICATE_REQUEST
        if p["requester"]["department"] != ev.actor:
            return RejectionCode.NOT_ALLOWED
        return Model(S.CREATED, requester=ev.actor, holder=None, sequence=1, title=p["title"])
    if current is None:
        return RejectionCode.UNKNOWN_REQUEST
    if current.state is S.CLOSED:
        return RejectionCode.ILLEGAL_TRANSITION
    party = PUBLISHER[ev.type]
    # who may publish, in the request as it is now
    parties: dict[Party, set[str | None]] = {
        Party.REQUESTER: {current.requester},
        Party.HOLDER: {current.holder},
        Party.EITHER: {current.requester, current.holder},
        Party.ROUTING: {"baton"},
    }
    if ev.actor not in parties[party] - {None}:
        return RejectionCode.NOT_ALLOWED
    after = NEXT.get((ev.type, current.state))
    if after is None:
        return RejectionCode.ILLEGAL_TRANSITION
    nxt = replace(current, state=after, sequence=current.sequence + 1)
    match ev.type:
        case "routed":
            return replace(nxt, holder=p["provider_department"])
        case "returned":
            return replace(nxt, holder=None)
        case "accepted":
            return replace(nxt, eta=_ts(p["eta"]))
        case "declined":
            return replace(nxt, holder=None, eta=None, declined_by=(*current.declined_by, ev.actor))
        case "reassigned":
            if p["to_department"] == ev.actor:
                return RejectionCode.ILLEGAL_TRANSITION
            return replace(nxt, holder=p["to_department"], eta=None)
        case "delayed":
            if current.eta is not None and _ts(p["new_eta"]) <= current.eta:
                return RejectionCode.ILLEGAL_TRANSITION
            return replace(nxt, eta=_ts(p["new_eta"]), delays=current.delays + 1)
        case "reopened":
            return replace(nxt, eta=None, reopens=current.reopens + 1)
    return nxt


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


# --- generation: abstract steps, resolved against the model's state ---------------------------
class Who(StrEnum):
    NATURAL = "natural"  # whoever the machine expects for this event type
    REQUESTER = "requester"
    HOLDER = "holder"
    OUTSIDER = "outsider"  # a department that is neither the requester nor the holder
    ROUTING = "routing"


class Move(StrEnum):
    FORWARD = "forward"  # a transition the model allows that changes the state (or a delay)
    STAY = "stay"  # a comment or a notice the model allows (state unchanged)
    PROBE = "probe"  # a type the model forbids in the current state


@dataclass(frozen=True)
class Step:
    request: int
    type: str  # an event type, or "" = let `move` choose one from the model's current state
    who: Who
    move: Move = Move.FORWARD
    choice: int = 0  # which of the candidate types; also the feedback rating
    to_holder: bool = False  # a comment from the holder rather than the requester
    invalid: bool = False
    impostor: bool = False  # actor.department differs from the subject's department
    foreign_requester: bool = False  # created naming another department as the requester
    hours: int = 1  # ETAs: T0 + hours, so earlier, equal and later ETAs all occur
    eta_in_plus_one: bool = False  # write the ETA with a +01:00 offset (same instant)
    target: int = 0  # routed/reassigned: index into PROVIDERS; len(PROVIDERS) = the publisher itself


#: Each field of a Step and the values it is drawn from (repeats weight a value).
STEP_VALUES: dict[str, tuple[Any, ...]] = {
    "request": (0, 0, 0, 0, 1, 1, 2),
    "type": ("",) * 3 * len(EVENT_TYPES) + EVENT_TYPES,
    "who": (Who.NATURAL,) * 12 + tuple(Who),
    "move": (Move.FORWARD,) * 3 + (Move.STAY,) * 2 + (Move.PROBE,),
    "choice": tuple(range(12)),
    "to_holder": (False, True),
    "invalid": (False,) * 15 + (True,),
    "impostor": (False,) * 19 + (True,),
    "foreign_requester": (False,) * 7 + (True,),
    "hours": tuple(range(1, 9)),
    "eta_in_plus_one": (False, True),
    "target": tuple(range(len(PROVIDERS) + 1)),
}
steps = st.builds(Step, **{name: st.sampled_from(values) for name, values in STEP_VALUES.items()})


def random_steps(rng: random.Random, count: int) -> list[Step]:
    """The same distribution without hypothesis (whose draws are deliberately far from uniform)."""
    return [Step(**{name: rng.choice(values) for name, values in STEP_VALUES.items()}) for _ in range(count)]


#: How often guided steps pick each forward move (a returned request is a dead end: keep it rarer).
FORWARD_WEIGHT = {"routed": 4, "accepted": 4, "resolved": 3, "delayed": 2, "feedback": 2}


def guided_type(current: Model | None, move: Move, choice: int) -> str:
    """An event type chosen from the model's current state."""
    if current is None:
        return "created" if move is not Move.PROBE else EVENT_TYPES[choice % len(EVENT_TYPES)]
    allowed = [t for (t, s) in NEXT if s is current.state]
    forward = [t for t in allowed if NEXT[(t, current.state)] is not current.state or t == "delayed"]
    weighted = [t for t in forward for _ in range(FORWARD_WEIGHT.get(t, 1))]
    stay = [t for t in allowed if t not in forward]
    forbidden = [t for t in EVENT_TYPES if t not in allowed]  # includes created: the request exists
    options = {Move.FORWARD: weighted, Move.STAY: stay, Move.PROBE: forbidden}[move]
    options = options or weighted or stay or forbidden
    return options[choice % len(options)]


def resolve_publisher(step: Step, event_type: str, rid: str, current: Model | None) -> str:
    requester = current.requester if current else DEFAULT_REQUESTER[rid]
    holder = current.holder if current else None
    who = step.who
    if who is Who.NATURAL:
        party = PUBLISHER[event_type]
        if party is Party.EITHER:
            party = Party.HOLDER if step.to_holder and holder is not None else Party.REQUESTER
        who = {Party.REQUESTER: Who.REQUESTER, Party.HOLDER: Who.HOLDER, Party.ROUTING: Who.ROUTING}[party]
    match who:
        case Who.REQUESTER:
            return requester
        case Who.HOLDER:
            return holder or PROVIDERS[0]
        case Who.ROUTING:
            return ROUTING
        case _:
            return next(d for d in (*PROVIDERS, "ops") if d not in (requester, holder))


def build_event(step: Step, index: int, current: Model | None) -> Event:
    rid = REQUEST_IDS[step.request]
    event_type = step.type or guided_type(current, step.move, step.choice)
    publisher = resolve_publisher(step, event_type, rid, current)
    department = "baton" if publisher == ROUTING else publisher
    actor = "ops" if step.impostor and department != "ops" else ("it" if step.impostor else department)
    occurred = T0 + timedelta(minutes=index)
    eta = T0 + timedelta(hours=step.hours)
    eta_text = (eta.astimezone(PLUS_ONE) if step.eta_in_plus_one else eta).isoformat()
    bad = step.invalid
    target = PROVIDERS[step.target] if step.target < len(PROVIDERS) else publisher
    fields: dict[str, Any]
    match event_type:
        case "created":
            requester = "finance" if step.foreign_requester and actor != "finance" else actor
            fields = {
                "title": f"Request {rid} #{index}",
                "category": "laptop",
                "priority": "urgent-ish" if bad else "high",
                "requester": {"department": requester, "person": "Ana"},
            }
        case "routed":
            fields = {"provider_department": target if target != ROUTING else "it", "caused_by": "evt-cause001"}
            fields |= {} if bad else {"rule": "category:laptop"}
        case "returned":
            fields = {"reason": " " if bad else "nobody serves this", "caused_by": "evt-cause001"}
        case "sla_warning":
            fields = {"clock": "accept", "department": "it", "deadline": eta.isoformat(), "remaining_seconds": 60.0}
            fields |= {"fraction": 1.5 if bad else 0.75}
        case "escalated":
            fields = {"clock": "resolve", "department": "it", "deadline": eta.isoformat()}
            fields |= {"overdue_seconds": -1.0 if bad else 30.0}
        case "handoff_loop_detected":
            fields = {"pattern": "ping-pong" if bad else "bounce", "chain": ["it", "finance", "it"]}
        case "accepted":
            fields = {"assignee": "Sam", "eta": (occurred - timedelta(minutes=1)).isoformat() if bad else eta_text}
        case "delayed":
            fields = {"reason": "" if bad else "supplier backorder", "new_eta": eta_text}
        case "resolved":
            fields = {"resolution": "delivered", "outcome": "maybe" if bad else "done"}
        case "declined":
            fields = {"reason": "   " if bad else "not ours"}
        case "reassigned":
            fields = {"reason": "belongs to them", "to_department": "IT" if bad else target}
        case "reopened":
            fields = {"reason": "" if bad else "still broken"}
        case "feedback":
            fields = {"rating": 6 if bad else 1 + step.choice % 5, "comment": "thanks"}
        case "commented":
            fields = {"comment": "\n" if bad else "more details attached"}
        case _:  # pragma: no cover
            raise AssertionError(event_type)
    payload = {
        "type": event_type,
        "event_id": f"evt-{step.request}-{index:04d}",
        "request_id": rid,
        "occurred_at": occurred.isoformat(),
        "actor": {"department": actor, "person": "someone"},
        **fields,
    }
    return Event(rid, event_type, publisher, actor, bad, payload)


# --- the property -------------------------------------------------------------------------------
def as_model(state: RequestState) -> Model:
    """Intake's state in the model's terms (every field of RequestState is compared)."""
    assert state.trace_id is None  # decide() never invents a trace id; the handler sets it
    return Model(
        state=S(state.state.value),
        requester=state.requester_department,
        holder=state.holder_department,
        sequence=state.last_sequence,
        title=state.title,
        eta=state.eta,
        delays=state.delay_count,
        declined_by=state.declined_by,
        reopens=state.reopen_count,
    )


@dataclass
class Coverage:
    """What a run exercised: (type, state before) applied; (type, state before, code) refused."""

    applied: Counter[tuple[str, S | None]] = field(default_factory=Counter)
    refused: Counter[tuple[str, S | None, RejectionCode]] = field(default_factory=Counter)


def run(sequence: list[Step], coverage: Coverage | None = None) -> None:
    """Feed the steps through check_inbound + decide and compare with the model after each one."""
    model: dict[str, Model] = {}
    intake: dict[str, RequestState] = {}
    for index, step in enumerate(sequence):
        rid = REQUEST_IDS[step.request]
        state_before = model[rid].state if rid in model else None
        ev = build_event(step, index, model.get(rid))
        before = intake.get(rid)
        expected = model_step(model.get(rid), ev)

        checked = check_inbound(ev.subject, orjson.dumps(ev.payload))
        got = decide(before, checked.event) if isinstance(checked, Checked) else checked.refusal
        where = f"step {index}: {ev.subject} {ev.payload}"

        if isinstance(expected, RejectionCode):
            assert isinstance(got, Refusal), f"{where}\nmodel refuses ({expected}), intake applied: {got}"
            assert got.code is expected, f"{where}\nmodel: {expected}, intake: {got.code} ({got.message})"
            assert got.message
            assert intake.get(rid) == before  # a refused event changes nothing
            if coverage:
                coverage.refused[(ev.type, state_before, expected)] += 1
            continue
        assert isinstance(got, RequestState), f"{where}\nmodel applies, intake refused: {got}"
        assert got.request_id == rid
        assert got.last_sequence == (before.last_sequence + 1 if before else 1)  # exactly one step forward
        assert as_model(got) == expected, f"{where}\nintake: {as_model(got)}\nmodel:  {expected}"
        if coverage:
            coverage.applied[(ev.type, state_before)] += 1
        model[rid] = expected
        intake[rid] = got


#: Sequences of 1..MAX_STEPS steps (a plain st.lists would average about 5 steps: too short to reach "closed").
sequences = st.integers(1, MAX_STEPS).flatmap(lambda n: st.lists(steps, min_size=n, max_size=n))


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequences)
def test_intake_follows_the_reference_model(sequence: list[Step]) -> None:
    run(sequence)


ILLEGAL = RejectionCode.ILLEGAL_TRANSITION
NOT_ALLOWED = RejectionCode.NOT_ALLOWED


def test_the_generator_reaches_every_transition_and_every_refusal() -> None:
    """Guard against a vacuous property: the step distribution exercises the whole table.

    Seeded and without hypothesis, so it is deterministic; hypothesis draws from the same values.
    """
    coverage = Coverage()
    rng = random.Random(COVERAGE_SEED)
    for _ in range(300):
        run(random_steps(rng, rng.randint(10, MAX_STEPS)), coverage)
    never_applied = [key for key in [("created", None), *NEXT] if not coverage.applied[key]]
    assert not never_applied, f"never applied: {never_applied}"

    # every forbidden (type, state) pair was tried by its natural publisher and refused with the right code
    nobody_holds = (S.CREATED, S.DECLINED, S.RETURNED)
    never_refused = []
    for state in S:
        for event_type in EVENT_TYPES:
            if event_type == "created":
                code = RejectionCode.DUPLICATE_REQUEST
            elif (event_type, state) in NEXT:
                continue
            elif PUBLISHER[event_type] is Party.HOLDER and state in nobody_holds:
                code = RejectionCode.NOT_ALLOWED
            else:
                code = RejectionCode.ILLEGAL_TRANSITION
            if not coverage.refused[(event_type, state, code)]:
                never_refused.append((event_type, state, code))
    assert not never_refused, f"never refused: {never_refused}"

    # the guards and the other refusal reasons
    for key in [
        ("delayed", S.ACCEPTED, RejectionCode.ILLEGAL_TRANSITION),  # the new ETA is not later
        ("reassigned", S.ROUTED, RejectionCode.ILLEGAL_TRANSITION),  # to oneself
        ("reassigned", S.ACCEPTED, RejectionCode.ILLEGAL_TRANSITION),
        ("accepted", S.ROUTED, RejectionCode.NOT_ALLOWED),  # not the holder
        ("reopened", S.RESOLVED, RejectionCode.NOT_ALLOWED),  # not the requester
        ("commented", S.ACCEPTED, RejectionCode.NOT_ALLOWED),  # neither party
        ("created", None, RejectionCode.NOT_ALLOWED),  # naming another department as the requester
        ("accepted", None, RejectionCode.UNKNOWN_REQUEST),
        ("routed", None, RejectionCode.NOT_ALLOWED),  # a department publishing routing's event type
        ("accepted", S.ROUTED, RejectionCode.NOT_ALLOWED),
        ("delayed", S.ACCEPTED, RejectionCode.VALIDATION_FAILED),
        ("resolved", S.ACCEPTED, RejectionCode.SUBJECT_MISMATCH),
    ]:
        assert coverage.refused[key], f"never refused: {key}"


# --- docs/lifecycle.md says the same as the model --------------------------------------------------
LIFECYCLE_DOC = Path(__file__).resolve().parents[2] / "docs" / "lifecycle.md"


def _section(doc: str, heading: str) -> str:
    start = doc.index(heading)
    end = doc.find("\n## ", start + len(heading))
    return doc[start : end if end != -1 else len(doc)]


def test_the_lifecycle_diagram_is_the_model() -> None:
    """Every arrow of the Mermaid diagram is a row of NEXT and every row of NEXT is drawn."""
    diagram = _section(LIFECYCLE_DOC.read_text(), "## The machine")
    drawn: dict[tuple[str, S], S] = {}
    for line in diagram.splitlines():
        found = re.fullmatch(r"\s*(\w+) --> (\w+): (.+)", line)
        if not found or found[1] == "[*]":
            continue
        before, after, label = S(found[1]), S(found[2]), found[3]
        if label.startswith("commented"):  # "commented, notices" or "commented"
            types = ["commented", *(NOTICES if "notices" in label else ())]
        else:
            types = [label.split()[0]]
        for event_type in types:
            drawn[(event_type, before)] = after
    assert drawn == NEXT


def test_the_lifecycle_table_is_the_model() -> None:
    """The table "who may publish what, in which state, what changes" matches PUBLISHER and NEXT."""
    table = _section(LIFECYCLE_DOC.read_text(), "## Who may publish what")
    publishers = {
        "routing": Party.ROUTING,
        "the holder": Party.HOLDER,
        "the requester or the holder": Party.EITHER,
        "the requester": Party.REQUESTER,
    }
    documented_next: dict[tuple[str, S], S] = {}
    documented_publisher: dict[str, Party] = {}
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        events, publisher, allowed_in, after = (cell.strip() for cell in row.strip("|").split("|")[:4])
        types = re.findall(r"`(\w+)`", events)
        party = next(p for prefix, p in publishers.items() if publisher.startswith(prefix))
        documented_publisher.update(dict.fromkeys(types, party))
        if types == ["created"]:
            continue
        if allowed_in.startswith("every state except"):
            excluded = set(re.findall(r"`(\w+)`", allowed_in))
            states = [s for s in S if s.value not in excluded]
        else:
            states = [S(name) for name in re.findall(r"`(\w+)`", allowed_in)]
        for state in states:
            for event_type in types:
                documented_next[(event_type, state)] = state if after == "unchanged" else S(after.strip("`"))
    assert documented_publisher == PUBLISHER
    assert documented_next == NEXT


# --- findings: the contract says more than intake enforces ------------------------------------------
def _created_by(dept: str) -> bytes:
    doc = {
        "type": "created",
        "event_id": "evt-reserved01",
        "request_id": "REQ-RESERVED1",
        "occurred_at": T0.isoformat(),
        "actor": {"department": dept, "person": "Mallory"},
        "title": "Looks like Baton itself",
        "category": "laptop",
        "priority": "urgent",
        "requester": {"department": dept, "person": "Mallory"},
    }
    return orjson.dumps(doc)


def test_the_reserved_slug_baton_is_not_a_department() -> None:
    result = check_inbound("baton.in.baton.created", _created_by("baton"))
    assert not isinstance(result, Checked)
    assert result.refusal.code in (RejectionCode.BAD_SUBJECT, RejectionCode.NOT_ALLOWED)


def test_a_request_cannot_be_reassigned_to_baton() -> None:
    held = RequestState(
        request_id="REQ-RESERVED1",
        state=State.ACCEPTED,
        requester_department="marketing",
        holder_department="it",
        last_sequence=3,
        eta=T0 + timedelta(hours=2),
        delay_count=0,
        title="Laptop",
        trace_id=None,
    )
    event = Reassigned(
        event_id="evt-reserved02",
        request_id="REQ-RESERVED1",
        occurred_at=T0,
        actor=Actor(department="it", person="Sam"),
        reason="Baton should do it",
        to_department="baton",
    )
    assert isinstance(decide(held, event), Refusal)
