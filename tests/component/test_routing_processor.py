"""RoutingProcessor end to end without a broker: a real database (SQLite, or PostgreSQL when
BATON_TEST_DATABASE_URL is set), a fake publish, a fake scheduler and a controllable clock.

What routing emits is fed back into a fake canonical log, stamped as intake would, so a request
is followed from ``created`` through handoffs, declines, timers and escalations.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from libs.contracts import Catalog, Envelope, Routed, dumps, parse_event
from libs.contracts.events import Escalated, Returned, SlaWarning
from libs.contracts.subjects import STREAM_IN, event_subject, timer_due_subject, timer_schedule_subject
from services.routing import db
from services.routing.handlers import (
    DUE_TTL,
    UNKNOWN_REQUEST_DELIVERIES,
    Inbound,
    Outcome,
    RoutingProcessor,
    SequenceGap,
    TimerDue,
    TimerHandling,
)
from services.routing.tracking import Policy
from tests.conftest import MakeDatabaseUrl

pytestmark = pytest.mark.component

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
RID = "REQ-PROC0001"

CATALOG = Catalog.model_validate(
    {
        "fallback_department": "service-desk",
        "departments": [
            {"slug": "service-desk", "name": "Triage", "categories": ["general"], "business_hours": {"always": True}},
            {
                "slug": "it",
                "name": "IT",
                "categories": ["laptop"],
                "business_hours": {"always": True},
                "sla": {"normal": {"accept_within": "1h", "resolve_within": "1d"}},
            },
            {
                "slug": "acme-it",
                "name": "ACME",
                "kind": "vendor",
                "categories": ["laptop"],
                "business_hours": {"always": True},
                "sla": {"normal": {"accept_within": "2h", "resolve_within": "2d"}},
            },
            {"slug": "marketing", "name": "Marketing", "categories": ["campaign"]},
        ],
    }
)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Sent:
    subject: str
    body: bytes
    msg_id: str


@dataclass
class Fakes:
    sent: list[Sent] = field(default_factory=list)
    schedules: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    fail_schedules: int = 0
    behind: bool = False

    async def publish(self, subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        assert stream in (STREAM_IN, "BATON_DLQ")
        self.sent.append(Sent(subject, body, msg_id))

    async def schedule(self, subject: str, body: bytes, *, headers: dict[str, str]) -> None:
        if self.fail_schedules:
            self.fail_schedules -= 1
            raise TimeoutError("no PubAck from BATON_TIMERS (injected)")
        self.schedules.append((subject, body, headers))

    async def pending(self, request_id: str, after: int) -> bool:
        return self.behind

    def events(self) -> list[Envelope]:
        return [parse_event(s.body) for s in self.sent if s.subject.startswith("baton.svc.routing.")]


class Log:
    """The canonical log as routing reads it: intake's stamps, stream sequences."""

    def __init__(self, processor: RoutingProcessor, clock: Clock) -> None:
        self.processor = processor
        self.clock = clock
        self.sequence = 0
        self.stream_seq = itertools.count(1)
        self.ids = itertools.count(1)

    def stamp(self, doc: dict[str, Any]) -> Inbound:
        self.sequence += 1
        doc = doc | {"sequence": self.sequence, "recorded_at": self.clock.now.isoformat()}
        return Inbound(event_subject(doc["request_id"], doc["type"]), orjson.dumps(doc), {}, next(self.stream_seq), 1)

    async def say(self, event_type: str, dept: str, **fields: Any) -> Outcome:
        doc = {
            "type": event_type,
            "event_id": f"ev-{event_type}-{next(self.ids):04d}",
            "request_id": RID,
            "occurred_at": self.clock.now.isoformat(),
            "actor": {"department": dept, "person": "someone"},
        } | fields
        return await self.processor.process(self.stamp(doc))

    async def create(self) -> Outcome:
        return await self.say(
            "created",
            "marketing",
            title="Laptop for a new hire",
            category="laptop",
            priority="normal",
            requester={"department": "marketing", "person": "Ana"},
        )

    async def loop_back(self, event: Envelope) -> Outcome:
        """What intake does with an event routing emitted: append it."""
        return await self.processor.process(self.stamp(orjson.loads(dumps(event))))


