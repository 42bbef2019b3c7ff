"""Bounded Prometheus labels for FastStream (libs/contracts/broker_metrics.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from libs.contracts.broker_metrics import BoundedSubjectLabels, bounded_labels, subject_family

pytestmark = pytest.mark.unit


def test_the_family_is_the_first_two_tokens() -> None:
    assert subject_family("baton.events.REQ-1.created") == "baton.events.>"
    assert subject_family("baton.timers.schedule.REQ-1.sla-warning") == "baton.timers.>"
    assert subject_family("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.BATON_EVENTS.routing") == "$JS.EVENT.>"
    assert subject_family("baton.events") == "baton.events"
    assert subject_family("") == ""


def test_consumed_messages_and_batches_and_publishes_are_labelled_by_family() -> None:
    provider = BoundedSubjectLabels()
    one = SimpleNamespace(subject="baton.in.it.created")
    assert provider.get_consume_attrs_from_message(SimpleNamespace(raw_message=one, body=b"abc")) == {
        "destination_name": "baton.in.>",
        "message_size": 3,
        "messages_count": 1,
    }
    batch = SimpleNamespace(raw_message=[one, one], body=b"abcdef")
    assert provider.get_consume_attrs_from_message(batch)["messages_count"] == 2
    publish = SimpleNamespace(destination="baton.notify.it.REQ-9.created")
    assert provider.get_publish_destination_name_from_cmd(publish) == "baton.notify.>"


def test_the_factory_skips_what_is_not_a_message() -> None:
    assert isinstance(bounded_labels(None), BoundedSubjectLabels)
    assert isinstance(bounded_labels([SimpleNamespace(subject="a.b.c")]), BoundedSubjectLabels)
    assert bounded_labels(SimpleNamespace(key="kv-entry")) is None
