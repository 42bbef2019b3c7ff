"""Every KPI of the scripted scenario (tests/metrics_scenario.py) against a value computed by hand.

The hand computation is written next to each number: times are wall-clock seconds between the
events; SLA verdicts use routing's business-hour deadlines (``routed``), its notices and escalations.
"""

from __future__ import annotations

import csv
import io
import random

import pytest

from services.metrics.domain import build_timeline
from services.metrics.facts import RequestFacts, build_facts
from services.metrics.kpis import (
    Window,
    p90,
    parse_window,
    provider_kpis,
    requester_kpis,
    scorecards,
    service_map,
    to_csv,
    trends,
)
from tests.metrics_scenario import CATALOG, EVENTS, NOW, WINDOW, Request, d

pytestmark = pytest.mark.unit

H = 3600.0
FACTS = [build_facts(events) for events in EVENTS.values()]
W = Window.ending(NOW, WINDOW)


def test_window_is_thirty_days_back_from_now() -> None:
    assert (W.start, W.end) == (d(31, 12, month=10), NOW)
    assert parse_window("30d") == WINDOW
    with pytest.raises(ValueError, match="between"):
        parse_window("5m")


def test_it_as_provider() -> None:
    k = provider_kpis("it", FACTS, W, NOW)
    assert k.received == 5  # R1 R2 R3 R5 R6 (R0 was routed in October)
    assert k.accepted == 4  # R1 R2 R3 R5
    assert k.resolved == 2  # R1 R2
    assert k.open == 2  # R5 R6
    # R5 held since Thu 26 09:00 -> 4d 3h; R6 since Mon 30 08:00 -> 4h
    assert k.backlog_age == {"<1d": 1, "1-3d": 0, "3-7d": 1, ">7d": 0}
    # accept: R1 Fri 16:30 -> Mon 09:15 = 64h45m; R2 1h; R3 45m; R5 30m
    assert k.time_to_accept.count == 4
    assert k.time_to_accept.median_seconds == (0.75 * H + 1 * H) / 2
    assert k.time_to_accept.p90_seconds == 64.75 * H
    # resolve: R1 Fri 16:30 -> Mon 14:00 = 69h30m; R2 Mon 16 09:00 -> Thu 19 12:00 = 75h
    assert k.time_to_resolve.median_seconds == (69.5 * H + 75 * H) / 2
    assert k.time_to_resolve.p90_seconds == 75 * H
    # accept clocks: R1 met (09:15 <= business-hour deadline 09:30, although 64h wall-clock), R2 met,
    # R3 escalated, R5 met; R6 still running within its deadline
    assert (k.sla_accept.met, k.sla_accept.breached, k.sla_accept.attainment) == (3, 1, 0.75)
    # resolve clocks: R1 met; R2 resolved after the routed resolve_by but its clock was paused
    # (waiting_on_requester) and routing never escalated -> met; R5 missed resolve_by Fri 27 09:00
    # before its pausing delay at 10:00 -> breached; R3's clock closed with the reassignment, on time
    assert (k.sla_resolve.met, k.sla_resolve.breached) == (2, 1)
    assert k.sla_resolve.attainment == pytest.approx(2 / 3)
    assert k.breaches_open == 1  # R5's resolve clock
    assert k.delays == 3  # R2 twice, R5 once
    assert k.delay_reasons == {"capacity": 1, "waiting_on_requester": 1, "waiting_on_vendor": 1}
    assert k.delays_per_request == 1.0  # resolved holds R1 (0 delays) and R2 (2)
    assert k.eta_reliability == 1.0  # R1 14:00 <= ETA 15:00; R2 Thu 12:00 <= last ETA Thu 17:00
    assert k.eta_slips == 3
    assert k.eta_slip_seconds == 24 * H + 24 * H + 75 * H  # R2 +1d, +1d; R5 Fri 12:00 -> Mon 15:00
    assert (k.declines, k.reassignments, k.loops) == (0, 1, 1)
    assert (k.reopens, k.reopen_rate) == (0, 0.0)
    assert (k.csat.count, k.csat.average, k.csat.satisfied_share) == (1, 5.0, 1.0)  # R1


