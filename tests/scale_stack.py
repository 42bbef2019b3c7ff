"""Replicas of Baton's services as real processes, and a lifecycle load to drive them (tests/integration/test_scale.py,
test_cluster.py).

Each replica is ``python -m services.<name>`` (as baton/supervisor.py starts it) with its own HTTP port; the
replicas of one service share one database and one durable consumer. Only processes started here are ever
signalled, by their own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from baton.natsserver import free_port
from libs.contracts.subjects import (
    CONSUMER_INTAKE,
    CONSUMER_METRICS,
    CONSUMER_NOTIFIER,
    CONSUMER_ROUTING,
    SERVICES,
    STREAM_DLQ,
    STREAM_EVENTS,
    STREAM_IN,
    STREAM_NOTIFY,
    inbound_subject,
)

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "deploy" / "catalog.yaml"
CONSUMERS = {
    "intake": (STREAM_IN, CONSUMER_INTAKE),
    "routing": (STREAM_EVENTS, CONSUMER_ROUTING),
    "notifier": (STREAM_EVENTS, CONSUMER_NOTIFIER),
    "metrics": (STREAM_EVENTS, CONSUMER_METRICS),
}


@dataclass
class Replica:
    service: str
    index: int
    port: int
    log_path: Path
    proc: asyncio.subprocess.Process | None = None

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


@dataclass
class Stack:
    """``replicas`` processes of every service on ``nats_url`` (comma-separated list), one database per service."""

    nats_url: str
    databases: dict[str, str]
    log_dir: Path
    replicas: int = 2
    fetch_batch: int = 8
    members: list[Replica] = field(default_factory=list)

    def env(self, service: str, port: int) -> dict[str, str]:
        prefix = f"BATON_{service.upper()}_"
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("BATON_")},
            "PYTHONUNBUFFERED": "1",
            prefix + "NATS_URL": self.nats_url,
            prefix + "DATABASE_URL": self.databases[service],
            prefix + "HTTP_HOST": "127.0.0.1",
            prefix + "HTTP_PORT": str(port),
            prefix + "CATALOG_PATH": str(CATALOG),
            prefix + "FETCH_BATCH": str(self.fetch_batch),
            prefix + "FETCH_TIMEOUT": "0.02",
            prefix + "RETRY_DELAY": "0.2",
            prefix + "GRACEFUL_TIMEOUT": "5",
            prefix + "LOG_LEVEL": "INFO",
            "BATON_NOTIFIER_GAP_DELAY": "0.1",
            "BATON_NOTIFIER_GAP_MAX_DELAY": "1.0",
        }

    async def spawn(self, service: str, index: int) -> Replica:
        replica = Replica(service, index, free_port(), self.log_dir / f"{service}-{index}.log")
        with replica.log_path.open("ab") as logfile:
            replica.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"services.{service}",
                cwd=ROOT,
                env=self.env(service, replica.port),
                stdout=logfile,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        self.members.append(replica)
        return replica

    async def start(self) -> None:
        """Every service's first replica, then (once each has created its schema) the others."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        first = [await self.spawn(s, 1) for s in SERVICES]
        await wait_ready(first)
        rest = [await self.spawn(s, n) for n in range(2, self.replicas + 1) for s in SERVICES]
        await wait_ready(rest)

    def of(self, service: str) -> list[Replica]:
        return [r for r in self.members if r.service == service]

    async def stop(self) -> None:
        for r in self.members:
            if r.alive and r.proc is not None:
                r.proc.send_signal(signal.SIGTERM)
        for r in self.members:
            if r.proc is None:
                continue
            try:
                await asyncio.wait_for(r.proc.wait(), 30)
            except TimeoutError:
                r.proc.kill()
                await r.proc.wait()


async def kill(replica: Replica) -> None:
    """SIGKILL one replica this test started (a crash: no drain, no lease release)."""
    assert replica.proc is not None
    assert replica.alive
    replica.proc.kill()
    await replica.proc.wait()


async def wait_ready(replicas: list[Replica], within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    pending = list(replicas)
    async with httpx.AsyncClient(timeout=2.0) as client:
        while pending:
            for r in list(pending):
                if not r.alive:
                    raise RuntimeError(f"{r.name} exited:\n{r.log_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{r.port}/readyz")).status_code == 200:
                        pending.remove(r)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"{pending[0].name} not ready within {within}s:\n{pending[0].log_text()[-3000:]}")
            if pending:
                await asyncio.sleep(0.2)


# --- the load -----------------------------------------------------------------------------------
T0 = datetime.now(UTC).replace(microsecond=0)


