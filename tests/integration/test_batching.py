"""Batch processing (one database transaction per fetched batch) against a real nats-server and database.

The events are published *before* the service starts, so that its first fetch holds all of them in one
batch; ``process_batch`` / ``process`` are wrapped (never replaced) to see which path handled what. Set
BATON_TEST_DATABASE_URL to run these on PostgreSQL.

* several events of one request in one batch are applied in order by the batch path itself (no
  fallback), and produce exactly the notifications of the one-at-a-time path;
* a message that makes the batch transaction fail (a poison) rolls the batch back: the batch is handled
  one message at a time, the others commit, the poison is dead-lettered on its last delivery;
* a crash after the batch commit, before the PubAcks and acks, is repaired by redelivery: every event is
  found processed, the stored notifications are published again and JetStream drops the copies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from libs.contracts import DeadLetter, LifecycleEvent, Notification
from libs.contracts.publishing import Outgoing
from libs.contracts.subjects import (
    CONSUMER_METRICS,
    CONSUMER_NOTIFIER,
    CONSUMER_ROUTING,
    STREAM_DLQ,
    STREAM_EVENTS,
    STREAM_IN,
    STREAM_NOTIFY,
    inbound_subject,
    service_subject,
)
from services.intake.app import create_app as create_intake
from services.intake.settings import IntakeSettings
from services.metrics.app import create_app as create_metrics
from services.metrics.settings import MetricsSettings
from services.notifier import handlers as notifier_handlers
from services.notifier.app import create_app as create_notifier
from services.notifier.handlers import NotifierProcessor, Outcome
from services.notifier.settings import NotifierSettings
from services.routing.app import create_app as create_routing
from services.routing.settings import RoutingSettings
from tests import intake_events
from tests.conftest import MakeDatabaseUrl
from tests.integration.test_notifier_nats import new_rid, publish_event, stream_messages, summary
from tests.notifier_events import EXPECTED, lifecycle

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(provisioned_nats: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(provisioned_nats)
    yield conn
    await conn.close()


async def settled(nc: NATS, durable: str, *, within: float = 60.0) -> None:
    """Wait (bounded, generously) until ``durable`` has acked everything now in BATON_EVENTS."""
    jsm = nc.jsm()
    last = (await jsm.stream_info(STREAM_EVENTS)).state.last_seq
    deadline = asyncio.get_running_loop().time() + within
    while True:
        info = await jsm.consumer_info(STREAM_EVENTS, durable)
        if info.ack_floor.stream_seq >= last and info.num_ack_pending == 0 and info.num_pending == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{durable} not settled after {within}s: {info}")
        await asyncio.sleep(0.05)


def notifier_settings(url: str, database_url: str, catalog_path: Path) -> NotifierSettings:
    return NotifierSettings(
        nats_url=url,
        database_url=database_url,
        catalog_path=str(catalog_path),
        fetch_batch=64,
        fetch_timeout=0.2,
        retry_delay=0.2,
        gap_delay=0.1,
        gap_max_delay=0.4,
    )


class Paths:
    """Which path handled what: the sizes of the batches given to ``process_batch`` (and whether each
    committed), and the messages handled one at a time by ``process``."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, bool]] = []
        self.batch_results: list[list[Any]] = []
        self.single: list[int] = []
        self.outcomes: list[Any] = []  # every result returned, by either path, in order

    def wrap(self, processor: Any) -> None:
        real_batch = processor.process_batch
        real_single = processor.process

        async def process_batch(msgs: Sequence[Any], span: Callable[..., Any], **options: Any) -> Any:
            try:
                results = await real_batch(msgs, span, **options)
            except BaseException:
                self.batches.append((len(msgs), False))
                raise
            self.batches.append((len(msgs), True))
            self.batch_results.append(list(results))
            self.outcomes.extend(results)
            return results

        async def process(msg: Any) -> Any:
            self.single.append(msg.stream_sequence)
            result = await real_single(msg)
            self.outcomes.append(result)
            return result

        processor.process_batch = process_batch
        processor.process = process


async def notifications(nc: NATS) -> list[Notification]:
    return [Notification.model_validate_json(m.data) for m in await stream_messages(nc, STREAM_NOTIFY)]


def by_dept(notes: list[Notification]) -> dict[str, list[Notification]]:
    out: dict[str, list[Notification]] = {}
    for note in notes:
        out.setdefault(note.department, []).append(note)
    return out


