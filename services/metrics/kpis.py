"""KPIs, scorecards, trends and the service map: pure functions of the request facts, a window and "now".

Every number is defined in docs/metrics.md; in short, for a department ``D`` and a window
``[start, end)``:

* an event counts in the window when its ``occurred_at`` falls inside it;
* snapshot numbers (open work, backlog ages) are as of ``now``;
* times are wall-clock seconds; SLA clocks are judged by routing's deadlines and escalations
  (:mod:`services.metrics.facts`);
* medians are the usual median, p90 is the nearest-rank percentile; a ratio over nothing is None.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from libs.contracts.catalog import Catalog, parse_duration

from .facts import Clock, RequestFacts, Stint, accept_clock, resolve_clock

DAY = 86400.0
#: Backlog age buckets (upper bounds in days; the last one is open-ended).
AGE_BUCKETS: tuple[tuple[str, float], ...] = (("<1d", 1), ("1-3d", 3), ("3-7d", 7), (">7d", math.inf))
TREND_BUCKETS = 8
UNSPECIFIED = "unspecified"


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    @classmethod
    def ending(cls, end: datetime, length: timedelta) -> Window:
        end = end.astimezone(UTC)
        return cls(end - length, end)

    def __contains__(self, when: object) -> bool:
        return isinstance(when, datetime) and self.start <= when < self.end

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def split(self, parts: int) -> list[Window]:
        step = (self.end - self.start) / parts
        return [Window(self.start + step * i, self.start + step * (i + 1)) for i in range(parts)]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class Durations(_Out):
    count: int
    median_seconds: float | None
    p90_seconds: float | None


class SlaAttainment(_Out):
    met: int
    breached: int
    attainment: float | None = Field(description="met / (met + breached); None when no clock was settled.")


class Csat(_Out):
    count: int
    average: float | None = Field(description="Mean rating, 1-5.")
    satisfied_share: float | None = Field(description="Share of ratings 4 or 5.")


class ProviderKpis(_Out):
    received: int
    accepted: int
    resolved: int
    open: int
    backlog_age: dict[str, int]
    time_to_accept: Durations
    time_to_resolve: Durations
    sla_accept: SlaAttainment
    sla_resolve: SlaAttainment
    breaches_open: int = Field(description="Clocks of work it holds now that are already breached.")
    delays: int
    delays_per_request: float | None = Field(description="Delays on the holds it resolved in the window, per hold.")
    delay_reasons: dict[str, int]
    eta_reliability: float | None = Field(description="Share of resolutions on or before the last committed ETA.")
    eta_slips: int = Field(description="ETA moves (each delay moves the ETA later).")
    eta_slip_seconds: float = Field(description="Total time the ETAs moved by.")
    declines: int
    reassignments: int
    loops: int
    reopens: int
    reopen_rate: float | None
    csat: Csat


class RequesterKpis(_Out):
    raised: int
    open: int
    resolved: int
    time_waited: Durations
    wait_charged_to_requester_seconds: float
    wait_charged_to_requester_share: float | None


class Scorecard(_Out):
    department: str
    name: str
    kind: str = Field(description="internal, vendor, or unknown (not in the catalog).")
    provider: ProviderKpis
    requester: RequesterKpis


class WindowOut(_Out):
    start: datetime
    end: datetime
    seconds: float


class Scorecards(_Out):
    window: WindowOut
    computed_at: datetime
    departments: list[Scorecard]


class Edge(_Out):
    requester: str
    provider: str
    volume: int = Field(description="Handoffs from the requester's requests to the provider in the window.")
    resolved: int
    open: int
    met: int
    breached: int
    attainment: float | None
    health: str = Field(description="good (>= 90 %), fair (>= 75 %), poor, or none (no clock settled).")


class ServiceMap(_Out):
    window: WindowOut
    departments: list[str]
    edges: list[Edge]

    def edge(self, requester: str, provider: str) -> Edge | None:
        return next((e for e in self.edges if e.requester == requester and e.provider == provider), None)


class Trend(_Out):
    department: str
    received: list[int]
    resolved: list[int]
    attainment: list[float | None]


# --- helpers -------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def p90(values: Sequence[float]) -> float | None:
    """Nearest-rank 90th percentile: the smallest value with at least 90 % of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[max(math.ceil(0.9 * len(ordered)), 1) - 1])