def due_message(schedule: tuple[str, bytes, dict[str, str]], seq: int = 1, delivered: int = 1) -> Inbound:
    """The message the server publishes when a schedule is due."""
    _, body, headers = schedule
    return Inbound(headers["Nats-Schedule-Target"], body, {}, seq, delivered)


@pytest.fixture
async def env(make_database_url: MakeDatabaseUrl) -> AsyncIterator[tuple[RoutingProcessor, Fakes, Log, Clock]]:
    database = db.Database(make_database_url("routing_processor"))
    await database.start()
    fakes, clock = Fakes(), Clock(T0)
    processor = RoutingProcessor(
        database,
        CATALOG,
        fakes.publish,
        clock=clock,
        schedule=fakes.schedule,
        pending=fakes.pending,
        policy=Policy(warning_fraction=0.75),
    )
    yield processor, fakes, Log(processor, clock), clock
    await database.close()


def schedules_by_kind(fakes: Fakes) -> dict[tuple[str, str, str], tuple[str, bytes, dict[str, str]]]:
    out = {}
    for item in fakes.schedules:
        due = TimerDue.model_validate_json(item[1])
        out[(due.department, due.clock.value, due.kind.value)] = item
    return out


async def test_a_request_is_followed_from_created_to_one_escalation(
    env: tuple[RoutingProcessor, Fakes, Log, Clock],
) -> None:
    processor, fakes, log, clock = env
    assert await log.create() is Outcome.ROUTED
    (routed,) = fakes.events()
    assert isinstance(routed, Routed)
    assert routed.provider_department == "it"
    assert routed.accept_by == T0 + timedelta(hours=1)
    assert fakes.schedules == []  # the handoff happens when the routed event is in the log

    clock.now = T0 + timedelta(seconds=1)
    assert await log.loop_back(routed) is Outcome.APPLIED
    armed = schedules_by_kind(fakes)
    assert set(armed) == {
        ("it", "accept", "warning"),
        ("it", "accept", "breach"),
        ("it", "resolve", "warning"),
        ("it", "resolve", "breach"),
    }
    subject, body, headers = armed[("it", "accept", "breach")]
    assert subject == timer_schedule_subject(RID, "it", "accept", 1, "breach")
    assert headers == {
        "Nats-Schedule": "@at 2026-11-24T10:00:00.000000Z",
        "Nats-Schedule-Target": timer_due_subject(RID, "it", "accept", 1, "breach"),
        "Nats-Schedule-TTL": DUE_TTL,
    }
    assert TimerDue.model_validate_json(body).due_at == T0 + timedelta(hours=1)
    assert armed[("it", "accept", "warning")][2]["Nats-Schedule"] == "@at 2026-11-24T09:45:00.000000Z"
    async with processor.db.transaction() as session:
        assert await db.dirty_clocks(session) == []

    clock.now = T0 + timedelta(minutes=45)
    result = await processor.process_timer(due_message(armed[("it", "accept", "warning")]))
    assert (result.handling, result.outcome) == (TimerHandling.DONE, "fired")
    warning = fakes.events()[-1]
    assert isinstance(warning, SlaWarning)
    assert warning.remaining_seconds == 15 * 60

    clock.now = T0 + timedelta(hours=1, seconds=3)
    breach = due_message(armed[("it", "accept", "breach")], seq=2)
    assert (await processor.process_timer(breach)).outcome == "fired"
    escalated = fakes.events()[-1]
    assert isinstance(escalated, Escalated)
    assert (escalated.department, escalated.clock.value, escalated.overdue_seconds) == ("it", "accept", 3.0)
    first = fakes.sent[-1]
    # The timer comes again (a redelivery, or a duplicate due message): the same bytes, the same event_id.
    clock.now += timedelta(minutes=5)
    assert (await processor.process_timer(breach)).outcome == "already"
    assert fakes.sent[-1] == first
    assert sum(isinstance(e, Escalated) for e in fakes.events()) == 2  # published twice, one event_id
    assert len({s.msg_id for s in fakes.sent if s.subject.endswith(".escalated")}) == 1

    # The escalation comes back through the log: nothing more happens.
    before = len(fakes.sent)
    assert await log.loop_back(escalated) is Outcome.APPLIED
    assert len(fakes.sent) == before


