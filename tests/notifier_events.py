"""A canonical lifecycle (as intake appends it) and who must hear about it: for the notifier's broker tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from libs.contracts import Accepted, Created, Delayed, LifecycleEvent, Resolved, Routed, dumps
from libs.contracts.subjects import event_subject

#: Tue 24 Nov 2026, 09:00 UTC.
T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def lifecycle(rid: str) -> list[LifecycleEvent]:
    """Finance raises (Legal watches) -> routed to IT -> accepted -> delayed -> resolved; sequences 1..5."""

    def env(kind: str, dept: str, minutes: float, seq: int) -> dict[str, Any]:
        return {
            "event_id": f"{rid}-{kind}",
            "request_id": rid,
            "occurred_at": at(minutes),
            "actor": {"department": dept, "person": "Ana" if dept == "finance" else "Sam"},
            "sequence": seq,
            "recorded_at": at(minutes) + timedelta(seconds=1),
            "trace_id": TRACE,
        }

    return [
        Created(
            **env("c", "finance", 0, 1),
            title="Laptop for new hire",
            category="laptop",
            priority="high",
            requester={"department": "finance", "person": "Ana"},
            watchers=["legal"],
        ),
        Routed(**env("r", "baton", 1, 2), provider_department="it", rule="category:laptop", caused_by=f"{rid}-c"),
        Accepted(**env("a", "it", 30, 3), assignee="Sam", eta=at(8 * 60)),  # 17:00 UTC = 18:00 Paris
        Delayed(**env("d", "it", 120, 4), reason="supplier backorder", new_eta=at(29 * 60)),  # Wed 25 Nov 14:00 UTC
        Resolved(**env("z", "it", 26 * 60, 5), resolution="delivered to desk 4", outcome="done"),
    ]


def subject_and_body(event: LifecycleEvent) -> tuple[str, bytes]:
    return event_subject(event.request_id, event.type), dumps(event)


#: (type, role) each department must receive for ``lifecycle()``, in sequence order.
EXPECTED: dict[str, list[tuple[str, str]]] = {
    "finance": [
        ("created", "requester"),
        ("routed", "requester"),
        ("accepted", "requester"),
        ("delayed", "requester"),
        ("resolved", "requester"),
    ],
    "legal": [("created", "watcher"), ("delayed", "watcher"), ("resolved", "watcher")],
    "it": [("routed", "provider"), ("accepted", "provider"), ("delayed", "provider"), ("resolved", "provider")],
}

#: The delayed sentence as Legal (America/New_York) and IT (Europe/Paris) read it, with the example catalog.
DELAYED_TEXT = {
    "legal": "IT Operations delayed 'Laptop for new hire' ({rid}): supplier backorder — "
    "new ETA Wed 25 Nov 09:00, was Tue 24 Nov 12:00 (1st delay)",
    "it": "IT Operations delayed 'Laptop for new hire' ({rid}): supplier backorder — "
    "new ETA Wed 25 Nov 15:00, was Tue 24 Nov 18:00 (1st delay)",
}