def durations(values: Sequence[float]) -> Durations:
    return Durations(count=len(values), median_seconds=median(values), p90_seconds=p90(values))


def ratio(part: float, whole: float) -> float | None:
    return None if whole == 0 else part / whole


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())


def attainment(clocks: Iterable[Clock]) -> SlaAttainment:
    settled = list(clocks)
    breached = sum(1 for c in settled if c.breached)
    met = len(settled) - breached
    return SlaAttainment(met=met, breached=breached, attainment=ratio(met, met + breached))


def health(value: float | None) -> str:
    if value is None:
        return "none"
    return "good" if value >= 0.9 else "fair" if value >= 0.75 else "poor"


def stints_of(facts: Iterable[RequestFacts], department: str) -> list[tuple[RequestFacts, Stint]]:
    return [(f, s) for f in facts for s in f.stints if s.department == department]


def settled_clocks(
    pairs: Iterable[tuple[RequestFacts, Stint]], window: Window, now: datetime
) -> tuple[list[Clock], list[Clock]]:
    """The accept and resolve clocks settled (met or breached) inside the window."""
    accept: list[Clock] = []
    resolve: list[Clock] = []
    for _f, stint in pairs:
        a, r = accept_clock(stint, now), resolve_clock(stint, now)
        if a is not None and a.settled_at in window:
            accept.append(a)
        if r is not None and r.settled_at in window:
            resolve.append(r)
    return accept, resolve


def _delay_seconds(delay_at: datetime, until: datetime | None, stop: datetime) -> float:
    return _seconds(delay_at, min(until or stop, stop))


# --- scorecards ----------------------------------------------------------------------------
def provider_kpis(department: str, facts: Sequence[RequestFacts], window: Window, now: datetime) -> ProviderKpis:
    pairs = stints_of(facts, department)
    current = [(f, s) for f, s in pairs if s.end is None and f.open]
    resolved = [s for _f, s in pairs if s.end_kind == "resolved" and s.end in window]
    accepted = [s for _f, s in pairs if s.accepted_at in window]
    ages = Counter[str]()
    for _f, stint in current:
        age_days = _seconds(stint.start, now) / DAY
        ages[next(label for label, bound in AGE_BUCKETS if age_days < bound)] += 1
    accept, resolve = settled_clocks(pairs, window, now)
    breaches_open = 0
    for _f, stint in current:
        for clock in (accept_clock(stint, now), resolve_clock(stint, now)):
            breaches_open += int(clock is not None and clock.breached)
    delays = [d for _f, s in pairs for d in s.delays if d.at in window]
    reasons = Counter(d.reason_code or UNSPECIFIED for d in delays)
    with_eta = [s for s in resolved if s.eta is not None]
    on_time = sum(1 for s in with_eta if s.end is not None and s.eta is not None and s.end <= s.eta)
    slip = sum(_seconds(d.previous_eta, d.new_eta) for d in delays if d.previous_eta is not None)
    reopens = [r for f in facts for r in f.reopens if r.department == department and r.at in window]
    ratings = [
        f.feedback.rating
        for f in facts
        if f.feedback is not None and f.feedback.department == department and f.feedback.at in window
    ]
    return ProviderKpis(
        received=sum(1 for _f, s in pairs if s.start in window),
        accepted=len(accepted),
        resolved=len(resolved),
        open=len(current),
        backlog_age={label: ages[label] for label, _bound in AGE_BUCKETS},
        time_to_accept=durations([_seconds(s.start, s.accepted_at) for s in accepted if s.accepted_at]),
        time_to_resolve=durations([_seconds(s.start, s.end) for s in resolved if s.end]),
        sla_accept=attainment(accept),
        sla_resolve=attainment(resolve),
        breaches_open=breaches_open,
        delays=len(delays),
        delays_per_request=ratio(sum(len(s.delays) for s in resolved), len(resolved)),
        delay_reasons=dict(sorted(reasons.items())),
        eta_reliability=ratio(on_time, len(with_eta)),
        eta_slips=len(delays),
        eta_slip_seconds=slip,
        declines=sum(1 for f in facts for d in f.declines if d.department == department and d.at in window),
        reassignments=sum(1 for f, s in pairs if s.end_kind == "reassigned" and s.end in window),
        loops=sum(1 for f in facts for lp in f.loops if department in lp.chain and lp.at in window),
        reopens=len(reopens),
        reopen_rate=ratio(len(reopens), len(resolved)),
        csat=Csat(
            count=len(ratings),
            average=ratio(sum(ratings), len(ratings)),
            satisfied_share=ratio(sum(1 for r in ratings if r >= 4), len(ratings)),
        ),
    )