def _env(event_type: str, rid: str, dept: str, minutes: int) -> dict[str, Any]:
    return {
        "type": event_type,
        "event_id": f"evt-{uuid.uuid4().hex[:20]}",
        "request_id": rid,
        "occurred_at": (T0 + timedelta(minutes=minutes)).isoformat(),
        "actor": {"department": dept, "person": "someone"},
    }


def created(rid: str) -> dict[str, Any]:
    return _env("created", rid, "marketing", 0) | {
        "title": f"Laptop {rid}",
        "category": "laptop",
        "priority": "normal",
        "requester": {"department": "marketing", "person": "Ana"},
    }


def holder_burst(rid: str) -> list[dict[str, Any]]:
    """What IT publishes back to back once the request is routed to it: each event needs the one before.

    accepted -> delayed -> delayed (a later ETA each time: swapped, the second would be refused) ->
    commented -> resolved.
    """
    day = timedelta(days=1)
    return [
        _env("accepted", rid, "it", 2) | {"assignee": "Sam", "eta": (T0 + day).isoformat()},
        _env("delayed", rid, "it", 3) | {"reason": "waiting for parts", "new_eta": (T0 + 2 * day).isoformat()},
        _env("delayed", rid, "it", 4) | {"reason": "courier late", "new_eta": (T0 + 3 * day).isoformat()},
        _env("commented", rid, "it", 5) | {"comment": "parts arrived"},
        _env("resolved", rid, "it", 6) | {"resolution": "laptop delivered", "outcome": "done"},
    ]


#: Events per request in the canonical log: created, routed (by routing), then the holder's burst.
EVENTS_PER_REQUEST = 7


def new_rid() -> str:
    return f"SCALE-{uuid.uuid4().hex[:10].upper()}"


async def publish_all(nc: NATS, events: list[dict[str, Any]]) -> None:
    """JetStream-publish in this order on one connection (so the stream keeps it), each with its Nats-Msg-Id."""
    js = nc.jetstream(publish_async_max_pending=2000)
    futures = [
        await js.publish_async(
            inbound_subject(e["actor"]["department"], e["type"]),
            orjson.dumps(e),
            headers={"Nats-Msg-Id": e["event_id"]},
        )
        for e in events
    ]
    acks = await asyncio.wait_for(asyncio.gather(*futures), timeout=120)
    assert not any(a.duplicate for a in acks)


async def subject_count(nc: NATS, stream: str, subject: str) -> int:
    info = await nc.jetstream().stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def wait_for(
    what: str,
    check: Callable[[], Any],
    within: float,
    on_timeout: Callable[[], Awaitable[str]] | None = None,
    poll: float = 0.25,
) -> float:
    """Poll ``await check()`` (truthy = done) until ``within`` seconds; returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - started
        except AssertionError:
            raise  # a check that can already tell the run failed
        except Exception:  # NATS busy (a leader election): ask again
            await asyncio.sleep(poll)
            continue
        if time.monotonic() - started > within:
            detail = await on_timeout() if on_timeout is not None else ""
            raise TimeoutError(f"{what}: not within {within}s.\n{detail}")
        await asyncio.sleep(poll)


async def diagnose(nc: NATS, stack: Stack) -> str:
    """What a stuck run looks like: each service consumer's state, and each replica's warnings and errors."""
    lines = []
    for stream, durable in CONSUMERS.values():
        try:
            info = await nc.jetstream(timeout=5).consumer_info(stream, durable)
            lines.append(
                f"{stream}/{durable}: pending {info.num_pending}, unacked {info.num_ack_pending}, "
                f"redelivered {info.num_redelivered}, "
                f"ack floor {info.ack_floor.stream_seq if info.ack_floor else None}, "
                f"waiting pull requests {info.num_waiting}, leader {info.cluster.leader if info.cluster else None}"
            )
        except Exception as exc:
            lines.append(f"{stream}/{durable}: {exc!r}")
    for r in stack.members:
        noisy = [ln for ln in r.log_text().splitlines() if " WARNING " in ln or " ERROR " in ln]
        lines.append(f"--- {r.name} ({'alive' if r.alive else 'dead'}): {len(noisy)} warnings/errors, last ones:")
        lines += noisy[-12:]
    return "\n".join(lines)


async def consumers_idle(nc: NATS) -> bool:
    """Every service consumer has had every message delivered and acked."""
    js = nc.jetstream(timeout=5)
    for stream, durable in CONSUMERS.values():
        info = await js.consumer_info(stream, durable)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def read_all(nc: NATS, stream: str, subject: str) -> list[dict[str, Any]]:
    """Every message on ``subject`` in ``stream``, in stream order."""
    js = nc.jetstream(timeout=10)
    expected = await subject_count(nc, stream, subject)
    if not expected:
        return []
    sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    got: list[dict[str, Any]] = []
    try:
        while len(got) < expected:
            got.extend(orjson.loads(m.data) for m in await sub.fetch(min(500, expected - len(got)), timeout=10))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return got


async def db_rows(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            return [tuple(r) for r in (await conn.execute(text(sql))).all()]
    finally:
        await engine.dispose()


@dataclass
class Load:
    """N requests: marketing creates them, routing routes them to IT, IT publishes its burst back to back."""

    rids: list[str]
    created: dict[str, dict[str, Any]] = field(default_factory=dict)
    bursts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def of(cls, n: int) -> Load:
        load = cls([new_rid() for _ in range(n)])
        load.created = {rid: created(rid) for rid in load.rids}
        load.bursts = {rid: holder_burst(rid) for rid in load.rids}
        return load

    @property
    def total(self) -> int:
        return EVENTS_PER_REQUEST * len(self.rids)

    def burst_events(self, rids: list[str]) -> list[dict[str, Any]]:
        """Request after request, each request's events adjacent in the stream (where a reorder would bite)."""
        return [e for rid in rids for e in self.bursts[rid]]


