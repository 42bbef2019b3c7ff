"""Horizontal scale: two replicas of every service, as processes, on the same durable consumers and databases.

A load of lifecycles in which IT publishes each request's events back to back (accepted, delayed, delayed
with a later ETA, commented, resolved: swap any two and intake would refuse one) runs through two
replicas of intake, routing, notifier and metrics. Mid-run one replica of each service is killed with
SIGKILL, among them the intake replica holding the consumer lease. The run must end with every event
processed exactly once in effect and in each publisher's order (tests/scale_stack.py:check_exactly_once):

* canonical log: per request sequences 1..7, in publish order, no event twice, nothing refused;
* notifications: one per recipient per event, each department's stream in sequence order;
* metrics: every event stored once, every request's facts complete;
* routing: every event followed once, one decision per request.

SQLite by default; PostgreSQL with BATON_TEST_DATABASE_URL. Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from baton.natsserver import NatsServer
from baton.provision import provision
from libs.contracts.catalog import Catalog
from libs.contracts.subjects import SERVICES, STREAM_EVENTS, STREAM_NOTIFY
from services.intake.lease import current_holder
from tests.scale_stack import (
    Load,
    Replica,
    Stack,
    check_exactly_once,
    consumers_idle,
    diagnose,
    kill,
    publish_all,
    subject_count,
    wait_for,
)

pytestmark = pytest.mark.integration

MakeDatabaseUrl = Callable[[str], str]
REQUESTS = 60
#: Lease TTL for the test: a standby takes over within about this long after the holder died.
LEASE_TTL = 3.0


def lease_holder(intakes: list[Replica], holder_id: str) -> Replica:
    """The intake replica whose log says it acquired the lease as ``holder_id``."""
    found = [r for r in intakes if re.search(rf"lease \S+ (acquired|renewed own lease) by {holder_id}", r.log_text())]
    assert len(found) == 1, f"holder {holder_id}: {[r.name for r in found]}"
    return found[0]


async def test_two_replicas_of_every_service_process_each_event_once_in_publish_order(
    nats_server: NatsServer, catalog: Catalog, make_database_url: MakeDatabaseUrl, tmp_path: Path, database_backend: str
) -> None:
    await provision(nats_server.url, catalog, lease_ttl=LEASE_TTL)
    databases = {s: make_database_url(f"scale_{s}") for s in SERVICES}
    stack = Stack(nats_server.url, databases, tmp_path / "logs", replicas=2)
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1)
    load = Load.of(REQUESTS)

    async def at_least(n: int) -> bool:
        return await subject_count(nc, STREAM_EVENTS, "baton.events.>") >= n

    try:
        started = time.monotonic()
        await stack.start()
        boot = time.monotonic() - started
        holder_id = await current_holder(nc)
        assert holder_id is not None
        holder = lease_holder(stack.of("intake"), holder_id)

        started = time.monotonic()
        await publish_all(nc, [load.created[rid] for rid in load.rids])
        await wait_for("every request created and routed", lambda: at_least(2 * REQUESTS), 90)
        await publish_all(nc, load.burst_events(load.rids))
        # Mid-run: the kills land while intake works through the bursts, a batch in hand.
        await wait_for("the bursts under way", lambda: at_least(2 * REQUESTS + 30), 90, poll=0.02)
        victims = [holder] + [stack.of(s)[0] for s in SERVICES if s != "intake"]
        for victim in victims:
            await kill(victim)
        killed_at = time.monotonic()
        in_log_at_kill = await subject_count(nc, STREAM_EVENTS, "baton.events.>")
        took_over = await wait_for(
            "the standby intake taking the lease",
            lambda: _holder_is_not(nc, holder_id),
            60,
        )
        await wait_for(
            "every event through every service",
            lambda: _all_done(nc, load.total),
            120,
            on_timeout=lambda: diagnose(nc, stack),
        )
        recovered = time.monotonic() - killed_at
        elapsed = time.monotonic() - started
    finally:
        await stack.stop()
        await nc.close()

    nc = await nats.connect(nats_server.url)
    try:
        counts = await check_exactly_once(nc, load, databases)
    finally:
        await nc.close()
    standby = next(r for r in stack.of("intake") if r is not holder)
    assert "acquired by" in standby.log_text(), "the standby intake took over the lease"
    survivors = [r.name for r in stack.members if r not in victims]
    print(
        f"\n[{database_backend}] 2 replicas x 4 services up in {boot:.1f}s; {REQUESTS} requests, {load.total} "
        f"canonical events in {elapsed:.1f}s; killed {[v.name for v in victims]} mid-run (intake lease holder "
        f"{holder.name}) with {in_log_at_kill}/{load.total} events in the log; standby intake took the lease "
        f"{took_over:.1f}s after the kill, all drained "
        f"{recovered:.1f}s after it (survivors {survivors}); counts {counts}; 0 refused, 0 dead letters"
    )


async def _holder_is_not(nc: NATS, old: str) -> bool:
    holder = await current_holder(nc)
    return holder is not None and holder != old


async def _all_done(nc: NATS, total: int) -> bool:
    refused = await subject_count(nc, STREAM_NOTIFY, "baton.notify.*.rejected")
    assert not refused, f"{refused} events refused: applied out of their publish order"
    return await subject_count(nc, STREAM_EVENTS, "baton.events.>") >= total and await consumers_idle(nc)
