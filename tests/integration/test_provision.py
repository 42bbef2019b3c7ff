"""Provisioning against a real nats-server: streams, consumers, idempotence, drift repair, dedupe."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, DeliverPolicy, StorageType

from baton.natsserver import NatsServer
from baton.provision import (
    Action,
    ProvisionError,
    check_consumer_spec,
    consumer_config,
    consumer_specs,
    ensure_consumer,
    provision,
)
from libs.contracts.catalog import Catalog
from libs.contracts.subjects import (
    SERVICE_CONSUMERS,
    STREAM_EVENTS,
    STREAM_IN,
    STREAM_NOTIFY,
    STREAMS,
    department_consumer,
    department_consumer_spec,
    inbound_subject,
    notify_filter,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(provisioned_nats: str) -> AsyncIterator[NATS]:
    client = await nats.connect(provisioned_nats)
    yield client
    await client.close()


async def test_streams_have_their_spec(nc: NATS) -> None:
    jsm = nc.jsm()
    for spec in STREAMS:
        config = (await jsm.stream_info(spec.name)).config
        assert config.subjects == list(spec.subjects)
        assert config.duplicate_window == pytest.approx(spec.duplicate_window_seconds)
        assert config.max_age == pytest.approx(spec.max_age_seconds)
        assert config.max_msg_size == spec.max_msg_size
        assert config.deny_delete is spec.deny_delete
        assert config.storage == StorageType.FILE
        assert config.num_replicas == 1
        assert config.allow_msg_schedules is (True if spec.allow_msg_schedules else None)
    assert {s.name for s in STREAMS} == {
        "BATON_IN",
        "BATON_EVENTS",
        "BATON_NOTIFY",
        "BATON_DLQ",
        "BATON_TIMERS",
        "BATON_ADVISORIES",
    }
    inbound = (await jsm.stream_info(STREAM_IN)).config
    assert inbound.duplicate_window is not None
    assert inbound.duplicate_window >= 600


async def test_consumers_exist_with_explicit_ack(nc: NATS, catalog: Catalog) -> None:
    jsm = nc.jsm()
    for spec in SERVICE_CONSUMERS:
        config = (await jsm.consumer_info(spec.stream, spec.durable)).config
        assert config.durable_name == spec.durable
        assert config.ack_policy == AckPolicy.EXPLICIT
        assert config.deliver_policy == DeliverPolicy.ALL
        assert config.max_deliver == spec.max_deliver
        assert (config.backoff or []) == list(spec.backoff_seconds)
        # JetStream replaces ack_wait by the first backoff step.
        expected_wait = spec.backoff_seconds[0] if spec.backoff_seconds else spec.ack_wait_seconds
        assert config.ack_wait == pytest.approx(expected_wait)
    on_notify = {info.name: info.config for info in await jsm.consumers_info(STREAM_NOTIFY)}
    assert set(on_notify) == {department_consumer(slug) for slug in catalog.slugs}
    for slug in catalog.slugs:
        config = on_notify[department_consumer(slug)]
        assert config.filter_subject == notify_filter(slug)
        assert config.ack_policy == AckPolicy.EXPLICIT
        assert config.max_deliver == -1
        assert not config.backoff


async def test_provision_twice_changes_nothing(provisioned_nats: str, catalog: Catalog) -> None:
    report = await provision(provisioned_nats, catalog)
    assert not report.changed
    assert report.created == []
    assert report.updated == []
    assert len(report.unchanged) == len(STREAMS) + len(consumer_specs(catalog)) + 1  # + the lease bucket
    assert report.unknown_consumers == []


async def test_first_run_reports_creations(nats_server: NatsServer, catalog: Catalog) -> None:
    report = await provision(nats_server.url, catalog, dry_run=True)
    assert len(report.created) == len(STREAMS) + len(consumer_specs(catalog)) + 1  # + the lease bucket
    async with await nats.connect(nats_server.url) as client:  # a dry run changes nothing
        assert await client.jsm().streams_info() == []
        report = await provision(client, catalog)
        assert "stream BATON_IN" in report.created
        assert f"consumer {STREAM_NOTIFY}/dept-acme-it" in report.created
        assert not client.is_closed  # a client passed in is left open
    assert "0 updated" in str(report)


async def test_drift_is_repaired_and_reported(nc: NATS, provisioned_nats: str, catalog: Catalog) -> None:
    jsm = nc.jsm()
    stream = (await jsm.stream_info(STREAM_EVENTS)).config
    stream.description = "edited by hand"
    stream.max_msg_size = 1024
    await jsm.update_stream(stream)
    await jsm.add_consumer(STREAM_EVENTS, consumer_config(replace(SERVICE_CONSUMERS[1], max_ack_pending=7)))

    report = await provision(provisioned_nats, catalog)

    updated = {i.name: i.changed for i in report.items if i.action is Action.UPDATED}
    assert updated == {STREAM_EVENTS: ("description", "max_msg_size"), "BATON_EVENTS/routing": ("max_ack_pending",)}
    assert (await jsm.stream_info(STREAM_EVENTS)).config.max_msg_size == 1 << 20
    assert (await jsm.consumer_info(STREAM_EVENTS, "routing")).config.max_ack_pending == 1000


async def test_new_department_gets_its_consumer_and_removed_ones_are_reported(
    nc: NATS, provisioned_nats: str, catalog: Catalog
) -> None:
    smaller = catalog.model_copy(update={"departments": [d for d in catalog.departments if d.slug != "legal"]})
    report = await provision(provisioned_nats, smaller)
    assert report.unknown_consumers == [f"{STREAM_NOTIFY}/dept-legal"]  # reported, not deleted
    assert (await nc.jsm().consumer_info(STREAM_NOTIFY, "dept-legal")).name == "dept-legal"


async def test_immutable_change_is_a_clear_error(nc: NATS) -> None:
    spec = department_consumer_spec("it")
    config = consumer_config(spec)
    config.deliver_policy = DeliverPolicy.NEW
    with pytest.raises(ProvisionError, match=r"consumer BATON_NOTIFY/dept-it.*deliver_policy.*can not be updated"):
        await ensure_consumer(nc.jsm(), spec.stream, config)


def test_backoff_longer_than_max_deliver_is_refused_before_any_call() -> None:
    spec = replace(SERVICE_CONSUMERS[0], max_deliver=3, backoff_seconds=(1.0, 2.0, 5.0, 10.0, 30.0))
    with pytest.raises(ProvisionError, match=r"consumer BATON_IN/intake: 5 backoff values but max_deliver=3"):
        check_consumer_spec(spec)


async def test_inbound_dedupes_on_msg_id(nc: NATS) -> None:
    js = nc.jetstream()
    subject = inbound_subject("it", "created")
    headers = {"Nats-Msg-Id": "evt-00000001"}
    first = await js.publish(subject, b'{"n": 1}', headers=headers, stream=STREAM_IN)
    second = await js.publish(subject, b'{"n": 2}', headers=headers, stream=STREAM_IN)
    assert first.duplicate is not True
    assert second.duplicate is True
    assert second.seq == first.seq
    assert (await nc.jsm().stream_info(STREAM_IN)).state.messages == 1