def test_the_vendor_gets_the_same_scorecard() -> None:
    k = provider_kpis("acme-it", FACTS, W, NOW)
    # R3 twice: handed over by it Tue 24 10:00, and again when hr reopened it Wed 25 12:00
    assert (k.received, k.accepted, k.resolved, k.open) == (2, 2, 2, 0)
    assert (k.time_to_accept.median_seconds, k.time_to_accept.p90_seconds) == (0.75 * H, 1 * H)  # 30m and 1h
    assert (k.time_to_resolve.median_seconds, k.time_to_resolve.p90_seconds) == (14 * H, 24 * H)  # 24h and 4h
    # the first hold met accept_by 11:00 (accepted 10:30) and was escalated on resolve at 18:00;
    # the reopened hold has no deadline (routing set none)
    assert (k.sla_accept.met, k.sla_accept.breached, k.sla_accept.attainment) == (1, 0, 1.0)
    assert (k.sla_resolve.met, k.sla_resolve.breached, k.sla_resolve.attainment) == (0, 1, 0.0)
    assert k.eta_reliability == 0.5  # Wed 10:00 after ETA Tue 16:00; Wed 16:00 before ETA 17:00
    assert (k.delays, k.delays_per_request, k.delay_reasons) == (0, 0.0, {})
    assert (k.loops, k.reopens, k.reopen_rate) == (1, 1, 0.5)
    assert (k.csat.count, k.csat.average, k.csat.satisfied_share) == (1, 2.0, 0.0)


def test_finance_declined_and_the_decline_answered_its_accept_clock() -> None:
    k = provider_kpis("finance", FACTS, W, NOW)
    assert (k.received, k.accepted, k.resolved, k.open, k.declines) == (1, 0, 0, 0, 1)
    assert (k.sla_accept.met, k.sla_accept.breached) == (1, 0)  # declined 11:00, deadline Thu 26 09:00
    assert k.sla_resolve.attainment is None
    assert k.time_to_accept.median_seconds is None
    assert (k.delays_per_request, k.eta_reliability, k.reopen_rate, k.csat.average) == (None, None, None, None)


def test_requesters() -> None:
    m = requester_kpis("marketing", FACTS, W, NOW)
    assert (m.raised, m.open, m.resolved) == (4, 1, 2)  # R1 R2 R4 R5; R5 open (R4 returned)
    assert (m.time_waited.median_seconds, m.time_waited.p90_seconds) == ((69.5 * H + 75 * H) / 2, 75 * H)
    # R2's waiting_on_requester delay: Wed 18 10:00 until marketing answered with a comment at 15:00
    # (routing resumes the clock then too) = 5 h, although the delay itself lasted until the resolution
    assert m.wait_charged_to_requester_seconds == 5 * H
    assert m.wait_charged_to_requester_share == pytest.approx(5 / (69.5 + 75))
    hr = requester_kpis("hr", FACTS, W, NOW)
    # R3 Tue 24 09:00 -> last resolution Wed 25 16:00 = 31 h; R6 open
    assert (hr.raised, hr.open, hr.resolved, hr.time_waited.median_seconds) == (2, 1, 1, 31 * H)
    assert (hr.wait_charged_to_requester_seconds, hr.wait_charged_to_requester_share) == (0.0, 0.0)


def test_scorecards_list_every_department_with_its_kind() -> None:
    cards = scorecards(FACTS, W, NOW, CATALOG)
    assert [(c.department, c.kind, c.name) for c in cards.departments] == [
        ("acme-it", "vendor", "ACME IT Services"),
        ("finance", "internal", "Finance"),
        ("hr", "internal", "Human Resources"),
        ("it", "internal", "IT Operations"),
        ("marketing", "internal", "Marketing"),
    ]
    assert cards.window.seconds == 30 * 86400


def test_service_map_edges() -> None:
    sm = service_map(FACTS, W, NOW, CATALOG)
    got = {(e.requester, e.provider): (e.volume, e.resolved, e.open, e.met, e.breached, e.health) for e in sm.edges}
    assert got == {
        # R1 R2 R5: accept met x3; resolve met (R1, R2), breached (R5) -> 5/6
        ("marketing", "it"): (3, 2, 1, 5, 1, "fair"),
        ("marketing", "finance"): (1, 0, 0, 1, 0, "good"),
        ("hr", "it"): (2, 0, 1, 0, 1, "poor"),  # R3 escalated on accept; R6 running
        ("hr", "acme-it"): (2, 2, 0, 1, 1, "poor"),
    }
    edge = sm.edge("marketing", "it")
    assert edge is not None
    assert edge.attainment == pytest.approx(5 / 6)


