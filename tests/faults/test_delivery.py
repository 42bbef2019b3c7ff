"""Delivery faults: the same event three times, events out of order, a poison message among good ones."""

from __future__ import annotations

import asyncio
import itertools
import random
from datetime import datetime
from typing import Any

import pytest

from libs.contracts.subjects import CONSUMER_ROUTING, STREAM_EVENTS, STREAM_IN, event_subject

from .conftest import StartStack, kill_and_wait, log_lines
from .oracle import Lifecycle, Oracle, assert_clean, new_request_id, show

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

N = 30


async def test_the_same_event_published_three_times(start_stack: StartStack, capsys: Any) -> None:
    """Each event goes out three times with one event_id: twice with the same Nats-Msg-Id (JetStream drops the
    second), once with another (it reaches intake, which must recognise the event_id). Then every ``created``
    once more, after its lifecycle ended."""
    stack = await start_stack()
    oracle = Oracle(stack, N, interval=0.2)
    await oracle.connect()
    dropped_by_jetstream = 0

    async def thrice(lc: Lifecycle, event_type: str, event: dict[str, Any]) -> None:
        nonlocal dropped_by_jetstream
        dept = event["actor"]["department"]
        await oracle.publish(dept, event)
        dropped = await oracle.publish(dept, event)  # (read before adding: the hooks run concurrently)
        dropped_by_jetstream += dropped
        await oracle.publish(dept, event, msg_id=f"{event['event_id']}-again")

    oracle.publish_hook = thrice
    try:
        load_seconds = await oracle.run()
        for lc in oracle.lifecycles:  # a late duplicate, long after the request moved on
            created = lc.published["created"]
            await oracle.publish(lc.requester, created, msg_id=f"{created['event_id']}-late")
        published = 5 * N
        assert oracle.nc is not None
        stored = (await oracle.nc.jsm().stream_info(STREAM_IN)).state.messages
        report = await oracle.check("same event three times")
        report.notes |= {
            "events": published,
            "copies_sent": 3 * published + N,
            "dropped_by_jetstream": dropped_by_jetstream,
            "reached_intake": stored,
            "load_s": round(load_seconds, 1),
        }
        show(report, capsys)
        assert_clean(report)
        assert dropped_by_jetstream == published
        # two copies of every event, the late ones, and routing's own routed events (baton.svc.routing.routed)
        assert stored == 2 * published + N + N
    finally:
        await oracle.close()


async def test_events_delivered_out_of_order(start_stack: StartStack, capsys: Any) -> None:
    """Two realistic kinds of disorder.

    * Inbound: half the providers send ``delayed`` before ``accepted``. Intake refuses it (a rejection notice to
      the provider, a dead letter), applies ``accepted``, and the provider's retry of the same event (same
      event_id, a new Nats-Msg-Id) is then applied in its place: the log is in the valid order.
    * Downstream: after the lifecycles ended, a stale copy of every ``accepted`` canonical event is delivered
      again to routing, notifier and metrics (as a redelivery after a lost ack would): each consumer must see
      that its sequence was already applied and change nothing.
    """
    stack = await start_stack()
    oracle = Oracle(stack, N, interval=0.2)
    await oracle.connect()
    early: dict[str, dict[str, Any]] = {}

    async def disorder(lc: Lifecycle, event_type: str, event: dict[str, Any]) -> None:
        dept = event["actor"]["department"]
        index = oracle.lifecycles.index(lc)
        if index % 2 == 0 and event_type == "accepted":
            _, delayed = oracle.build(lc, "delayed")
            early[lc.request_id] = delayed
            await oracle.publish(dept, delayed)  # too early: refused
            oracle.extra_notifications[(dept, lc.request_id, "rejected")] += 1
            oracle.expected_dead_letters[("intake", lc.request_id, "illegal_transition")] += 1
        if event_type == "delayed" and lc.request_id in early:
            event = early[lc.request_id]
            lc.published["delayed"] = event
            await oracle.publish(dept, event, msg_id=f"{event['event_id']}-retry")
            return
        await oracle.publish(dept, event)

    oracle.publish_hook = disorder
    try:
        load_seconds = await oracle.run()
        assert oracle.nc is not None
        js, jsm = oracle.nc.jetstream(), oracle.nc.jsm()
        for lc in oracle.lifecycles:
            subject = event_subject(lc.request_id, "accepted")
            original = await jsm.get_last_msg(STREAM_EVENTS, subject)
            headers = {k: v for k, v in (original.headers or {}).items() if not k.startswith("Nats-")}
            ack = await js.publish(
                subject, original.data or b"", headers=headers | {"Nats-Msg-Id": f"stale-{lc.request_id}"}
            )
            oracle.injected_sequences.add(ack.seq)
        report = await oracle.check("events out of order")
        report.notes |= {
            "delayed_before_accepted": len(early),
            "stale_redeliveries": len(oracle.injected_sequences),
            "load_s": round(load_seconds, 1),
        }
        show(report, capsys)
        assert_clean(report)
        assert early
        # the early delayed events are in the log after accepted: the log holds the order that applies
        for rid, event in early.items():
            line = await oracle.canonical(rid, "delayed")
            assert (line["event_id"], line["sequence"]) == (event["event_id"], 4)
    finally:
        await oracle.close()


