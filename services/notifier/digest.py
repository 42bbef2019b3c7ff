"""Digests: many notifications of one department, delivered as one message grouped by request.

Pure: the digest model and how it is built and worded. :class:`DigestWorker` in
``services/notifier/workers.py`` decides *when* (the window closed) and publishes it.

A digest is published on ``baton.notify.<dept>.digest`` (``Nats-Msg-Id`` = ``digest_id``) and sent to
the department's webhooks. Its ``digest_id`` is a hash of the department, the period, the window end
and the notifications it holds, so building it again after a crash gives the same id and JetStream
keeps one copy.

Proposed for ``libs/contracts/notifications.py`` (v1, additive); until then this module is its source
of truth and docs/notifications.md documents it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from libs.contracts import Notification

from .domain import Delivery, Directory, when


class DigestItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    notification_id: str
    type: str
    role: str
    sequence: int | None = None
    text: str
    created_at: datetime


class DigestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    title: str
    items: list[DigestItem]


class Digest(BaseModel):
    """What a department receives on ``baton.notify.<dept>.digest``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    notification_id: str = Field(description="The digest id; also its Nats-Msg-Id.")
    department: str
    type: Literal["digest"] = "digest"
    period: Literal["hourly", "daily"]
    window_start: datetime
    window_end: datetime
    count: int = Field(description="How many notifications the digest lists.")
    text: str = Field(description="One line: what the digest covers.")
    requests: list[DigestRequest] = Field(description="The notifications, grouped by request, in order.")
    time_zone: str
    created_at: datetime

    def lines(self) -> list[str]:
        """The digest as text lines (chat webhooks, ``baton tail``)."""
        out = [self.text]
        for request in self.requests:
            out.append(f"• {request.title} ({request.request_id})")
            out.extend(f"    - {item.text}" for item in request.items)
        return out


@dataclass(frozen=True)
class Held:
    """A notification held for a digest (what the outbox row keeps)."""

    notification: Notification
    created_at: datetime


def digest_id(department: str, period: Delivery, window_end: datetime, notification_ids: Sequence[str]) -> str:
    material = f"{department}:{period.value}:{window_end.isoformat()}:{','.join(sorted(notification_ids))}"
    return "dg-" + hashlib.sha256(material.encode()).hexdigest()[:40]


def _range(start: datetime, end: datetime, zone: tzinfo) -> str:
    first = when(start, zone)
    last = end.astimezone(zone)
    return f"{first}-{last:%H:%M}" if start.astimezone(zone).date() == last.date() else f"{first} - {when(end, zone)}"


def build_digest(
    department: str,
    period: Delivery,
    window: tuple[datetime, datetime],
    held: Sequence[Held],
    directory: Directory,
    now: datetime,
) -> Digest:
    """One digest of ``held`` (already in order): grouped by request, in order of each request's first item."""
    groups: dict[str, DigestRequest] = {}
    for entry in held:
        note = entry.notification
        item = DigestItem(
            notification_id=note.notification_id,
            type=note.type,
            role=note.role.value,
            sequence=note.sequence,
            text=note.text,
            created_at=entry.created_at,
        )
        group = groups.get(note.request_id)
        if group is None:
            groups[note.request_id] = DigestRequest(request_id=note.request_id, title=note.title, items=[item])
        else:
            group.items.append(item)
    zone = directory.zone(department)
    count = len(held)
    label = "Hourly" if period is Delivery.HOURLY else "Daily"
    text = (
        f"{label} digest for {directory.name(department)} ({_range(window[0], window[1], zone)}): "
        f"{count} notification{'s' if count != 1 else ''} on {len(groups)} request{'s' if len(groups) != 1 else ''}"
    )
    return Digest(
        notification_id=digest_id(department, period, window[1], [h.notification.notification_id for h in held]),
        department=department,
        period="hourly" if period is Delivery.HOURLY else "daily",
        window_start=window[0],
        window_end=window[1],
        count=count,
        text=text,
        requests=list(groups.values()),
        time_zone=directory.zone_name(department),
        created_at=now,
    )
