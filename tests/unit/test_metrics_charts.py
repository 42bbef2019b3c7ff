"""The dashboard's SVG geometry, post-mortem Markdown and the Prometheus change feed, from the scripted scenario."""

from __future__ import annotations

import pytest

from services.metrics.charts import sparkline, swimlanes
from services.metrics.domain import build_timeline
from services.metrics.facts import build_facts, changes
from services.metrics.postmortem import build_postmortem, md, reasons, to_markdown
from tests.metrics_scenario import EVENTS, NOW

pytestmark = pytest.mark.unit


def test_sparkline_scales_into_the_box_and_breaks_on_gaps() -> None:
    assert sparkline([0.0, 1.0, 2.0], width=10, height=10, pad=0) == ["0.0,10.0 5.0,5.0 10.0,0.0"]
    assert sparkline([1.0, None, 1.0, 1.0], width=30, height=10, pad=0) == ["0.0,0.0 3.0,0.0", "20.0,0.0 30.0,0.0"]
    assert sparkline([None, None]) == []
    assert sparkline([3.0]) == []


def test_swimlanes_of_the_vendor_request() -> None:
    events = EVENTS["REQ-R3-VENDR"]
    facts = build_facts(events)
    lanes = swimlanes(build_timeline(events, NOW), facts, NOW, width=1000)
    assert [name for name, _y in lanes.lanes] == ["hr", "it", "acme-it"]
    assert (lanes.start, lanes.end) == (events[0].occurred_at, events[-1].occurred_at)
    kinds = [(b.lane, b.kind) for b in lanes.bars]
    assert (0, "requester") in kinds
    assert (1, "working") in kinds
    assert (2, "working") in kinds
    breaches = [(m.lane, m.label) for m in lanes.markers if m.kind == "breach"]
    assert breaches == [
        (1, "SLA accept escalated by it at Tue 24 Nov 09:15 UTC"),
        (2, "SLA resolve escalated by acme-it at Tue 24 Nov 18:00 UTC"),
    ]
    assert all(lanes.plot_x <= b.x <= lanes.plot_x + lanes.plot_width for b in lanes.bars)
    assert len(lanes.ticks) == 6


def test_postmortem_markdown_escapes_user_text() -> None:
    assert md("a|b <i>*x*</i>\n#1") == r"a\|b \<i\>\*x\*\</i\> \#1"
    events = EVENTS["REQ-R2-PAUSE"]
    pm = build_postmortem(build_timeline(events, NOW), build_facts(events), NOW)
    assert pm is not None
    text = to_markdown(pm)
    assert "| 2026-11-18 10:00 UTC | it | need the cost centre | waiting_on_requester |" in text
    assert "delivered 1d 19h 00m after the first ETA, by the last one" in text
    assert reasons(build_facts(EVENTS["REQ-R1-WKEND"]), NOW) == []  # went well: no review
    assert reasons(build_facts(EVENTS["REQ-R5-OPEN1"]), NOW) == []  # not resolved yet


def test_changes_report_each_fact_once() -> None:
    events = EVENTS["REQ-R3-VENDR"]
    before = build_facts(events[:3])  # created, routed, escalated
    after = build_facts(events[:8])  # ... accepted, reassigned, loop, routed, accepted by the vendor
    change = changes(before, after)
    assert change.accepted == [("it", 2700.0), ("acme-it", 1800.0)]
    assert change.escalations == []
    assert changes(None, before).escalations == [("it", "accept")]
    assert changes(after, after) == changes(after, after).__class__([], [], [], [])