def requester_kpis(department: str, facts: Sequence[RequestFacts], window: Window, now: datetime) -> RequesterKpis:
    """As requester: what it raised, how long it waited, and how much of that wait it caused itself.

    The wait of a request is created -> latest resolution (requests resolved in the window). The wait
    charged to the requester is the time in ``waiting_on_requester`` delays before that resolution,
    each ending with the next event that moves the request on or the requester's answering comment
    (the same rule routing uses to pause and resume the holder's clock).
    """
    own = [f for f in facts if f.requester == department]
    done = [f for f in own if f.resolved_at in window and f.created_at is not None]
    waits: list[float] = []
    charged = 0.0
    for f in done:
        assert f.created_at is not None
        assert f.resolved_at is not None
        waits.append(_seconds(f.created_at, f.resolved_at))
        for stint in f.stints:
            for d in stint.delays:
                if d.reason_code == "waiting_on_requester" and d.at < f.resolved_at:
                    charged += _delay_seconds(d.at, d.answered_at or d.until, f.resolved_at)
    return RequesterKpis(
        raised=sum(1 for f in own if f.created_at in window),
        open=sum(1 for f in own if f.open),
        resolved=len(done),
        time_waited=durations(waits),
        wait_charged_to_requester_seconds=charged,
        wait_charged_to_requester_share=ratio(charged, sum(waits)),
    )


def known_departments(facts: Iterable[RequestFacts], catalog: Catalog | None) -> list[str]:
    seen: set[str] = set(catalog.slugs) if catalog is not None else set()
    for f in facts:
        seen |= f.departments()
    return sorted(seen)


def scorecards(
    facts: Sequence[RequestFacts], window: Window, now: datetime, catalog: Catalog | None = None
) -> Scorecards:
    cards = []
    for dept in known_departments(facts, catalog):
        entry = catalog.get(dept) if catalog is not None else None
        cards.append(
            Scorecard(
                department=dept,
                name=entry.name if entry is not None else dept,
                kind=entry.kind.value if entry is not None else "unknown",
                provider=provider_kpis(dept, facts, window, now),
                requester=requester_kpis(dept, facts, window, now),
            )
        )
    return Scorecards(window=window_out(window), computed_at=now, departments=cards)


def window_out(window: Window) -> WindowOut:
    return WindowOut(start=window.start, end=window.end, seconds=window.seconds)


def trends(
    facts: Sequence[RequestFacts], window: Window, now: datetime, departments: Iterable[str], parts: int = TREND_BUCKETS
) -> dict[str, Trend]:
    """Per department, the window cut into ``parts`` equal buckets: received, resolved, SLA attainment."""
    buckets = window.split(parts)
    out: dict[str, Trend] = {}
    for dept in departments:
        pairs = stints_of(facts, dept)
        received, resolved, reached = [], [], []
        for bucket in buckets:
            received.append(sum(1 for _f, s in pairs if s.start in bucket))
            resolved.append(sum(1 for _f, s in pairs if s.end_kind == "resolved" and s.end in bucket))
            accept, resolve = settled_clocks(pairs, bucket, now)
            reached.append(attainment(accept + resolve).attainment)
        out[dept] = Trend(department=dept, received=received, resolved=resolved, attainment=reached)
    return out


