"""A canonical lifecycle (as intake would append it) for the metrics tests that go through a broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from libs.contracts import Accepted, Created, Delayed, LifecycleEvent, Resolved, Routed, dumps
from libs.contracts.subjects import event_subject

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def lifecycle(rid: str) -> list[LifecycleEvent]:
    """created(1) 09:00 -> routed(2) 09:10 -> accepted(3) 09:40 -> delayed(4) 11:00 -> resolved(5) +26h."""

    def env(kind: str, dept: str, minutes: float, seq: int) -> dict[str, Any]:
        return {
            "event_id": f"{rid}-{kind}",
            "request_id": rid,
            "occurred_at": at(minutes),
            "actor": {"department": dept, "person": "Ana" if dept == "marketing" else "Sam"},
            "sequence": seq,
            "recorded_at": at(minutes) + timedelta(seconds=2),
            "trace_id": TRACE,
        }

    return [
        Created(
            **env("c", "marketing", 0, 1),
            title="Laptop for new hire",
            category="laptop",
            priority="high",
            requester={"department": "marketing", "person": "Ana"},
            watchers=["finance"],
        ),
        Routed(
            **env("r", "baton", 10, 2),
            provider_department="it",
            rule="category:laptop",
            caused_by=f"{rid}-c",
            accept_by=at(60),
            resolve_by=at(24 * 60),
        ),
        Accepted(**env("a", "it", 40, 3), assignee="Sam", eta=at(20 * 60)),
        Delayed(**env("d", "it", 120, 4), reason="supplier backorder", new_eta=at(30 * 60)),
        Resolved(**env("z", "it", 26 * 60, 5), resolution="Laptop delivered", outcome="done"),
    ]


def subject_and_body(event: LifecycleEvent) -> tuple[str, bytes]:
    return event_subject(event.request_id, event.type), dumps(event)


#: The holds and segments ``lifecycle()`` must produce: (department, from, to) and (kind, department, seconds).
EXPECTED_HOLDS = [
    {"department": "marketing", "role": "requester", "from": "2026-11-24T09:00:00Z", "to": "2026-11-24T09:10:00Z"},
    {"department": "it", "role": "provider", "from": "2026-11-24T09:10:00Z", "to": "2026-11-25T11:00:00Z"},
]
EXPECTED_SEGMENTS = [
    ("waiting", None, 600.0),
    ("waiting", "it", 1800.0),
    ("working", "it", 4800.0),
    ("delayed", "it", 86400.0),
]