def _at(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


async def test_a_poison_message_among_good_ones(start_stack: StartStack, capsys: Any) -> None:
    """One request's ``created`` makes routing fail on every delivery (a test-only failpoint), among N good ones.

    Routing's consumer is provisioned with ``max_deliver`` 4 (routing reads it at start-up): the poison is tried
    exactly 4 times, with growing delays (nak with exponential backoff, no hot loop), then dead-lettered on
    ``baton.dlq.routing.processing_failed`` and terminated; every good lifecycle completes around it.
    """
    max_deliver = 4
    poison = Lifecycle(new_request_id(random.Random()), "marketing", "laptop", (), expected_length=1)
    # Routing's default batches: the good messages fetched behind the poison are naked with it each time (to
    # keep the order) and come back with it; none may be lost (before the routing fix in docs/faults.md they were).
    routing_env = {"BATON_ROUTING_FAILPOINT": f"raise_for:{poison.request_id}"}
    stack = await start_stack(service_env={"routing": routing_env})
    oracle = Oracle(stack, N, interval=0.2)
    nc = await oracle.connect()
    try:
        jsm = nc.jsm()
        config = (await jsm.consumer_info(STREAM_EVENTS, CONSUMER_ROUTING)).config
        config.max_deliver = max_deliver
        await jsm.add_consumer(STREAM_EVENTS, config)
        await kill_and_wait(stack, "routing")  # routing reads the provisioned max_deliver when it starts

        load = asyncio.create_task(oracle.run())
        await asyncio.sleep(1.0)
        dept, created = oracle.build(poison, "created")
        poison.published["created"] = created
        await oracle.publish(dept, created)
        load_seconds = await load

        oracle.lifecycles.append(poison)
        oracle.expected_dead_letters[("routing", poison.request_id, "processing_failed")] = 1
        # The failure comes after routing's commit (its decision is stored) but before the publish and the ack:
        # no ``routed`` ever reaches the log; the dead letter holds the event for a replay.
        oracle.extra_routing[(poison.request_id, "it")] = 1
        report = await oracle.check("poison message")

        needle = f"baton.events.{poison.request_id}.created"

        def attempts() -> tuple[list[str], list[str]]:
            lines = log_lines(stack, "routing", needle)
            return [x for x in lines if "failed; redelivering" in x], [x for x in lines if "giving up" in x]

        tries, gave_up = attempts()
        await asyncio.sleep(3.0)  # nothing more may come after the dead letter
        attempts_later = sum(map(len, attempts()))
        times = [_at(line) for line in sorted(tries + gave_up)]
        gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
        announced = [float(line.rsplit("redelivering in ", 1)[1].rstrip("s")) for line in sorted(tries)]
        report.notes |= {
            "attempts": len(times),
            "max_deliver": max_deliver,
            "gaps_s": gaps,
            "load_s": round(load_seconds, 1),
        }
        show(report, capsys)
        assert_clean(report)
        assert len(tries) == max_deliver - 1, tries + gave_up
        assert len(gave_up) == 1, tries + gave_up
        assert attempts_later == len(times)
        # no hot loop: the delays announced grow, and each redelivery came after (about) its delay, not at once
        assert all(gap >= delay / 2 for gap, delay in zip(gaps, announced, strict=True)), (gaps, announced)
        assert announced == sorted(announced), announced
        assert announced[-1] > announced[0], announced
        info = await jsm.consumer_info(STREAM_EVENTS, CONSUMER_ROUTING)
        assert info.num_ack_pending == 0, info
        assert info.num_pending == 0, info
    finally:
        await oracle.close()
