"""How a batch's effects are split into waves (libs/contracts/publishing.py: ``waves``, ``dedupe``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from libs.contracts.events import SlaClock
from libs.contracts.publishing import Outgoing, dedupe, waves
from services.routing.handlers import RoutingProcessor
from services.routing.tracking import TimerKind, TimerSpec

pytestmark = pytest.mark.unit


def out(name: str, key: str) -> Outgoing:
    return Outgoing(f"s.{name}", name.encode(), name, "S", order_key=key)


def names(split: list[list[Outgoing]]) -> list[list[str]]:
    return [[item.msg_id for item in wave] for wave in split]


def test_each_wave_holds_the_next_message_of_every_key_in_first_appearance_order() -> None:
    items = [out("a1", "A"), out("b1", "B"), out("a2", "A"), out("c1", "C"), out("a3", "A"), out("b2", "B")]
    assert names(waves(items)) == [["a1", "b1", "c1"], ["a2", "b2"], ["a3"]]


def test_one_key_is_one_message_per_wave_in_list_order() -> None:
    items = [out(f"m{n}", "R") for n in range(4)]
    assert names(waves(items)) == [["m0"], ["m1"], ["m2"], ["m3"]]


def test_messages_without_a_key_share_the_empty_key() -> None:
    items = [out("x1", ""), out("r1", "R"), out("x2", "")]
    assert names(waves(items)) == [["x1", "r1"], ["x2"]]


def test_no_messages_no_waves() -> None:
    assert waves([]) == []


def test_every_message_is_in_exactly_one_wave() -> None:
    items = [out(f"m{n}", f"k{n % 3}") for n in range(10)]
    flat = [item for wave in waves(items) for item in wave]
    assert sorted(i.msg_id for i in flat) == sorted(i.msg_id for i in items)
    for wave in waves(items):
        keys = [item.order_key for item in wave]
        assert len(keys) == len(set(keys)), "two messages of one key in one wave"


def test_dedupe_keeps_the_first_of_each_id() -> None:
    items = [out("a", "A"), out("b", "B"), out("a", "A")]
    assert [i.msg_id for i in dedupe(items)] == ["a", "b"]


def test_a_batchs_timer_schedules_go_in_one_wave_each_keyed_by_its_subject() -> None:
    """Routing's schedules: one subject per clock and kind, no order among them (services/routing/handlers.py)."""
    due = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    specs = [
        TimerSpec(f"{rid}.it.{clock.value}.1", rid, "it", clock, 1, kind, due + timedelta(minutes=n))
        for n, (rid, clock, kind) in enumerate(
            (rid, clock, kind) for rid in ("REQ-00000001", "REQ-00000002") for clock in SlaClock for kind in TimerKind
        )
    ]
    items = [RoutingProcessor._schedule_item(spec, None) for spec in specs]
    assert len({item.subject for item in items}) == 8
    assert [len(wave) for wave in waves(items)] == [8]
