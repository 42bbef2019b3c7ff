"""A scripted month of handoffs with known timestamps (a fake clock): the KPI tests compute every number
from it by hand (tests/unit/test_metrics_kpis.py), and the projection tests replay it through a broker.

All times are UTC, November 2026 (2 Nov is a Monday). ``NOW`` is Mon 30 Nov 12:00; the 30-day window
starts Sat 31 Oct 12:00. The ``accept_by``/``resolve_by`` deadlines are what routing computes in
business hours (IT: Mon-Fri 09:00-17:00 UTC in this scenario), so they are not wall-clock sums.

R0  marketing -> it       October: outside the window.
R1  marketing -> it       Fri 16:30, accepted Mon 09:15 (business-hour accept SLA met across the weekend).
R2  marketing -> it       two delays, the second ``waiting_on_requester`` (routing pauses the clock
                          until marketing answers with a comment): resolved after the routed
                          resolve_by without an escalation -> met.
R3  hr -> it -> acme-it   it escalated on accept, reassigned to the vendor (loop detected); the vendor
                          escalated on resolve, resolved, was reopened, resolved again; feedback 2/5.
R4  marketing -> finance  declined, returned to the requester.
R5  marketing -> it       open; accepted, missed resolve_by (no escalation yet), then a pausing delay.
R6  hr -> it              open, waiting for acceptance, within its deadline.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from libs.contracts import parse_event
from libs.contracts.catalog import Catalog
from libs.contracts.events import LifecycleEvent

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
WINDOW = timedelta(days=30)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"

CATALOG = Catalog.model_validate(
    {
        "fallback_department": "it",
        "departments": [
            {"slug": "it", "name": "IT Operations", "categories": ["laptop"]},
            {"slug": "acme-it", "name": "ACME IT Services", "kind": "vendor", "categories": ["hardware-repair"]},
            {"slug": "finance", "name": "Finance", "categories": ["invoice"]},
            {"slug": "marketing", "name": "Marketing"},
            {"slug": "hr", "name": "Human Resources"},
        ],
    }
)


def d(day: int, hour: int, minute: int = 0, month: int = 11) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


class Request:
    """Builds one request's canonical events, numbering the sequence as intake would."""

    def __init__(self, rid: str, requester: str) -> None:
        self.rid, self.requester = rid, requester
        self.events: list[LifecycleEvent] = []

    def add(self, kind: str, dept: str, when: datetime, **fields: Any) -> Request:
        seq = len(self.events) + 1
        doc = {
            "type": kind,
            "event_id": f"{self.rid}-{seq:02d}-{kind}"[:64],
            "request_id": self.rid,
            "occurred_at": when.isoformat(),
            "actor": {"department": dept, "person": "Routing" if dept == "baton" else f"{dept}-person"},
            "sequence": seq,
            "recorded_at": (when + timedelta(seconds=1)).isoformat(),
            "trace_id": TRACE,
            **{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in fields.items()},
        }
        self.events.append(parse_event(orjson.dumps(doc)))
        return self

    def created(self, when: datetime, priority: str = "normal", category: str = "laptop", **kw: Any) -> Request:
        requester = {"department": self.requester, "person": f"{self.requester}-person"}
        title = f"Request {self.rid} <b>&amp;</b>"  # user text with markup: pages must escape it
        return self.add(
            "created",
            self.requester,
            when,
            title=title,
            category=category,
            priority=priority,
            requester=requester,
            **kw,
        )

    def routed(self, when: datetime, to: str, accept_by: datetime, resolve_by: datetime, **kw: Any) -> Request:
        return self.add(
            "routed",
            "baton",
            when,
            provider_department=to,
            rule="category:test",
            caused_by=self.events[0].event_id,
            accept_by=accept_by,
            resolve_by=resolve_by,
            **kw,
        )


