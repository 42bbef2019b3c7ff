"""Events and stream helpers shared by intake's integration tests (NATS and HTTP)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from libs.contracts.subjects import CONSUMER_INTAKE, STREAM_IN

T0 = datetime.now(UTC).replace(microsecond=0)


def new_rid() -> str:
    return f"REQ-{uuid.uuid4().hex[:10].upper()}"


def env(event_type: str, rid: str, dept: str, minutes: int = 0, event_id: str | None = None) -> dict[str, Any]:
    return {
        "type": event_type,
        "event_id": event_id or f"evt-{uuid.uuid4().hex[:16]}",
        "request_id": rid,
        "occurred_at": (T0 + timedelta(minutes=minutes)).isoformat(),
        "actor": {"department": dept, "person": "someone"},
    }


def created(rid: str, dept: str = "marketing", **over: Any) -> dict[str, Any]:
    body = env("created", rid, dept) | {
        "title": "Laptop for new hire",
        "category": "laptop",
        "priority": "high",
        "requester": {"department": dept, "person": "Ana"},
    }
    return body | over


def routed(rid: str, to: str = "it") -> dict[str, Any]:
    return env("routed", rid, "baton", 1) | {"provider_department": to, "rule": "category:laptop", "caused_by": "x" * 8}


async def publish(nc: NATS, subject: str, body: dict[str, Any] | bytes, msg_id: str | None = None) -> None:
    """A JetStream publish; ``Nats-Msg-Id`` is the event's id unless another is given."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    if msg_id is None and isinstance(body, dict):
        msg_id = body.get("event_id")
    await nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": msg_id} if msg_id else None)


async def read_stream(nc: NATS, stream: str, subject: str, expect: int, within: float = 10.0) -> list[Any]:
    """Every message on ``subject`` in ``stream``, waiting until at least ``expect`` are there."""
    js = nc.jetstream()
    deadline = asyncio.get_running_loop().time() + within
    while True:
        sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        got: list[Any] = []
        try:
            while True:
                try:
                    got.extend(await sub.fetch(100, timeout=0.3))
                except TimeoutError:
                    break
        finally:
            await sub.unsubscribe()
        if len(got) >= expect or asyncio.get_running_loop().time() > deadline:
            return [orjson.loads(m.data) for m in got]
        await asyncio.sleep(0.1)


async def intake_settled(nc: NATS, within: float = 10.0) -> None:
    """Wait until intake has acked everything on ``BATON_IN`` (its effects are then all published)."""
    jsm = nc.jsm()
    deadline = asyncio.get_running_loop().time() + within
    while True:
        last = (await jsm.stream_info(STREAM_IN)).state.last_seq
        info = await jsm.consumer_info(STREAM_IN, CONSUMER_INTAKE)
        if info.ack_floor.stream_seq >= last and not info.num_ack_pending:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"intake did not settle within {within}s: {info}")
        await asyncio.sleep(0.05)
