"""Reading the projection for the API and the dashboard, with the access rule applied.

Everything here reads the database and calls the pure modules (timeline, facts, KPIs, charts,
post-mortems); nothing here decides a number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from libs.contracts import parse_event
from libs.contracts.catalog import Catalog

from . import db
from .access import Viewer
from .domain import RequestSummary, Timeline, build_timeline, summary_of
from .facts import RequestFacts, accept_clock, resolve_clock
from .kpis import Scorecards, ServiceMap, Trend, Window, scorecards, service_map, trends
from .postmortem import PostMortem, build_postmortem


@dataclass(frozen=True)
class RequestView:
    timeline: Timeline
    facts: RequestFacts | None
    postmortem: PostMortem | None


@dataclass(frozen=True)
class BreachLine:
    request_id: str
    title: str | None
    clock: str
    deadline: datetime | None
    at: datetime | None
    escalated: bool
    visible: bool


@dataclass(frozen=True)
class FeedbackLine:
    request_id: str
    title: str | None
    at: datetime
    rating: int
    comment: str | None  # None when the viewer is not party to the request
    visible: bool


@dataclass(frozen=True)
class DepartmentView:
    department: str
    open_work: list[RequestFacts]
    hidden_open: int
    breaches: list[BreachLine]
    feedback: list[FeedbackLine]


class Reader:
    def __init__(self, database: db.Database, catalog: Callable[[], Catalog | None], clock: Callable[[], datetime]):
        self.db = database
        self.catalog = catalog
        self.clock = clock

    def window(self, length: timedelta) -> Window:
        return Window.ending(self.clock(), length)

    async def facts(self, window: Window) -> list[RequestFacts]:
        async with self.db.reading() as session:
            return await db.load_facts(session, since=window.start)

    async def scorecards(self, window: Window) -> tuple[Scorecards, dict[str, Trend], ServiceMap]:
        facts = await self.facts(window)
        now = self.clock()
        cards = scorecards(facts, window, now, self.catalog())
        return (
            cards,
            trends(facts, window, now, [c.department for c in cards.departments]),
            service_map(facts, window, now, self.catalog()),
        )

    async def can_see(self, viewer: Viewer, request_id: str) -> bool:
        if viewer.sees_everything:
            return True
        assert viewer.department is not None
        async with self.db.reading() as session:
            return await db.is_party(session, request_id, viewer.department)

    async def visible(self, viewer: Viewer, request_ids: list[str]) -> set[str]:
        if viewer.sees_everything:
            return set(request_ids)
        assert viewer.department is not None
        async with self.db.reading() as session:
            return await db.party_requests(session, viewer.department, request_ids)

    async def request(self, viewer: Viewer, request_id: str) -> RequestView | None:
        """The request as the viewer may see it; None when unknown *or* not visible (indistinguishable)."""
        if not await self.can_see(viewer, request_id):
            return None
        async with self.db.reading() as session:
            rows = await db.request_events(session, request_id)
            facts = await db.facts_of(session, request_id)
        if not rows:
            return None
        now = self.clock()
        line = build_timeline((parse_event(r.canonical) for r in rows), now)
        return RequestView(line, facts, build_postmortem(line, facts, now) if facts is not None else None)

    async def recent(self, viewer: Viewer, department: str | None, limit: int) -> list[RequestSummary]:
        party = None if viewer.sees_everything else viewer.department
        async with self.db.reading() as session:
            if party is not None and department is not None and department != party:
                ids = await db.recent_requests(session, department, 1000)
                ids = sorted(await db.party_requests(session, party, ids), key=ids.index)[:limit]
            else:
                ids = await db.recent_requests(session, department or party, limit)
            events = await db.events_of(session, ids)
        now = self.clock()
        return [summary_of(build_timeline((parse_event(r.canonical) for r in events[rid]), now)) for rid in ids]

    async def department(self, viewer: Viewer, department: str, window: Window) -> DepartmentView:
        facts = await self.facts(window)
        now = self.clock()
        visible = await self.visible(viewer, [f.request_id for f in facts])
        held = [f for f in facts if f.open and f.current is not None and f.current.department == department]
        open_work = sorted(
            (f for f in held if f.request_id in visible), key=lambda f: f.current.start if f.current else now
        )
        breaches: list[BreachLine] = []
        for f in facts:
            for stint in f.stints:
                if stint.department != department:
                    continue
                for clock in (accept_clock(stint, now), resolve_clock(stint, now)):
                    if clock is None or not clock.breached or clock.settled_at not in window:
                        continue
                    shown = f.request_id in visible
                    breaches.append(
                        BreachLine(
                            request_id=f.request_id,
                            title=f.title if shown else None,
                            clock=clock.clock,
                            deadline=clock.deadline,
                            at=clock.settled_at,
                            escalated=clock.escalated,
                            visible=shown,
                        )
                    )
        feedback = [
            FeedbackLine(
                request_id=f.request_id,
                title=f.title if f.request_id in visible else None,
                at=f.feedback.at,
                rating=f.feedback.rating,
                comment=f.feedback.comment if f.request_id in visible else None,
                visible=f.request_id in visible,
            )
            for f in facts
            if f.feedback is not None and f.feedback.department == department and f.feedback.at in window
        ]
        breaches.sort(key=lambda b: b.at or now, reverse=True)
        feedback.sort(key=lambda fb: fb.at, reverse=True)
        return DepartmentView(department, open_work, len(held) - len(open_work), breaches, feedback)

    async def live(self) -> dict[str, object]:
        """A cheap fingerprint of the projection: pages poll it and refresh when it changes."""
        async with self.db.reading() as session:
            count, last = await db.fingerprint(session)
        return {"events": count, "last_projected_at": last.isoformat() if last else None}