def build() -> dict[str, list[LifecycleEvent]]:
    r0 = Request("REQ-R0-OLD00", "marketing").created(d(1, 9, month=10))
    r0.routed(d(1, 9, month=10), "it", d(1, 10, month=10), d(2, 9, month=10))
    r0.add("accepted", "it", d(1, 10, month=10), assignee="Sam", eta=d(2, 9, month=10))
    r0.add("resolved", "it", d(2, 9, month=10), resolution="done", outcome="done")

    r1 = Request("REQ-R1-WKEND", "marketing").created(d(6, 16, 30), priority="high", watchers=["finance"])
    r1.routed(d(6, 16, 30), "it", accept_by=d(9, 9, 30), resolve_by=d(9, 16, 30))
    r1.add("accepted", "it", d(9, 9, 15), assignee="Sam", eta=d(9, 15))
    r1.add("resolved", "it", d(9, 14), resolution="Laptop delivered", outcome="done")
    r1.add("feedback", "marketing", d(9, 15), rating=5, comment="quick <script>alert(1)</script>")

    r2 = Request("REQ-R2-PAUSE", "marketing").created(d(16, 9))
    r2.routed(d(16, 9), "it", accept_by=d(16, 13), resolve_by=d(18, 17))
    r2.add("accepted", "it", d(16, 10), assignee="Sam", eta=d(17, 17))
    r2.add("delayed", "it", d(17, 12), reason="team at capacity", reason_code="capacity", new_eta=d(18, 17))
    r2.add(
        "delayed",
        "it",
        d(18, 10),
        reason="need the cost centre",
        reason_code="waiting_on_requester",
        new_eta=d(19, 17),
    )
    r2.add("commented", "marketing", d(18, 15), comment="cost centre is 4711")
    r2.add("resolved", "it", d(19, 12), resolution="done", outcome="done")

    r3 = Request("REQ-R3-VENDR", "hr").created(d(24, 9), priority="urgent")
    r3.routed(d(24, 9), "it", accept_by=d(24, 9, 15), resolve_by=d(24, 13))
    r3.add(
        "escalated", "baton", d(24, 9, 15), clock="accept", department="it", deadline=d(24, 9, 15), overdue_seconds=0
    )
    r3.add("accepted", "it", d(24, 9, 45), assignee="Sam", eta=d(24, 12))
    r3.add("reassigned", "it", d(24, 10), reason="hardware fault: vendor repair", to_department="acme-it")
    r3.add("handoff_loop_detected", "baton", d(24, 10), pattern="quick_reassign", chain=["it", "acme-it"])
    r3.routed(d(24, 10), "acme-it", accept_by=d(24, 11), resolve_by=d(24, 18), previous_department="it")
    r3.add("accepted", "acme-it", d(24, 10, 30), assignee="Raj", eta=d(24, 16))
    r3.add(
        "sla_warning",
        "baton",
        d(24, 16, 15),
        clock="resolve",
        department="acme-it",
        deadline=d(24, 18),
        fraction=0.75,
        remaining_seconds=6300,
    )
    r3.add(
        "escalated", "baton", d(24, 18), clock="resolve", department="acme-it", deadline=d(24, 18), overdue_seconds=0
    )
    r3.add("resolved", "acme-it", d(25, 10), resolution="screen replaced", outcome="done")
    r3.add("reopened", "hr", d(25, 12), reason="still flickering")
    r3.add("accepted", "acme-it", d(25, 13), assignee="Raj", eta=d(25, 17))
    r3.add("resolved", "acme-it", d(25, 16), resolution="cable replaced", outcome="done")
    r3.add("feedback", "hr", d(25, 17), rating=2, comment="took two tries")

    r4 = Request("REQ-R4-DECLN", "marketing").created(d(25, 9), category="invoice")
    r4.routed(d(25, 9), "finance", accept_by=d(26, 9), resolve_by=d(2, 9, month=12))
    r4.add("declined", "finance", d(25, 11), reason="not an invoice")
    r4.add(
        "returned",
        "baton",
        d(25, 11),
        reason="no other department serves it",
        declined_by=["finance"],
        caused_by="REQ-R4-DECLN-03-declined",
    )

    r5 = Request("REQ-R5-OPEN1", "marketing").created(d(26, 9), priority="high")
    r5.routed(d(26, 9), "it", accept_by=d(26, 10), resolve_by=d(27, 9))
    r5.add("accepted", "it", d(26, 9, 30), assignee="Sam", eta=d(27, 12))
    r5.add(
        "delayed",
        "it",
        d(27, 10),
        reason="waiting for the vendor's part",
        reason_code="waiting_on_vendor",
        blocking_department="acme-it",
        new_eta=d(30, 15),
    )

    r6 = Request("REQ-R6-OPEN2", "hr").created(d(30, 8), priority="low")
    r6.routed(d(30, 8), "it", accept_by=d(1, 8, month=12), resolve_by=d(10, 8, month=12))

    return {r.rid: r.events for r in (r0, r1, r2, r3, r4, r5, r6)}


EVENTS: dict[str, list[LifecycleEvent]] = build()
