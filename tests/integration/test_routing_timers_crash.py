"""Durable SLA timers survive a kill -9 of routing and a kill -9 of NATS.

A real ``python -m services.routing`` process arms the timers of 100 requests (accept: 20 s,
resolve: 1 h, around the clock), then is killed with SIGKILL. While it is down, half of the
requests are accepted in time and the nats-server itself is killed and restarted. After every
accept deadline has passed, routing is started again: exactly one ``escalated`` must reach the
canonical log for each request that was not accepted, and none for the others (nor for any
resolve clock). A second kill -9 and restart must not add any.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from baton.natsserver import NatsServer, free_port
from baton.provision import provision
from libs.contracts.catalog_file import load_catalog
from libs.contracts.subjects import CONSUMER_ROUTING, STREAM_EVENTS, inbound_subject
from services.intake.app import create_app as create_intake
from services.intake.settings import IntakeSettings
from tests.conftest import MakeDatabaseUrl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REQUESTS = 100
ACCEPT_WITHIN = 20  # seconds, around the clock (room for a slow, shared machine to create 100 requests)
ROOT = Path(__file__).resolve().parents[2]

CATALOG = f"""\
version: 1
fallback_department: ops
departments:
  - slug: ops
    name: Operations (24/7)
    categories: [ops-task]
    business_hours: {{always: true}}
    sla:
      normal: {{accept_within: {ACCEPT_WITHIN}, resolve_within: 1h}}
  - slug: marketing
    name: Marketing
    categories: [campaign]
