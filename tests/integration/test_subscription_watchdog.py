"""The stall watchdog (libs/contracts/watchdog.py) on a real nats-server, as the services wire it.

The stall seen on a cluster after a node kill (docs/architecture.md, "Clusters") is made on one server: the
server is told to forget the pull subscription's inbox (an UNSUB the client does not know about), so the
pull loop keeps fetching while no message reaches it, exactly what a stalled service looks like. The
watchdog must see messages waiting with nothing handled, restart the subscription, count it, and the
waiting event must then be handled. A subscription that keeps handling is left alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from libs.contracts.subjects import CONSUMER_INTAKE, CONSUMER_METRICS, STREAM_EVENTS, inbound_subject
from libs.contracts.watchdog import StallWatchdog
from services.intake.app import create_app as create_intake
from services.intake.settings import IntakeSettings
from services.metrics.app import create_app
from services.metrics.settings import MetricsSettings
from tests.intake_events import created, intake_settled, new_rid, publish
from tests.metrics_events import at, lifecycle, subject_and_body

pytestmark = pytest.mark.integration


@pytest.fixture
async def metrics_app(provisioned_nats: str, make_database_url: Callable[[str], str]) -> AsyncIterator[FastAPI]:
    settings = MetricsSettings(
        nats_url=provisioned_nats, database_url=make_database_url("metrics"), fetch_timeout=0.05, graceful_timeout=2
    )
    app = create_app(settings, clock=lambda: at(60))
    async with app.router.lifespan_context(app):
        yield app


async def drained(nc: NATS, within: float = 20.0) -> float:
    """Seconds until the metrics consumer has nothing pending or unacked (fails after ``within``)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        info = await nc.jetstream().consumer_info(STREAM_EVENTS, CONSUMER_METRICS)
        if not info.num_pending and not info.num_ack_pending:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"metrics consumer not drained within {within}s")


async def publish_event(nc: NATS, index: int) -> None:
    subject, body = subject_and_body(lifecycle("REQ-WATCHDOG1")[index])
    await nc.jetstream().publish(subject, body, stream=STREAM_EVENTS, headers={"Nats-Msg-Id": f"wd-{index}"})


def resubscriptions(app: FastAPI) -> float:
    registry: CollectorRegistry = app.state.registry
    value = registry.get_sample_value("baton_metrics_resubscriptions_total", {"consumer": CONSUMER_METRICS})
    return value or 0.0


async def test_a_stalled_subscription_is_restarted_and_a_live_one_is_not(
    metrics_app: FastAPI, provisioned_nats: str
) -> None:
    [watchdog] = metrics_app.state.watchdogs
    assert isinstance(watchdog, StallWatchdog)
    watchdog.stalled_after = 0.5
    nc = await nats.connect(provisioned_nats)
    try:
        # Live: the event is handled, the pull loop marks it, nothing waits: no restart.
        before = watchdog.last_alive
        await publish_event(nc, 0)
        await drained(nc)
        assert watchdog.last_alive > before, "the pull loop never marked a batch"
        await asyncio.sleep(0.6)
        assert not await watchdog.check()

        # A batch in hand (FastStream holds its subscriber's lock while a handler runs) is not a stall.
        broker = metrics_app.state.broker
        [sub] = broker.subscribers
        sub.lock.acquire()
        try:
            assert watchdog.busy()
        finally:
            sub.lock.release()
        assert not watchdog.busy()

        # Stalled: the server forgets the inbox; the pull loop goes on fetching into the void. Once in a full CI
        # run (1 in 4 runs at most, never alone in 12) the event still got through, no restart logged; the cause
        # is not known, so the stall is made again with the next event (at most 3 tries, each printed).
        tries: list[str] = []
        for index in (1, 2, 3):
            inbox: Any = sub.subscription._sub
            await broker.connection._send_command(b"UNSUB %d\r\n" % inbox._id)
            await broker.connection.flush()
            await publish_event(nc, index)
            await asyncio.sleep(1.0)
            info = await nc.jetstream().consumer_info(STREAM_EVENTS, CONSUMER_METRICS)
            tries.append(f"pending={info.num_pending} ack_pending={info.num_ack_pending} waiting={info.num_waiting}")
            if info.num_pending or info.num_ack_pending:
                break
        print(f"\nstall attempts: {tries}")
        assert info.num_pending or info.num_ack_pending, f"the stall was not reproduced: {tries}"

        assert await watchdog.check(), "a stalled subscription was not restarted"
        recovered = await drained(nc, within=60)  # an event lost in the void comes back after ack_wait
        assert resubscriptions(metrics_app) == 1.0
        assert watchdog.restarts == 1
        print(f"\nwatchdog: restarted a stalled subscription; its event handled {recovered:.1f}s later")
    finally:
        await nc.close()


async def test_intake_gate_restarts_its_stalled_subscription(
    provisioned_nats: str, make_database_url: Callable[[str], str], tmp_path: Path
) -> None:
    settings = IntakeSettings(
        nats_url=provisioned_nats,
        database_url=make_database_url("intake"),
        fetch_timeout=0.05,
        tokens_path=tmp_path / "tokens.yaml",
    )
    app = create_intake(settings)
    nc = await nats.connect(provisioned_nats)
    try:
        async with app.router.lifespan_context(app):
            gate = app.state.gate
            await wait_until(lambda: gate.is_open)
            [sub] = gate.consumer.subscribers
            await gate.consumer.connection._send_command(b"UNSUB %d\r\n" % sub.subscription._sub._id)
            await gate.consumer.connection.flush()
            await publish(nc, inbound_subject("marketing", "created"), created(new_rid()))
            watcher = asyncio.create_task(gate.watch(gate.consumer.connection, every=0.2, stalled_after=0.5))
            try:
                await intake_settled(nc, within=30)
            finally:
                watcher.cancel()
            registry: CollectorRegistry = app.state.registry
            restarted = registry.get_sample_value("baton_intake_resubscriptions_total", {"consumer": CONSUMER_INTAKE})
            assert (restarted or 0) >= 1
    finally:
        await nc.close()


async def wait_until(condition: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)
