"""Geometry for the dashboard's inline SVG: sparklines and a request's swimlanes. Pure functions.

The templates only place what these functions computed; every label is plain text that the
templates escape (autoescape is on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .domain import Timeline
from .facts import RequestFacts, accept_clock, resolve_clock

LANE_HEIGHT = 34
LANE_GAP = 8
LABEL_WIDTH = 130
AXIS_HEIGHT = 26


def sparkline(values: list[float | None], width: float = 90, height: float = 20, pad: float = 2) -> list[str]:
    """SVG polyline ``points`` strings, one per run of known values (None breaks the line)."""
    known = [v for v in values if v is not None]
    if not known or len(values) < 2:
        return []
    low, high = min([*known, 0.0]), max(known)
    span = (high - low) or 1.0
    step = (width - 2 * pad) / (len(values) - 1)
    runs: list[str] = []
    current: list[str] = []
    for index, value in enumerate(values):
        if value is None:
            if len(current) > 1:
                runs.append(" ".join(current))
            elif len(current) == 1:
                x, y = (float(v) for v in current[0].split(","))
                runs.append(f"{x:.1f},{y:.1f} {x + 3:.1f},{y:.1f}")
            current = []
            continue
        x = pad + index * step
        y = height - pad - (value - low) / span * (height - 2 * pad)
        current.append(f"{x:.1f},{y:.1f}")
    if len(current) > 1:
        runs.append(" ".join(current))
    elif len(current) == 1:  # a lone value: a short dash, so it is seen
        x, y = (float(v) for v in current[0].split(","))
        runs.append(f"{x - 3:.1f},{y:.1f} {x:.1f},{y:.1f}")
    return runs


@dataclass(frozen=True)
class Bar:
    lane: int
    x: float
    width: float
    kind: str  # requester | waiting | working | delayed
    label: str


@dataclass(frozen=True)
class Marker:
    lane: int
    x: float
    kind: str  # delay | breach | deadline | resolved
    label: str


@dataclass
class Lanes:
    width: float
    height: float
    plot_x: float
    plot_width: float
    lanes: list[tuple[str, float]] = field(default_factory=list)  # (department, y of the lane's top)
    bars: list[Bar] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    ticks: list[tuple[float, str]] = field(default_factory=list)
    start: datetime | None = None
    end: datetime | None = None

    def lane_y(self, lane: int) -> float:
        return self.lanes[lane][1]


def _fmt(value: datetime) -> str:
    return value.strftime("%a %d %b %H:%M UTC")


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if days else f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"


def swimlanes(timeline: Timeline, facts: RequestFacts | None, now: datetime, width: float = 960) -> Lanes:
    """One lane per department that held the request (the requester first); bars for what the clock
    was doing (waiting, working, delayed), markers for delays, deadlines in range, breaches and the
    resolution."""
    order: list[str] = []
    for hold in timeline.holds:
        if hold.department not in order:
            order.append(hold.department)
    if timeline.requester_department and timeline.requester_department not in order:
        order.insert(0, timeline.requester_department)
    lanes = Lanes(width=width, height=0, plot_x=LABEL_WIDTH, plot_width=width - LABEL_WIDTH - 10)
    if not timeline.events:
        return lanes
    start = min(e.occurred_at for e in timeline.events)
    ends = [e.occurred_at for e in timeline.events]
    if timeline.state not in {"resolved", "closed", "returned"}:
        ends.append(now)
    end = max(ends)
    if end <= start:
        end = start + timedelta(minutes=1)
    lanes.start, lanes.end = start, end
    span = (end - start).total_seconds()

    def x(when: datetime) -> float:
        offset = (when - start).total_seconds() / span
        return round(lanes.plot_x + max(0.0, min(1.0, offset)) * lanes.plot_width, 1)

    def in_range(when: datetime | None) -> bool:
        return when is not None and start <= when <= end

    lanes.lanes = [(dept, AXIS_HEIGHT + i * (LANE_HEIGHT + LANE_GAP)) for i, dept in enumerate(order)]
    lanes.height = AXIS_HEIGHT + len(order) * (LANE_HEIGHT + LANE_GAP) + 6
    index = {dept: i for i, dept in enumerate(order)}
    requester_lane = index.get(timeline.requester_department or "", 0)

    for hold in timeline.holds:
        if hold.role.value == "requester":
            to = hold.to or now
            note = f" ({hold.note})" if hold.note else ""
            label = f"{hold.department} holds it as requester{note}: {_duration(hold.seconds)}"
            lanes.bars.append(
                Bar(index[hold.department], x(hold.from_), max(x(to) - x(hold.from_), 1.5), "requester", label)
            )
    for segment in timeline.segments:
        if segment.department is None:
            continue
        to = segment.to or now
        label = f"{segment.kind.value} — {segment.department}: {segment.note} ({_duration(segment.seconds)})"
        lane = index.get(segment.department, requester_lane)
        lanes.bars.append(Bar(lane, x(segment.from_), max(x(to) - x(segment.from_), 1.5), segment.kind.value, label))

    if facts is not None:
        for stint in facts.stints:
            if stint.department not in index:
                continue
            lane = index[stint.department]
            for delay in stint.delays:
                code = f" [{delay.reason_code}]" if delay.reason_code else ""
                lanes.markers.append(
                    Marker(
                        lane,
                        x(delay.at),
                        "delay",
                        f"delay by {stint.department}{code}: {delay.reason} — new ETA {_fmt(delay.new_eta)}",
                    )
                )
            for name, deadline in (
                ("accept by", stint.notice_accept_by or stint.accept_by),
                ("resolve by", stint.notice_resolve_by or stint.resolve_by),
            ):
                if deadline is not None and in_range(deadline):
                    lanes.markers.append(
                        Marker(lane, x(deadline), "deadline", f"{stint.department} {name} {_fmt(deadline)}")
                    )
            for clock in (accept_clock(stint, now), resolve_clock(stint, now)):
                if clock is not None and clock.breached and clock.settled_at is not None:
                    how = "escalated" if clock.escalated else "missed"
                    lanes.markers.append(
                        Marker(
                            lane,
                            x(clock.settled_at),
                            "breach",
                            f"SLA {clock.clock} {how} by {stint.department} at {_fmt(clock.settled_at)}",
                        )
                    )
            if stint.end_kind == "resolved" and stint.end is not None:
                lanes.markers.append(
                    Marker(lane, x(stint.end), "resolved", f"resolved by {stint.department} at {_fmt(stint.end)}")
                )

    if span <= 600:
        label_format = "%H:%M:%S"
    elif span <= 2 * 86400:
        label_format = "%a %H:%M"
    else:
        label_format = "%d %b %H:%M" if span <= 10 * 86400 else "%d %b"
    for i in range(6):
        when = start + timedelta(seconds=span * i / 5)
        lanes.ticks.append((x(when), when.strftime(label_format)))
    return lanes