async def test_a_timer_waits_until_routing_has_read_the_requests_events(
    env: tuple[RoutingProcessor, Fakes, Log, Clock],
) -> None:
    processor, fakes, log, clock = env
    await log.create()
    await log.loop_back(fakes.events()[0])
    breach = schedules_by_kind(fakes)[("it", "accept", "breach")]
    clock.now = T0 + timedelta(hours=2)
    fakes.behind = True  # e.g. an 'accepted' is in the log that routing has not read yet
    before = len(fakes.sent)
    result = await processor.process_timer(due_message(breach))
    assert (result.handling, result.outcome) == (TimerHandling.RETRY, "waiting")
    assert 0 < result.delay <= 2
    assert len(fakes.sent) == before
    # Routing reads it: the accept came in time (the log records it at 09:30), so the timer is stale.
    fakes.behind = False
    clock.now = T0 + timedelta(minutes=30)
    await log.say("accepted", "it", assignee="Sam", eta=(T0 + timedelta(days=2)).isoformat())
    clock.now = T0 + timedelta(hours=2)
    assert (await processor.process_timer(due_message(breach))).outcome == "stale"
    assert not any(isinstance(e, Escalated) for e in fakes.events())


async def test_an_early_timer_is_naked_until_due_or_armed_again(
    env: tuple[RoutingProcessor, Fakes, Log, Clock],
) -> None:
    processor, fakes, log, clock = env
    await log.create()
    await log.loop_back(fakes.events()[0])
    breach = schedules_by_kind(fakes)[("it", "accept", "breach")]
    clock.now = T0 + timedelta(minutes=59, seconds=55)  # the server's clock is 5 s ahead of ours
    result = await processor.process_timer(due_message(breach))
    assert (result.handling, result.outcome) == (TimerHandling.RETRY, "early")
    assert result.delay == pytest.approx(5.05)
    clock.now = T0 + timedelta(minutes=10)  # far too early: schedule it again instead
    count = len(fakes.schedules)
    result = await processor.process_timer(due_message(breach))
    assert (result.handling, result.outcome) == (TimerHandling.DONE, "early")
    assert [s[0] for s in fakes.schedules[count:]] == [
        timer_schedule_subject(RID, "it", "accept", 1, "warning"),
        timer_schedule_subject(RID, "it", "accept", 1, "breach"),
    ]


async def test_a_schedule_that_did_not_reach_nats_is_sent_by_the_reconciler(
    env: tuple[RoutingProcessor, Fakes, Log, Clock],
) -> None:
    processor, fakes, log, _clock = env
    await log.create()
    fakes.fail_schedules = 1
    with pytest.raises(TimeoutError):
        await log.loop_back(fakes.events()[0])  # committed; the handler naks, the redelivery or the reconciler arms
    async with processor.db.transaction() as session:
        assert {c.clock_id for c in await db.dirty_clocks(session)} == {f"{RID}.it.accept.1", f"{RID}.it.resolve.1"}
    assert await processor.reconcile() == 4
    async with processor.db.transaction() as session:
        assert await db.dirty_clocks(session) == []
    assert await processor.reconcile() == 0


async def test_timers_that_never_fired_are_armed_again_after_a_grace(
    env: tuple[RoutingProcessor, Fakes, Log, Clock],
) -> None:
    processor, fakes, log, clock = env
    await log.create()
    await log.loop_back(fakes.events()[0])
    fakes.schedules.clear()
    clock.now = T0 + timedelta(minutes=50)  # the warning (09:45) is 5 min overdue
    assert await processor.reconcile(overdue_grace=timedelta(minutes=10)) == 0
    clock.now = T0 + timedelta(hours=1, minutes=11)  # both accept timers overdue by more than the grace
    assert await processor.reconcile(overdue_grace=timedelta(minutes=10)) == 2
    assert {s[0].rsplit(".", 1)[-1] for s in fakes.schedules} == {"warning", "breach"}