# --- notifier -------------------------------------------------------------------------------------------------
async def test_notifier_applies_a_whole_lifecycle_in_one_batch_in_order(
    provisioned_nats: str, make_database_url: MakeDatabaseUrl, catalog_path: Path, nc: NATS
) -> None:
    rids = [new_rid(), new_rid()]
    # Two requests interleaved: each request's events in order, several of them in the same batch.
    for first, second in zip(lifecycle(rids[0]), lifecycle(rids[1]), strict=True):
        await publish_event(nc, first)
        await publish_event(nc, second)

    app = create_notifier(notifier_settings(provisioned_nats, make_database_url("notifier"), catalog_path))
    paths = Paths()
    paths.wrap(app.state.processor)
    async with app.router.lifespan_context(app):
        await settled(nc, CONSUMER_NOTIFIER)

    print(f"batches (size, committed): {paths.batches}; one at a time: {paths.single}")
    assert paths.single == []  # every event applied by the batch path, none by the fallback
    assert all(committed for _size, committed in paths.batches)
    assert max(size for size, _ in paths.batches) > 2  # several events of one request in one batch
    assert all(r.outcome is Outcome.APPLIED for results in paths.batch_results for r in results)
    notes = await notifications(nc)
    for rid in rids:
        mine = by_dept([n for n in notes if n.request_id == rid])
        assert summary(mine) == EXPECTED
        assert [n.sequence for n in mine["finance"]] == [1, 2, 3, 4, 5]  # in sequence order on the stream
    assert len({n.notification_id for n in notes}) == len(notes)  # each published once
    assert await stream_messages(nc, STREAM_DLQ) == []


