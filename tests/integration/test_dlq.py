"""Poison messages, the advisory path to the dead-letter queue, and `baton dlq` end to end.

Real nats-server (private per test), real intake in-process, real database (SQLite; PostgreSQL in CI).
Consumers are provisioned with a small max_deliver (and ack_wait for the crash case) via provision overrides.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from typer.testing import CliRunner

from baton.cli import app as cli
from baton.cmd_dlq import DlqError, get_entry, list_entries, replay_entry, replay_refusal
from baton.natsserver import NatsServer
from baton.provision import ProvisionError, provision
from libs.contracts import DeadLetter
from libs.contracts.catalog import Catalog
from libs.contracts.dlq import ADVISORY_TERMINATED, TERM_DEAD_LETTERED
from libs.contracts.subjects import (
    CONSUMER_ADVISORIES,
    CONSUMER_INTAKE,
    STREAM_ADVISORIES,
    STREAM_EVENTS,
    STREAM_IN,
    inbound_subject,
)
from services.intake.app import create_app
from services.intake.handlers import Inbound, IntakeProcessor, Outcome
from services.intake.settings import IntakeSettings
from tests.intake_events import created, new_rid, publish, read_stream

pytestmark = pytest.mark.integration

RETRY_DELAY = 0.2


@asynccontextmanager
async def running_intake(url: str, database_url: str) -> AsyncIterator[Any]:
    settings = IntakeSettings(nats_url=url, database_url=database_url, fetch_timeout=0.05, retry_delay=RETRY_DELAY)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


async def wait_for(check: Callable[[], Any], within: float = 20.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {within}s")
        await asyncio.sleep(0.1)


async def advisories_settled(nc: NATS, expect: int) -> bool:
    jsm = nc.jsm()
    if (await jsm.stream_info(STREAM_ADVISORIES)).state.messages < expect:
        return False
    info = await jsm.consumer_info(STREAM_ADVISORIES, CONSUMER_ADVISORIES)
    return bool(info.delivered.stream_seq >= expect and info.num_ack_pending == 0 and info.num_pending == 0)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


async def test_provision_overrides_are_checked(nats_server: NatsServer, catalog: Catalog) -> None:
    with pytest.raises(ProvisionError, match="unknown consumer"):
        await provision(nats_server.url, catalog, overrides={"nobody": {"max_deliver": 2}})
    with pytest.raises(ProvisionError, match="unknown fields"):
        await provision(nats_server.url, catalog, overrides={"intake": {"colour": 2}})


async def test_poison_among_good_ones_is_tried_max_deliver_times_with_growing_delays_then_dead_lettered_once(
    nats_server: NatsServer, catalog: Catalog, nc: NATS, make_database_url: Callable[[str], str]
) -> None:
    max_deliver = 4
    await provision(nats_server.url, catalog, overrides={CONSUMER_INTAKE: {"max_deliver": max_deliver}})
    attempts: list[float] = []
    original = IntakeProcessor.process

    async def process(self: IntakeProcessor, msg: Inbound) -> Outcome:
        if b"POISON" in msg.data:
            attempts.append(asyncio.get_running_loop().time())
            raise ValueError("cannot digest this one")
        return await original(self, msg)

    original_batch = IntakeProcessor.process_batch

    async def process_batch(self: IntakeProcessor, msgs: Sequence[Inbound], *args: Any, **kwargs: Any) -> Any:
        # Processing the poison raises inside a batch too: the batch rolls back and intake falls back to one
        # message at a time (``process`` above), which isolates it.
        if any(b"POISON" in m.data for m in msgs):
            raise ValueError("cannot digest this one (in a batch)")
        return await original_batch(self, msgs, *args, **kwargs)

    rids = [new_rid() for _ in range(4)]
    async with running_intake(nats_server.url, make_database_url("intake")) as app:
        app.state.processor.process = process.__get__(app.state.processor)
        app.state.processor.process_batch = process_batch.__get__(app.state.processor)
        await publish(nc, inbound_subject("marketing", "created"), created(rids[0]))
        poison = created(rids[1], title="POISON pill")
        await publish(nc, inbound_subject("marketing", "created"), poison)
        await publish(nc, inbound_subject("marketing", "created"), created(rids[2]))
        await publish(nc, inbound_subject("marketing", "created"), created(rids[3]))

        entries = await wait_for(lambda: list_entries(nc), what="a dead letter")
        for rid in (rids[0], rids[2], rids[3]):
            assert len(await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 1)) == 1
        # The service terminated it with TERM_DEAD_LETTERED: the advisory is recognised, no second entry.
        await wait_for(lambda: advisories_settled(nc, 1), what="the terminated advisory handled")
        entries = await list_entries(nc)
        advisory = orjson.loads((await nc.jsm().get_msg(STREAM_ADVISORIES, seq=1)).data or b"")

    # nats-server carried the service's +TERM reason into the advisory (what the advisory consumer skips on).
    assert (advisory["type"], advisory["reason"]) == (ADVISORY_TERMINATED, TERM_DEAD_LETTERED)
    assert len(await read_stream(nc, STREAM_EVENTS, f"baton.events.{rids[1]}.*", 0, within=0.5)) == 0
    minimum = sum(RETRY_DELAY * 2**i for i in range(max_deliver - 1))
    span = attempts[-1] - attempts[0]
    print(f"attempts={len(attempts)} first->last={span:.2f}s (minimum delays {minimum:.2f}s)")
    assert len(attempts) == max_deliver
    assert span >= minimum
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps)), gaps
    assert len(entries) == 1
    letter = entries[0].letter
    assert (letter.service, letter.code) == ("intake", "processing_failed")
    assert "cannot digest this one" in letter.message
    assert letter.dead_letter_id == f"dlq-intake-{letter.original_stream_sequence}"
    assert orjson.loads(base64.b64decode(letter.payload)) == poison


async def test_a_consumer_that_never_acks_ends_in_the_dlq_through_the_advisory_and_is_replayable(
    nats_server: NatsServer, catalog: Catalog, nc: NATS, make_database_url: Callable[[str], str]
) -> None:
    await provision(nats_server.url, catalog, overrides={CONSUMER_INTAKE: {"max_deliver": 3, "ack_wait_seconds": 0.5}})
    rid = new_rid()
    event = created(rid)
    await publish(nc, inbound_subject("marketing", "created"), event)
    # A "crashing" intake: it fetches the message and dies before acking, three times.
    sub = await nc.jetstream().pull_subscribe_bind(CONSUMER_INTAKE, STREAM_IN)
    for _ in range(3):
        got = await sub.fetch(1, timeout=5)
        assert got[0].metadata.num_delivered >= 1
    with pytest.raises(TimeoutError):  # no fourth delivery; this pull lets the server notice and advise
        await sub.fetch(1, timeout=2)
    await sub.unsubscribe()
    await wait_for(
        lambda: _stream_has(nc, STREAM_ADVISORIES, 1), what="the max-deliveries advisory captured in BATON_ADVISORIES"
    )

    async with running_intake(nats_server.url, make_database_url("intake")):
        entries = await wait_for(lambda: list_entries(nc), what="the advisory's dead letter")
        assert len(entries) == 1
        letter = entries[0].letter
        assert (letter.service, letter.code) == ("intake", "max_deliveries")
        assert letter.message.startswith("max deliveries exceeded after 3 deliveries")
        assert letter.details["source"] == "advisory"
        assert letter.details["deliveries"] == 3
        assert letter.original_subject == inbound_subject("marketing", "created")
        assert orjson.loads(base64.b64decode(letter.payload)) == event
        assert letter.event_id == event["event_id"]
        assert letter.department == "marketing"
        ident = str(entries[0].sequence)

        # The CLI, end to end (it runs its own event loop: in a thread).
        listed = await asyncio.to_thread(invoke, "dlq", "list", "--nats-url", nats_server.url, "--json")
        assert listed.exit_code == 0, listed.output
        assert [e["code"] for e in json.loads(listed.output)] == ["max_deliveries"]
        none = await asyncio.to_thread(
            invoke, "dlq", "list", "--nats-url", nats_server.url, "--json", "--service", "routing"
        )
        assert json.loads(none.output) == []
        shown = await asyncio.to_thread(invoke, "dlq", "show", ident, "--nats-url", nats_server.url)
        assert shown.exit_code == 0, shown.output
        full = json.loads(shown.output)
        assert (full["deliveries"], full["replayable"], full["original_subject"]) == (3, True, letter.original_subject)
        assert json.loads(full["payload_text"]) == event

        replayed = await asyncio.to_thread(invoke, "dlq", "replay", ident, "--nats-url", nats_server.url)
        assert replayed.exit_code == 0, replayed.output
        log = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 1)
        assert [e["event_id"] for e in log] == [event["event_id"]]

        again = await asyncio.to_thread(invoke, "dlq", "replay", ident, "--nats-url", nats_server.url)
        assert again.exit_code == 1
        assert "--force" in again.output
        forced = await asyncio.to_thread(invoke, "dlq", "replay", ident, "--force", "--nats-url", nats_server.url)
        assert forced.exit_code == 0, forced.output
        entry = await get_entry(nc, ident)
        assert [r.msg_id for r in entry.replays] == [f"replay-{ident}-1", f"replay-{ident}-2"]
        # intake dedupes on event_id: the forced replay changed nothing in the canonical log.
        await asyncio.sleep(1)
        assert len(await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 1)) == 1


async def _stream_has(nc: NATS, stream: str, count: int) -> bool:
    return bool((await nc.jsm().stream_info(stream)).state.messages >= count)


async def test_canonical_events_are_never_replayed(provisioned_nats: str, nc: NATS) -> None:
    from datetime import UTC, datetime

    letter = DeadLetter(
        dead_letter_id="dlq-metrics-12",
        service="metrics",
        code="processing_failed",
        message="boom",
        original_subject="baton.events.REQ-12345678.created",
        payload=base64.b64encode(b"{}").decode(),
        dead_lettered_at=datetime.now(UTC),
    )
    assert replay_refusal(letter) is not None
    forged = letter.model_copy(update={"original_subject": "baton.in.it\r\nPUB x 1\r\n.created"})
    assert "not a publishable subject" in (replay_refusal(forged) or "")
    await nc.jetstream().publish("baton.dlq.metrics.processing_failed", letter.model_dump_json().encode())
    [entry] = await list_entries(nc, service="metrics")
    with pytest.raises(DlqError, match="never re-published"):
        await replay_entry(nc, entry)
    assert (await nc.jsm().stream_info(STREAM_EVENTS)).state.messages == 0


def test_since_parses_durations_and_times() -> None:
    from datetime import UTC, datetime, timedelta

    from baton.cmd_dlq import parse_since

    now = datetime(2026, 1, 2, tzinfo=UTC)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("2026-01-01T00:00:00", now) == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_since(None) is None


async def test_a_database_outage_on_the_last_delivery_is_waited_out_not_dead_lettered(
    nats_server: NatsServer,
    catalog: Catalog,
    nc: NATS,
    make_database_url: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy.exc import OperationalError

    from services.intake import handlers

    monkeypatch.setattr(handlers, "IN_PLACE_ATTEMPTS", 5)
    monkeypatch.setattr(handlers, "MAX_IN_PLACE_DELAY", 0.05)

    await provision(nats_server.url, catalog, overrides={CONSUMER_INTAKE: {"max_deliver": 2}})
    calls: list[tuple[int, str]] = []
    original = IntakeProcessor.process

    async def process(self: IntakeProcessor, msg: Inbound) -> Outcome:
        # delivery 1: a bug-like failure (naked); delivery 2 (the last): the database is down for 12 attempts
        # (more than the 5 in-place attempts of an ordinary delivery), then back.
        if msg.num_delivered == 1:
            calls.append((1, "error"))
            raise ValueError("first delivery fails")
        if len([c for c in calls if c[0] == 2]) < 12:
            calls.append((2, "db down"))
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database is down"))
        calls.append((2, "ok"))
        return await original(self, msg)

    rid = new_rid()
    async with running_intake(nats_server.url, make_database_url("intake")) as app:
        app.state.processor.process = process.__get__(app.state.processor)
        await publish(nc, inbound_subject("marketing", "created"), created(rid))
        log = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 1, within=60)
    print(f"attempts: {len(calls)} (last: {calls[-1]})")
    assert [e["request_id"] for e in log] == [rid]
    assert calls[-1] == (2, "ok")
    assert await list_entries(nc) == []


async def test_shutdown_drains_the_message_in_hand_and_acks_it(
    nats_server: NatsServer, catalog: Catalog, nc: NATS, make_database_url: Callable[[str], str]
) -> None:
    """Stopping intake (what SIGTERM does through uvicorn's lifespan) lets the message in hand finish and be
    acked: it is neither lost nor redelivered."""
    await provision(nats_server.url, catalog)
    started = asyncio.Event()
    finished: list[str] = []
    original = IntakeProcessor.process

    async def slow(self: IntakeProcessor, msg: Inbound) -> Outcome:
        started.set()
        await asyncio.sleep(1.5)
        outcome = await original(self, msg)
        finished.append(outcome.value)
        return outcome

    rid = new_rid()
    async with running_intake(nats_server.url, make_database_url("intake")) as app:
        app.state.processor.process = slow.__get__(app.state.processor)
        await publish(nc, inbound_subject("marketing", "created"), created(rid))
        await asyncio.wait_for(started.wait(), timeout=20)
        # leaving the block runs the lifespan exit: broker.stop() with graceful_timeout, then the database
    assert finished == ["applied"]
    info = await nc.jsm().consumer_info(STREAM_IN, CONSUMER_INTAKE)
    print(f"after shutdown: ack floor {info.ack_floor.stream_seq}, pending acks {info.num_ack_pending}")
    assert info.num_ack_pending == 0
    assert info.ack_floor.stream_seq == 1
    assert len(await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 1)) == 1


async def test_replay_all_matching_replays_each_inbound_entry_once(provisioned_nats: str, nc: NATS) -> None:
    from datetime import UTC, datetime

    def letter(n: int, service: str, subject: str) -> bytes:
        return (
            DeadLetter(
                dead_letter_id=f"dlq-{service}-{n}",
                service=service,
                code="processing_failed",
                message="boom",
                original_subject=subject,
                original_headers={"Nats-Msg-Id": f"orig-{n}", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"},
                payload=base64.b64encode(orjson.dumps(created(new_rid()))).decode(),
                dead_lettered_at=datetime.now(UTC),
            )
            .model_dump_json()
            .encode()
        )

    js = nc.jetstream()
    await js.publish("baton.dlq.intake.processing_failed", letter(1, "intake", "baton.in.marketing.created"))
    await js.publish("baton.dlq.intake.processing_failed", letter(2, "intake", "baton.in.marketing.created"))
    await js.publish("baton.dlq.notifier.processing_failed", letter(3, "notifier", "baton.events.REQ-12345678.x"))

    first = await asyncio.to_thread(invoke, "dlq", "replay", "--all-matching", "--nats-url", provisioned_nats)
    assert first.exit_code == 0, first.output
    assert "2 replayed, 1 skipped" in first.output
    again = await asyncio.to_thread(
        invoke, "dlq", "replay", "--all-matching", "--service", "intake", "--nats-url", provisioned_nats
    )
    assert "0 replayed, 2 skipped" in again.output
    jsm = nc.jsm()
    replayed = [await jsm.get_msg(STREAM_IN, seq=s) for s in (1, 2)]
    assert [m.headers["Nats-Msg-Id"] for m in replayed if m.headers] == ["replay-1-1", "replay-2-1"]
    assert [m.headers["Baton-Replay-Of"] for m in replayed if m.headers] == ["dlq-intake-1", "dlq-intake-2"]
    assert all(m.headers and m.headers["traceparent"].startswith("00-") for m in replayed)
    assert (await jsm.stream_info(STREAM_IN)).state.messages == 2