async def test_a_decline_is_rerouted_and_a_redelivery_republishes_the_same_bytes(
    env: tuple[RoutingProcessor, Fakes, Log, Clock],
) -> None:
    processor, fakes, log, clock = env
    await log.create()
    await log.loop_back(fakes.events()[0])
    clock.now = T0 + timedelta(minutes=5)
    declined = log.stamp(
        {
            "type": "declined",
            "event_id": "ev-declined-0001",
            "request_id": RID,
            "occurred_at": clock.now.isoformat(),
            "actor": {"department": "it", "person": "Sam"},
            "reason": "the vendor handles these",
        }
    )
    assert await processor.process(declined) is Outcome.APPLIED
    rerouted = fakes.events()[-1]
    assert isinstance(rerouted, Routed)
    assert (rerouted.provider_department, rerouted.previous_department, rerouted.caused_by) == (
        "acme-it",
        "it",
        "ev-declined-0001",
    )
    clock.now += timedelta(seconds=30)
    assert await processor.process(declined) is Outcome.REPUBLISHED
    assert fakes.sent[-1] == fakes.sent[-2]

    await log.loop_back(rerouted)
    assert await log.say("declined", "acme-it", reason="no stock") is Outcome.APPLIED
    rerouted = fakes.events()[-1]
    assert isinstance(rerouted, Routed)
    assert rerouted.provider_department == "service-desk"
    await log.loop_back(rerouted)
    await log.say("declined", "service-desk", reason="nobody")
    returned = fakes.events()[-1]
    assert isinstance(returned, Returned)
    assert returned.declined_by == ["it", "acme-it", "service-desk"]
    assert "it declined: the vendor handles these" in returned.reason


async def test_a_gap_in_a_requests_sequence_is_retried(env: tuple[RoutingProcessor, Fakes, Log, Clock]) -> None:
    _processor, _fakes, log, _clock = env
    await log.create()
    log.sequence += 1  # event 2 is not delivered yet
    with pytest.raises(SequenceGap):
        await log.say("commented", "marketing", comment="hello?")


async def test_events_of_requests_routing_never_saw_are_ignored(
    env: tuple[RoutingProcessor, Fakes, Log, Clock],
) -> None:
    processor, fakes, log, _clock = env
    log.sequence = 4
    eta = (T0 + timedelta(days=1)).isoformat()
    # At first it waits: its created may be in the hands of another routing replica right now.
    with pytest.raises(SequenceGap):
        await log.say("accepted", "it", assignee="Bo", eta=eta)
    doc = {
        "type": "accepted",
        "event_id": "ev-accepted-late",
        "request_id": RID,
        "occurred_at": T0.isoformat(),
        "actor": {"department": "it", "person": "Bo"},
        "assignee": "Bo",
        "eta": eta,
    }
    last_try = replace(log.stamp(doc), num_delivered=UNKNOWN_REQUEST_DELIVERIES)
    assert await processor.process(last_try) is Outcome.IGNORED
    assert fakes.sent == []


async def test_unknown_and_poison_timers(env: tuple[RoutingProcessor, Fakes, Log, Clock]) -> None:
    processor, fakes, _, _ = env
    unknown = TimerDue(request_id="REQ-NOBODY01", department="it", clock="accept", episode=1, kind="breach", due_at=T0)  # type: ignore[arg-type]
    result = await processor.process_timer(Inbound(unknown.subject, dumps(unknown), {}, 7, 1))
    assert (result.handling, result.outcome) == (TimerHandling.DONE, "unknown")
    poison = await processor.process_timer(Inbound("baton.timers.due.x", b"{not json", {}, 8, 1))
    assert poison.handling is TimerHandling.DEAD_LETTERED
    assert fakes.sent[-1].subject == "baton.dlq.routing.bad_timer"
    assert fakes.sent[-1].msg_id == "dlq-routing-timers-8"