# --- the service map -----------------------------------------------------------------------
def service_map(
    facts: Sequence[RequestFacts], window: Window, now: datetime, catalog: Catalog | None = None
) -> ServiceMap:
    """Who serves whom: one edge per (requester, provider) with handoffs in the window.

    Volume counts handoffs (stints) that started in the window; open counts the provider's current
    holds as of now; SLA health is the attainment of both clocks settled in the window.
    """
    by_edge: dict[tuple[str, str], list[tuple[RequestFacts, Stint]]] = {}
    for f in facts:
        if f.requester is None:
            continue
        for stint in f.stints:
            by_edge.setdefault((f.requester, stint.department), []).append((f, stint))
    edges = []
    for (requester, provider), pairs in sorted(by_edge.items()):
        volume = sum(1 for _f, s in pairs if s.start in window)
        open_now = sum(1 for f, s in pairs if s.end is None and f.open)
        accept, resolve = settled_clocks(pairs, window, now)
        sla = attainment(accept + resolve)
        resolved = sum(1 for _f, s in pairs if s.end_kind == "resolved" and s.end in window)
        if volume or open_now or resolved or sla.met or sla.breached:
            edges.append(
                Edge(
                    requester=requester,
                    provider=provider,
                    volume=volume,
                    resolved=resolved,
                    open=open_now,
                    met=sla.met,
                    breached=sla.breached,
                    attainment=sla.attainment,
                    health=health(sla.attainment),
                )
            )
    return ServiceMap(window=window_out(window), departments=known_departments(facts, catalog), edges=edges)


# --- exports -------------------------------------------------------------------------------
CSV_COLUMNS: tuple[str, ...] = (
    "department",
    "name",
    "kind",
    "window_start",
    "window_end",
    "received",
    "accepted",
    "resolved",
    "open",
    *(f"backlog_{label}" for label, _bound in AGE_BUCKETS),
    "time_to_accept_median_s",
    "time_to_accept_p90_s",
    "time_to_resolve_median_s",
    "time_to_resolve_p90_s",
    "sla_accept_met",
    "sla_accept_breached",
    "sla_accept_attainment",
    "sla_resolve_met",
    "sla_resolve_breached",
    "sla_resolve_attainment",
    "breaches_open",
    "delays",
    "delays_per_request",
    "delay_reasons",
    "eta_reliability",
    "eta_slips",
    "eta_slip_s",
    "declines",
    "reassignments",
    "loops",
    "reopens",
    "reopen_rate",
    "csat_count",
    "csat_average",
    "csat_satisfied_share",
    "requests_raised",
    "requests_open_as_requester",
    "requests_resolved_as_requester",
    "time_waited_median_s",
    "time_waited_p90_s",
    "wait_charged_to_requester_s",
    "wait_charged_to_requester_share",
)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if not value.is_integer() else str(int(value))
    return str(value)


def csv_row(card: Scorecard, window: WindowOut) -> dict[str, str]:
    p, r = card.provider, card.requester
    values: list[Any] = [
        card.department,
        card.name,
        card.kind,
        window.start.isoformat(),
        window.end.isoformat(),
        p.received,
        p.accepted,
        p.resolved,
        p.open,
        *(p.backlog_age[label] for label, _bound in AGE_BUCKETS),
        p.time_to_accept.median_seconds,
        p.time_to_accept.p90_seconds,
        p.time_to_resolve.median_seconds,
        p.time_to_resolve.p90_seconds,
        p.sla_accept.met,
        p.sla_accept.breached,
        p.sla_accept.attainment,
        p.sla_resolve.met,
        p.sla_resolve.breached,
        p.sla_resolve.attainment,
        p.breaches_open,
        p.delays,
        p.delays_per_request,
        ";".join(f"{k}={v}" for k, v in p.delay_reasons.items()),
        p.eta_reliability,
        p.eta_slips,
        p.eta_slip_seconds,
        p.declines,
        p.reassignments,
        p.loops,
        p.reopens,
        p.reopen_rate,
        p.csat.count,
        p.csat.average,
        p.csat.satisfied_share,
        r.raised,
        r.open,
        r.resolved,
        r.time_waited.median_seconds,
        r.time_waited.p90_seconds,
        r.wait_charged_to_requester_seconds,
        r.wait_charged_to_requester_share,
    ]
    return dict(zip(CSV_COLUMNS, (_cell(v) for v in values), strict=True))


def to_csv(cards: Scorecards) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for card in cards.departments:
        writer.writerow(csv_row(card, cards.window))
    return out.getvalue()


def parse_window(text: str) -> timedelta:
    """``7d``, ``30d``, ``12h``, ``1d 12h``: a window length between one hour and 400 days."""
    length = parse_duration(text)
    if not timedelta(hours=1) <= length <= timedelta(days=400):
        raise ValueError("window must be between 1h and 400d")
    return length
