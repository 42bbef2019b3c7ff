"""Webhook signing, payload formats, the retry schedule and digest building: pure functions."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from libs.contracts import Notification, Role
from services.notifier.digest import Held, build_digest
from services.notifier.domain import Delivery, Directory
from services.notifier.webhooks import Format, RetryPolicy, delivery_id, new_secret, render_body, sign, verify, wants
from tests.notifier_events import lifecycle, verify_signature

pytestmark = pytest.mark.unit

BODY = b'{"type":"delayed","text":"IT delayed it"}'


def test_signature_round_trip_and_the_documented_recipe_agree() -> None:
    secret = new_secret()
    now = int(time.time())
    header = sign(secret, now, BODY)
    assert header.startswith(f"t={now},v1=")
    assert verify(secret, header, BODY, now=now)
    assert verify_signature(secret, header, BODY)  # the docs' recipe, written independently
    assert not verify(secret, header, BODY + b" ", now=now)
    assert not verify("whsec_other", header, BODY, now=now)
    assert not verify(secret, header, BODY, now=now + 301)  # outside the replay window
    assert not verify(secret, "garbage", BODY, now=now)
    assert not verify(secret, f"t={now}", BODY, now=now)


def test_slack_format_is_the_sentence_and_baton_format_is_the_stored_bytes() -> None:
    assert render_body(Format.BATON, BODY) == BODY
    assert orjson.loads(render_body(Format.SLACK, BODY)) == {"text": "IT delayed it"}
    digest = orjson.dumps(
        {
            "type": "digest",
            "text": "Hourly digest",
            "requests": [{"request_id": "REQ-1", "title": "Laptop", "items": [{"text": "a"}, {"text": "b"}]}],
        }
    )
    assert orjson.loads(render_body(Format.SLACK, digest)) == {
        "text": "Hourly digest\n• Laptop (REQ-1)\n    - a\n    - b"
    }


def test_the_default_schedule_retries_for_at_least_an_hour() -> None:
    policy = RetryPolicy()
    schedule = policy.schedule()
    assert schedule[:8] == [5, 10, 20, 40, 80, 160, 320, 600]
    assert sum(schedule) >= 3600
    assert sum(schedule[:-1]) < 3600
    rng = random.Random(1)
    assert all(0.9 * 5 <= policy.delay(1, rng) <= 1.1 * 5 for _ in range(100))
    assert RetryPolicy(jitter=0).delay(30) == 600


@pytest.mark.parametrize(
    ("types", "kind", "digest_types", "expected"),
    [
        ((), "delayed", frozenset(), True),
        (("delayed",), "delayed", frozenset(), True),
        (("delayed",), "routed", frozenset(), False),
        (("digest",), "digest", frozenset({"routed"}), True),
        (("routed",), "digest", frozenset({"routed", "delayed"}), True),
        (("escalated",), "digest", frozenset({"routed"}), False),
    ],
)
def test_wants(types: tuple[str, ...], kind: str, digest_types: frozenset[str], expected: bool) -> None:
    assert wants(types, kind, digest_types) is expected


def test_delivery_ids_are_deterministic_per_subscription_and_notification() -> None:
    assert delivery_id("wh_1", "n-1") == delivery_id("wh_1", "n-1")
    assert delivery_id("wh_1", "n-1") != delivery_id("wh_2", "n-1")


def test_a_digest_groups_by_request_in_order() -> None:
    directory = Directory(None)
    now = datetime(2026, 11, 24, 10, 0, 5, tzinfo=UTC)
    held = []
    for index, rid in enumerate(["REQ-AAAAAAAA", "REQ-BBBBBBBB", "REQ-AAAAAAAA"]):
        event = lifecycle(rid)[2]
        note = Notification(
            notification_id=f"n-{index:08d}",
            department="it",
            role=Role.PROVIDER,
            request_id=rid,
            type=event.type,
            sequence=event.sequence,
            text=f"text {index}",
            title=f"title {rid}",
            event=event,
            created_at=now - timedelta(minutes=30 - index),
        )
        held.append(Held(note, note.created_at))
    window = (datetime(2026, 11, 24, 9, tzinfo=UTC), datetime(2026, 11, 24, 10, tzinfo=UTC))
    digest = build_digest("it", Delivery.HOURLY, window, held, directory, now)
    assert [r.request_id for r in digest.requests] == ["REQ-AAAAAAAA", "REQ-BBBBBBBB"]
    assert [[i.text for i in r.items] for r in digest.requests] == [["text 0", "text 2"], ["text 1"]]
    assert digest.text == "Hourly digest for it (Tue 24 Nov 09:00-10:00): 3 notifications on 2 requests"
    assert digest.lines()[1:3] == ["• title REQ-AAAAAAAA (REQ-AAAAAAAA)", "    - text 0"]
    again = build_digest("it", Delivery.HOURLY, window, list(reversed(held)), directory, now)
    assert again.notification_id == digest.notification_id  # the same notifications, the same id
    fewer = build_digest("it", Delivery.HOURLY, window, held[:2], directory, now)
    assert fewer.notification_id != digest.notification_id