async def check_exactly_once(nc: NATS, load: Load, databases: dict[str, str]) -> dict[str, int]:
    """Every assertion of "each event processed exactly once, in each publisher's order". Returns counts."""
    # 1. The canonical log: per request, sequences 1..7, in the order its publishers published.
    log = await read_all(nc, STREAM_EVENTS, "baton.events.>")
    ids = Counter(e["event_id"] for e in log)
    assert not [i for i, n in ids.items() if n > 1], "an event is in the canonical log twice"
    by_request: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in log:
        by_request[event["request_id"]].append(event)
    assert set(by_request) == set(load.rids)
    for rid in load.rids:
        events = sorted(by_request[rid], key=lambda e: e["sequence"])
        assert [e["sequence"] for e in events] == list(range(1, EVENTS_PER_REQUEST + 1)), rid
        published = [load.created[rid]["event_id"], "<routed>", *(e["event_id"] for e in load.bursts[rid])]
        applied = [e["event_id"] if e["type"] != "routed" else "<routed>" for e in events]
        assert applied == published, f"{rid}: canonical order {[e['type'] for e in events]}"
    assert len(log) == load.total

    # 2. Nothing refused, nothing dead-lettered, by any service.
    assert await subject_count(nc, STREAM_NOTIFY, "baton.notify.*.rejected") == 0
    assert await subject_count(nc, STREAM_DLQ, "baton.dlq.>") == 0
    assert await db_rows(databases["intake"], "SELECT count(*) FROM rejections") == [(0,)]
    assert await db_rows(databases["intake"], "SELECT count(*) FROM events") == [(load.total,)]

    # 3. Notifications: exactly once per recipient per event, each department's stream in sequence order.
    notices = await read_all(nc, STREAM_NOTIFY, "baton.notify.>")
    per_recipient = Counter((n["event"]["event_id"], n["department"]) for n in notices)
    assert not [k for k, n in per_recipient.items() if n > 1], "a department was notified twice of one event"
    decided = {r[0] for r in await db_rows(databases["notifier"], "SELECT notification_id FROM outbox")}
    assert {n["notification_id"] for n in notices} == decided
    seen: dict[tuple[str, str], int] = {}
    for n in notices:
        key = (n["department"], n["request_id"])
        assert n["sequence"] > seen.get(key, 0), f"{key}: notification out of sequence order"
        seen[key] = n["sequence"]
    delays = Counter(n["request_id"] for n in notices if n["department"] == "marketing" and n["type"] == "delayed")
    assert all(delays[rid] == 2 for rid in load.rids), "the requester hears of both delays of every request"
    assert await db_rows(databases["notifier"], "SELECT count(*) FROM processed_events") == [(load.total,)]

    # 4. Metrics: every event stored once, timelines in sequence order, every request's facts complete.
    rows = await db_rows(databases["metrics"], "SELECT request_id, sequence, event_id FROM events")
    assert len(rows) == load.total
    assert len({r[2] for r in rows}) == load.total
    for rid in load.rids:
        mine = sorted(r[1] for r in rows if r[0] == rid)
        assert mine == list(range(1, EVENTS_PER_REQUEST + 1)), rid
    facts = await db_rows(databases["metrics"], "SELECT state, count(*) FROM facts GROUP BY state")
    assert facts == [("resolved", len(load.rids))], f"facts by state: {facts}"

    # 5. Routing: every event followed once, one decision per request.
    assert await db_rows(databases["routing"], "SELECT count(*) FROM processed_events") == [(load.total,)]
    assert await db_rows(databases["routing"], "SELECT count(*) FROM routing_decisions") == [(len(load.rids),)]
    return {"canonical": len(log), "notifications": len(notices), "metrics_events": len(rows)}