def test_trends_cut_the_window_into_buckets() -> None:
    # 5-day buckets starting Sat 31 Oct, Thu 5, Tue 10, Sun 15, Fri 20 and Wed 25 Nov, 12:00
    t = trends(FACTS, W, NOW, ["it"], parts=6)["it"]
    assert t.received == [0, 1, 0, 1, 1, 2]  # R1 Fri 6; R2 Mon 16; R3 Tue 24; R5 Thu 26, R6 Mon 30
    assert t.resolved == [0, 1, 0, 1, 0, 0]  # R1 Mon 9; R2 Thu 19
    # R1 both clocks met; R2 both met; R3 accept escalated; R5 accept met, resolve missed Fri 27
    assert t.attainment == [None, 1.0, None, 1.0, 0.0, 0.5]


def test_facts_do_not_depend_on_the_arrival_order_or_duplicates() -> None:
    rng = random.Random(7)
    for events in EVENTS.values():
        shuffled = events + events[: len(events) // 2]
        rng.shuffle(shuffled)
        assert build_facts(shuffled) == build_facts(events)


def test_a_gap_holds_back_everything_after_it() -> None:
    events = EVENTS["REQ-R2-PAUSE"]
    partial = build_facts(events[:2] + events[3:])
    assert (partial.derived_through, partial.last_sequence, partial.state) == (2, 7, "routed")
    assert provider_kpis("it", [partial], W, NOW).accepted == 0


def test_csv_export_has_one_row_per_department() -> None:
    rows = list(csv.DictReader(io.StringIO(to_csv(scorecards(FACTS, W, NOW, CATALOG)))))
    it = next(r for r in rows if r["department"] == "it")
    assert (it["received"], it["sla_accept_attainment"], it["time_to_accept_p90_s"]) == ("5", "0.75", "233100")
    assert it["delay_reasons"] == "capacity=1;waiting_on_requester=1;waiting_on_vendor=1"
    assert [r["department"] for r in rows] == ["acme-it", "finance", "hr", "it", "marketing"]


def test_p90_is_nearest_rank() -> None:
    assert p90([5.0]) == 5.0
    assert p90([float(i) for i in range(1, 11)]) == 9.0
    assert p90([float(i) for i in range(1, 12)]) == 10.0
    assert p90([]) is None


def test_the_timeline_carries_the_clocks_as_judged_here() -> None:
    r2 = build_timeline(EVENTS["REQ-R2-PAUSE"], NOW)
    assert r2.sla.resolve_breached is True  # the plain wall-clock comparison with routed.resolve_by ...
    assert [(c.clock, c.breached) for c in r2.sla_clocks] == [("accept", False), ("resolve", False)]  # ... paused
    r3 = build_timeline(EVENTS["REQ-R3-VENDR"], NOW)
    assert [(c.department, c.clock, c.breached, c.escalated) for c in r3.sla_clocks] == [
        ("it", "accept", True, True),
        ("acme-it", "accept", False, False),
        ("acme-it", "resolve", True, True),
    ]


def test_waits_follow_routings_rules() -> None:
    """A vendor wait pauses the clock only with someone to charge it to; only the requester's comment
    answers a waiting_on_requester delay."""

    def r(blocking: str | None, commenter: str) -> RequestFacts:
        req = Request("REQ-WAIT0001", "marketing").created(d(2, 9))
        req.routed(d(2, 9), "it", accept_by=d(2, 10), resolve_by=d(3, 9))
        req.add("accepted", "it", d(2, 9, 30), assignee="Sam", eta=d(3, 9))
        extra = {"blocking_department": blocking} if blocking else {}
        req.add("delayed", "it", d(2, 12), reason="part", reason_code="waiting_on_vendor", new_eta=d(4, 9), **extra)
        req.add("delayed", "it", d(2, 13), reason="cost centre?", reason_code="waiting_on_requester", new_eta=d(5, 9))
        req.add("commented", commenter, d(2, 14), comment="here it is")
        req.add("resolved", "it", d(4, 9), resolution="done", outcome="done")
        return build_facts(req.events)

    unblocked, blocked = r(None, "marketing"), r("acme-it", "marketing")
    assert unblocked.stints[0].paused_since == d(2, 13)  # the vendor wait did not pause; the requester's did
    assert blocked.stints[0].paused_since == d(2, 12)
    assert unblocked.stints[0].delays[1].answered_at == d(2, 14)
    assert r(None, "it").stints[0].delays[1].answered_at is None  # the holder's own comment answers nothing
    charged = requester_kpis("marketing", [unblocked], Window(d(1, 0), d(6, 0)), NOW)
    assert charged.wait_charged_to_requester_seconds == 1 * H