async def test_notifier_poison_in_a_batch_is_isolated_and_dead_lettered(
    provisioned_nats: str,
    make_database_url: MakeDatabaseUrl,
    catalog_path: Path,
    nc: NATS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good_before, poison, good_after = new_rid(), new_rid(), new_rid()
    for rid in (good_before, poison, good_after):
        await publish_event(nc, lifecycle(rid)[0])  # three ``created`` events: one batch
    real_plan = notifier_handlers.plan  # type: ignore[attr-defined]

    def plan(before: Any, event: LifecycleEvent, *args: Any) -> Any:
        if event.request_id == poison:
            raise RuntimeError("a bug this event triggers")
        return real_plan(before, event, *args)

    monkeypatch.setattr(notifier_handlers, "plan", plan)
    app = create_notifier(notifier_settings(provisioned_nats, make_database_url("notifier"), catalog_path))
    processor: NotifierProcessor = app.state.processor
    processor.max_deliver = 3  # dead-letter on the third delivery (the consumer itself allows more)
    paths = Paths()
    paths.wrap(processor)
    async with app.router.lifespan_context(app):
        await settled(nc, CONSUMER_NOTIFIER)

    print(f"batches (size, committed): {paths.batches}; one at a time: {paths.single}")
    assert (3, False) in paths.batches  # the batch transaction failed (rolled back) ...
    notes = await notifications(nc)
    assert {n.request_id for n in notes} == {good_before, good_after}  # ... the others committed
    dead = [DeadLetter.model_validate_json(m.data) for m in await stream_messages(nc, STREAM_DLQ)]
    assert [(d.code, d.original_stream_sequence) for d in dead] == [("processing_failed", 2)]  # the poison only
    assert "a bug this event triggers" in dead[0].message


async def test_notifier_handles_a_message_on_its_last_delivery_behind_a_failing_one(
    provisioned_nats: str,
    make_database_url: MakeDatabaseUrl,
    catalog_path: Path,
    nc: NATS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure naks the rest of the batch to keep the order, but a message on its last delivery must not be
    naked: JetStream would never deliver it again (max-deliveries) although it never failed."""
    max_deliver = 3
    failing, good = new_rid(), new_rid()
    jsm = nc.jsm()
    config = (await jsm.consumer_info(STREAM_EVENTS, CONSUMER_NOTIFIER)).config
    config.max_deliver = max_deliver
    await jsm.add_consumer(STREAM_EVENTS, config)
    await publish_event(nc, lifecycle(failing)[0])  # stream sequence 1
    await publish_event(nc, lifecycle(good)[0])  # stream sequence 2
    # Shape the delivery counts on the service's own consumer before it starts: the failing event will come back
    # on its 2nd delivery, the good one right behind it on its 3rd, the last.
    psub = await nc.jetstream().pull_subscribe_bind(CONSUMER_NOTIFIER, STREAM_EVENTS)
    [held] = await psub.fetch(1, timeout=5)
    for delivery in range(1, max_deliver):
        [again] = await psub.fetch(1, timeout=5)
        assert (again.metadata.sequence.stream, again.metadata.num_delivered) == (2, delivery)
        if delivery < max_deliver - 1:
            await again.nak()
    await held.nak()  # back in the redelivery queue first ...
    await again.nak()  # ... the good one behind it
    await psub.unsubscribe()

    real_plan = notifier_handlers.plan  # type: ignore[attr-defined]

    def plan(before: Any, event: LifecycleEvent, *args: Any) -> Any:
        if event.request_id == failing:
            raise RuntimeError("a bug this event triggers")
        return real_plan(before, event, *args)

    monkeypatch.setattr(notifier_handlers, "plan", plan)
    app = create_notifier(notifier_settings(provisioned_nats, make_database_url("notifier"), catalog_path))
    processor: NotifierProcessor = app.state.processor
    processor.max_deliver = max_deliver
    handled: list[tuple[int, int]] = []  # (stream sequence, delivery) of every message the fallback handled
    real_single = processor.process

    async def process(msg: Any) -> Any:
        handled.append((msg.stream_sequence, msg.num_delivered))
        return await real_single(msg)

    processor.process = process  # type: ignore[method-assign]
    async with app.router.lifespan_context(app):
        await settled(nc, CONSUMER_NOTIFIER)

    print(f"handled one at a time (sequence, delivery): {handled}")
    assert (1, 2) in handled  # the failing one, not on its last delivery: naked ...
    assert (2, max_deliver) in handled  # ... and the good one behind it handled on its last delivery, not naked
    notes = await notifications(nc)
    assert {n.request_id for n in notes} == {good}
    dead = [DeadLetter.model_validate_json(m.data) for m in await stream_messages(nc, STREAM_DLQ)]
    assert [(d.code, d.original_stream_sequence) for d in dead] == [("processing_failed", 1)]  # the failing one only


async def test_notifier_crash_after_the_batch_commit_is_repaired_by_redelivery(
    provisioned_nats: str, make_database_url: MakeDatabaseUrl, catalog_path: Path, nc: NATS
) -> None:
    rid = new_rid()
    for event in lifecycle(rid):
        await publish_event(nc, event)
    app = create_notifier(notifier_settings(provisioned_nats, make_database_url("notifier"), catalog_path))
    processor: NotifierProcessor = app.state.processor
    real_publish_many = processor.publish_many
    real_process = processor.process
    crashed: list[int] = []

    async def crash_before_publishing(items: Sequence[Outgoing]) -> None:
        if not crashed:
            crashed.append(len(items))
            raise ConnectionError("the process died after the commit, before the PubAcks and the acks")
        await real_publish_many(items)

    async def dead(msg: Any) -> Any:
        if len(crashed) == 1:  # still "dead": the one-at-a-time fallback fails too, so nothing is acked
            raise ConnectionError("still down")
        return await real_process(msg)

    processor.publish_many = crash_before_publishing
    processor.process = dead  # type: ignore[method-assign]
    paths = Paths()
    paths.wrap(processor)
    async with app.router.lifespan_context(app):
        while not crashed:
            await asyncio.sleep(0.05)
        crashed.append(0)  # "restarted": the redelivery is handled normally
        await settled(nc, CONSUMER_NOTIFIER)

    print(f"batches (size, committed): {paths.batches}; one at a time: {paths.single}")
    assert paths.batches[0] == (5, False)  # committed, then "crashed" before its PubAcks
    # The redelivery found every event processed and published the stored rows again.
    assert [r.outcome for r in paths.outcomes] == [Outcome.REPUBLISHED] * 5
    notes = await notifications(nc)
    assert summary(by_dept(notes)) == EXPECTED
    assert len({n.notification_id for n in notes}) == len(notes) == crashed[0]  # once each, none lost


# --- metrics --------------------------------------------------------------------------------------------------
async def test_metrics_batch_with_a_poison_and_a_whole_lifecycle(
    provisioned_nats: str, make_database_url: MakeDatabaseUrl, nc: NATS
) -> None:
    rid = new_rid()
    events = lifecycle(rid)
    js = nc.jetstream()
    for index, event in enumerate(events):
        await publish_event(nc, event)
        if index == 2:  # a body that is not an event, in the middle of the request's events
            await js.publish(f"baton.events.{rid}.accepted", b"{not json", stream=STREAM_EVENTS)
    app = create_metrics(
        MetricsSettings(
            nats_url=provisioned_nats,
            database_url=make_database_url("metrics"),
            fetch_timeout=0.2,
            retry_delay=0.2,
            graceful_timeout=2,
        )
    )
    paths = Paths()
    paths.wrap(app.state.processor)
    async with app.router.lifespan_context(app):
        await settled(nc, CONSUMER_METRICS)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metrics") as http:
            timeline = (await http.get(f"/v1/requests/{rid}/timeline")).json()

    print(f"batches (size, committed): {paths.batches}; one at a time: {paths.single}")
    assert paths.single == []
    assert all(ok for _n, ok in paths.batches)
    assert max(size for size, _ in paths.batches) > 2
    assert [e["sequence"] for e in timeline["events"]] == [1, 2, 3, 4, 5]
    assert timeline["complete"] is True
    dead = [DeadLetter.model_validate_json(m.data) for m in await stream_messages(nc, STREAM_DLQ)]
    assert [d.original_stream_sequence for d in dead] == [4]  # only the poison, in the same batch


# --- routing --------------------------------------------------------------------------------------------------
async def test_routing_follows_a_whole_lifecycle_in_one_batch(
    provisioned_nats: str, make_database_url: MakeDatabaseUrl, catalog_path: Path, nc: NATS
) -> None:
    rids = [new_rid(), new_rid()]
    for first, second in zip(lifecycle(rids[0]), lifecycle(rids[1]), strict=True):
        await publish_event(nc, first)
        await publish_event(nc, second)
    app = create_routing(
        RoutingSettings(
            nats_url=provisioned_nats,
            database_url=make_database_url("routing"),
            catalog_path=str(catalog_path),
            fetch_timeout=0.2,
            retry_delay=0.2,
        )
    )
    paths = Paths()
    paths.wrap(app.state.processor)
    async with app.router.lifespan_context(app):
        await settled(nc, CONSUMER_ROUTING)

    print(f"batches (size, committed): {paths.batches}; one at a time: {paths.single}")
    assert paths.single == []
    assert all(ok for _n, ok in paths.batches)
    assert max(size for size, _ in paths.batches) > 2
    # Each request's created was routed exactly once (the routed event goes to intake on BATON_IN).
    emitted = [orjson.loads(m.data) for m in await stream_messages(nc, STREAM_IN)]
    routed = sorted(e["request_id"] for e in emitted if e.get("type") == "routed")
    assert routed == sorted(rids)


# --- intake ---------------------------------------------------------------------------------------------------
async def test_intake_appends_a_batch_in_order_and_refuses_the_bad_one_alone(
    provisioned_nats: str, make_database_url: MakeDatabaseUrl, tmp_path: Path, nc: NATS
) -> None:
    rid = intake_events.new_rid()
    accepted = intake_events.env("accepted", rid, "it", 2) | {
        "assignee": "Sam",
        "eta": (intake_events.T0 + timedelta(days=1)).isoformat(),
    }
    delayed = intake_events.env("delayed", rid, "it", 3) | {
        "reason": "backorder",
        "new_eta": (intake_events.T0 + timedelta(days=2)).isoformat(),
    }
    await intake_events.publish(nc, inbound_subject("marketing", "created"), intake_events.created(rid))
    await intake_events.publish(nc, service_subject("routing", "routed"), intake_events.routed(rid))
    await intake_events.publish(nc, inbound_subject("it", "accepted"), accepted)
    await intake_events.publish(nc, inbound_subject("it", "accepted"), b"{not json")  # refused, alone
    await intake_events.publish(nc, inbound_subject("it", "delayed"), delayed)
    app = create_intake(
        IntakeSettings(
            nats_url=provisioned_nats,
            database_url=make_database_url("intake"),
            fetch_timeout=0.2,
            retry_delay=0.2,
            tokens_path=tmp_path / "tokens.yaml",
        )
    )
    paths = Paths()
    paths.wrap(app.state.processor)
    async with app.router.lifespan_context(app):
        await intake_events.intake_settled(nc, within=60.0)

    print(f"batches (size, committed): {paths.batches}; one at a time: {paths.single}")
    assert paths.batches == [(5, True)]  # one batch, committed at once
    assert paths.single == []
    log = await intake_events.read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 4)
    assert [(e["type"], e["sequence"]) for e in log] == [("created", 1), ("routed", 2), ("accepted", 3), ("delayed", 4)]
    assert len({e["trace_id"] for e in log}) == 1  # the later events joined the trace their created started
    dead = [DeadLetter.model_validate_json(m.data) for m in await stream_messages(nc, STREAM_DLQ)]
    assert [(d.code, d.original_stream_sequence) for d in dead] == [("malformed_json", 4)]