"""


class Routing:
    """``python -m services.routing`` as its own process (exactly as ``baton up`` runs it)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.port = int(env["BATON_ROUTING_HTTP_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.routing"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                assert self.proc.poll() is None, f"routing exited: {self.log_path.read_text()[-3000:]}"
                try:
                    if (await client.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"routing not ready: {self.log_path.read_text()[-3000:]}"
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
async def stack(
    nats_server: NatsServer, make_database_url: MakeDatabaseUrl, tmp_path: Path
) -> AsyncIterator[tuple[NatsServer, Routing]]:
    catalog_file = tmp_path / "catalog.yaml"
    catalog_file.write_text(CATALOG, encoding="utf-8")
    await provision(nats_server.url, load_catalog(catalog_file))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "BATON_ROUTING_NATS_URL": nats_server.url,
        "BATON_ROUTING_DATABASE_URL": make_database_url("routing"),
        "BATON_ROUTING_CATALOG_PATH": str(catalog_file),
        "BATON_ROUTING_HTTP_PORT": str(free_port()),
        "BATON_ROUTING_FETCH_TIMEOUT": "0.05",
        "BATON_ROUTING_RETRY_DELAY": "0.2",
    }
    routing = Routing(env, tmp_path / "routing.log")
    intake = create_intake(
        IntakeSettings(nats_url=nats_server.url, database_url=make_database_url("intake"), retry_delay=0.2)
    )
    async with intake.router.lifespan_context(intake):
        try:
            yield nats_server, routing
        finally:
            routing.stop()


async def canonical(nc: NATS, event_type: str) -> list[dict[str, Any]]:
    """Every canonical event of a type, read with an ephemeral consumer (no durable is disturbed)."""
    sub = await nc.jetstream().pull_subscribe(
        f"baton.events.*.{event_type}", stream=STREAM_EVENTS, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    )
    out: list[dict[str, Any]] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(500, timeout=0.5)
            except TimeoutError:
                return out
            out += [orjson.loads(m.data) for m in msgs]
    finally:
        await sub.unsubscribe()


async def until(check: Any, what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.25)


async def publish(nc: NATS, dept: str, doc: dict[str, Any]) -> None:
    await nc.jetstream().publish(
        inbound_subject(dept, doc["type"]), orjson.dumps(doc), headers={"Nats-Msg-Id": doc["event_id"]}
    )


def event(event_type: str, rid: str, dept: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": event_type,
        "event_id": f"evt-{uuid.uuid4().hex[:16]}",
        "request_id": rid,
        "occurred_at": datetime.now(UTC).isoformat(),
        "actor": {"department": dept, "person": "someone"},
    } | fields


async def test_timers_survive_kill_9_of_routing_and_of_nats(stack: tuple[NatsServer, Routing]) -> None:
    server, routing = stack
    await routing.start()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        rids = [f"REQ-CRASH{i:03d}-{uuid.uuid4().hex[:6]}" for i in range(REQUESTS)]
        for rid in rids:
            await publish(
                nc,
                "marketing",
                event(
                    "created",
                    rid,
                    "marketing",
                    title="Restart the night batch",
                    category="ops-task",
                    priority="normal",
                    requester={"department": "marketing", "person": "Ana"},
                ),
            )

        async def all_routed_and_armed() -> bool:
            routed = await canonical(nc, "routed")
            if len({e["request_id"] for e in routed}) < REQUESTS:
                return False
            info = await nc.jsm().consumer_info(STREAM_EVENTS, CONSUMER_ROUTING)
            # Routing acks a canonical routed only after its clocks' timers were scheduled on NATS.
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)

        await until(all_routed_and_armed, "100 requests routed with their timers armed", within=60)
        routed = {e["request_id"]: datetime.fromisoformat(e["occurred_at"]) for e in await canonical(nc, "routed")}
        routed_at = max(routed.values())
        spread = (routed_at - min(routed.values())).total_seconds()
        timers = await nc.jsm().stream_info("BATON_TIMERS", subjects_filter="baton.timers.sched.>")
        pending = Counter(s.rsplit(".", 3)[1] + "." + s.rsplit(".", 1)[1] for s in (timers.state.subjects or {}))
        assert pending["accept.breach"] == REQUESTS  # 100 accept deadlines pending in NATS (plus the others)
        assert pending["resolve.breach"] == REQUESTS

        routing.kill()  # kill -9 with every timer pending

        accepted = set(rids[::2])
        for rid in sorted(accepted):
            eta = (datetime.now(UTC) + timedelta(days=1)).isoformat()
            await publish(nc, "ops", event("accepted", rid, "ops", assignee="Sam", eta=eta))

        async def accepts_recorded() -> bool:
            return len(await canonical(nc, "accepted")) == len(accepted)

        await until(accepts_recorded, "the accepts to be recorded while routing is down", within=30)
        for e in await canonical(nc, "accepted"):
            late = datetime.fromisoformat(e["recorded_at"]) - routed[e["request_id"]]
            assert late < timedelta(seconds=ACCEPT_WITHIN), f"the machine is too slow: an accept came {late} late"

        await nc.close()
        await server.restart_async(kill=True)  # kill -9 NATS too, then start it on the same store
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)

        # Every accept deadline passes while routing is down.
        wait = (routed_at + timedelta(seconds=ACCEPT_WITHIN + 2) - datetime.now(UTC)).total_seconds()
        await asyncio.sleep(max(wait, 0))
        started = time.monotonic()
        await routing.start()
        ready = time.monotonic() - started

        async def all_escalated() -> bool:
            return len(await canonical(nc, "escalated")) >= REQUESTS - len(accepted)

        await until(all_escalated, "an escalation per unaccepted request", within=60)
        caught_up = time.monotonic() - started
        await asyncio.sleep(3)  # time for any duplicate to show up

        routing.kill()  # and once more: a restart must not escalate anything again
        await routing.start()
        await asyncio.sleep(4)

        escalated = await canonical(nc, "escalated")
        per_clock = Counter((e["request_id"], e["department"], e["clock"], e["episode"]) for e in escalated)
        assert set(per_clock.values()) == {1}, "an escalation was emitted twice"
        assert {e["request_id"] for e in escalated} == set(rids) - accepted
        assert {(e["department"], e["clock"]) for e in escalated} == {("ops", "accept")}
        assert all(e["overdue_seconds"] >= 0 for e in escalated)
        warnings = Counter((e["request_id"], e["clock"]) for e in await canonical(nc, "sla_warning"))
        assert all(n == 1 for n in warnings.values())
        assert not any(rid in accepted for rid, _ in warnings)
        print(
            f"\n{len(escalated)} escalations for {REQUESTS - len(accepted)} breached clocks, none for "
            f"{len(accepted)} accepted in time; all in the canonical log {caught_up:.1f}s after the restart "
            f"(routing ready after {ready:.1f}s) "
            f"(100 requests routed within {spread:.1f}s)"
        )
    finally:
        await nc.close()
