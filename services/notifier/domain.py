"""Notifier's behaviour: the per-request projection, who hears what, and the sentence they read.

Pure functions, no I/O and no FastStream: everything here is unit-tested directly.

Who hears what (foundation table). Each cell is the role the department is told in;
"-" means it is not told::

    | event    | requester department | current holder      | every past holder | watchers |
    |----------|----------------------|---------------------|-------------------|----------|
    | created  | requester            | -                   | -                 | watcher  |
    | routed   | requester            | provider (new work) | -                 | -        |
    | accepted | requester            | provider            | -                 | -        |
    | delayed  | requester            | provider            | provider          | watcher  |
    | resolved | requester            | provider            | provider          | watcher  |

One event never produces two notifications for the same department: a department with
several roles hears once, in the strongest role (provider > requester > watcher).

Order: events of one request are applied strictly by their ``sequence`` (stamped by intake):
``sequence == last + 1`` is applied, ``sequence <= last`` was already applied (a redelivery:
its stored notifications are published again, never re-rendered), ``sequence > last + 1``
arrived before an earlier event and waits (:class:`Order`).

Times in a sentence are shown in the *recipient's* time zone (from the catalog; UTC when the
department is not in it), e.g. ``Tue 25 Nov 14:00``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from zoneinfo import ZoneInfo

from libs.contracts import SYSTEM_DEPARTMENT, Catalog, Notification, Role
from libs.contracts.events import Accepted, Created, Delayed, LifecycleEvent, Outcome, Resolved, Routed
from libs.contracts.subjects import event_subject

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_RANK = {Role.PROVIDER: 0, Role.REQUESTER: 1, Role.WATCHER: 2}
_OUTCOME_WORDS = {
    Outcome.DONE: "done",
    Outcome.DECLINED: "declined",
    Outcome.DUPLICATE: "duplicate",
    Outcome.WONT_FIX: "won't fix",
}
TITLE_LIMIT = 80
REASON_LIMIT = 200


# --- the projection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """What the notifier knows about one request (its own copy, built from the canonical log)."""

    request_id: str
    requester_department: str
    holder_department: str | None
    past_holders: tuple[str, ...]  # every department that ever held it, first holder first (incl. the current)
    watchers: tuple[str, ...]
    title: str
    eta: datetime | None
    delay_count: int
    last_sequence: int


@dataclass(frozen=True)
class Poison:
    """An event the notifier can never apply: it is dead-lettered with ``code`` (a DLQ subject token)."""

    code: str
    message: str


class Order(StrEnum):
    APPLY = "apply"  # the next event of the request
    ALREADY_APPLIED = "already_applied"  # a redelivery (or a copy) of an applied event
    GAP = "gap"  # an earlier event of the request has not been applied yet


def order(last_sequence: int, sequence: int) -> Order:
    """Where ``sequence`` stands against the last applied one (0 when the request is unknown)."""
    if sequence <= last_sequence:
        return Order.ALREADY_APPLIED
    if sequence == last_sequence + 1:
        return Order.APPLY
    return Order.GAP


def gap_delay(num_delivered: int, base: float, cap: float) -> float:
    """Redelivery delay of an out-of-order event: ``base`` doubled per earlier delivery, at most ``cap``."""
    return float(min(cap, base * 2 ** max(0, min(num_delivered - 1, 30))))


def check_event(event: LifecycleEvent, subject: str) -> Poison | None:
    """What makes a valid event unusable here: no sequence stamp, or a subject that does not match it."""
    if event.sequence is None:
        return Poison("unstamped_event", "canonical events carry a sequence; this one has none")
    expected = event_subject(event.request_id, event.type)
    if subject != expected:
        return Poison("subject_mismatch", f"event {event.event_id} belongs on {expected}, not {subject}")
    return None


def advance(before: Projection | None, event: LifecycleEvent) -> Projection | Poison:
    """The projection after ``event`` (which :func:`order` said to apply)."""
    sequence = event.sequence or 0
    if isinstance(event, Created):
        if before is not None:
            return Poison("unexpected_event", f"request {event.request_id} was already created")
        return Projection(
            request_id=event.request_id,
            requester_department=event.requester.department,
            holder_department=None,
            past_holders=(),
            watchers=tuple(dict.fromkeys(event.watchers)),
            title=event.title,
            eta=None,
            delay_count=0,
            last_sequence=sequence,
        )
    if before is None:
        return Poison("unexpected_event", f"the first event of request {event.request_id} is {event.type}, not created")
    nxt = replace(before, last_sequence=sequence)
    if isinstance(event, Routed):
        provider = event.provider_department
        past = before.past_holders if provider in before.past_holders else (*before.past_holders, provider)
        return replace(nxt, holder_department=provider, past_holders=past)
    if isinstance(event, Accepted):
        return replace(nxt, eta=event.eta)
    if isinstance(event, Delayed):
        return replace(nxt, eta=event.new_eta, delay_count=before.delay_count + 1)
    return nxt  # Resolved


# --- who hears what ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    department: str
    role: Role


def _merge(candidates: Iterable[tuple[str | None, Role]]) -> list[Recipient]:
    """One recipient per department, in the strongest role, in order of first mention."""
    best: dict[str, Role] = {}
    for department, role in candidates:
        if department is None or department == SYSTEM_DEPARTMENT:
            continue
        current = best.get(department)
        if current is None or _RANK[role] < _RANK[current]:
            best[department] = role
    return [Recipient(d, r) for d, r in best.items()]


def recipients(after: Projection, event: LifecycleEvent) -> list[Recipient]:
    """The departments told about ``event`` (see the table in the module docstring)."""
    requester = (after.requester_department, Role.REQUESTER)
    holder = (after.holder_department, Role.PROVIDER)
    watchers = [(w, Role.WATCHER) for w in after.watchers]
    if isinstance(event, Created):
        return _merge([requester, *watchers])
    if isinstance(event, Routed):
        return _merge([(event.provider_department, Role.PROVIDER), requester])
    if isinstance(event, Accepted):
        return _merge([requester, holder])
    # delayed, resolved
    return _merge([requester, holder, *[(d, Role.PROVIDER) for d in after.past_holders], *watchers])


# --- the sentence --------------------------------------------------------------------------------


class Directory:
    """Department display names and time zones from the catalog (slug and UTC when unknown)."""

    def __init__(self, catalog: Catalog | None) -> None:
        self._names: dict[str, str] = {}
        self._zones: dict[str, tzinfo] = {}
        for department in catalog.departments if catalog else ():
            self._names[department.slug] = department.name
            self._zones[department.slug] = ZoneInfo(department.timezone)

    def name(self, slug: str) -> str:
        return self._names.get(slug, slug)

    def zone(self, slug: str) -> tzinfo:
        return self._zones.get(slug, UTC)


def when(moment: datetime, zone: tzinfo) -> str:
    """``Tue 25 Nov 14:00`` in ``zone`` (English names whatever the process locale)."""
    local = moment.astimezone(zone)
    return f"{_WEEKDAYS[local.weekday()]} {local.day} {_MONTHS[local.month - 1]} {local:%H:%M}"


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, ..."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def clip(text: str, limit: int) -> str:
    """One line, at most ``limit`` characters (an ellipsis marks a cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _rule(rule: str) -> str:
    if rule.startswith("category:"):
        return f"category {rule.removeprefix('category:')}"
    if rule == "explicit-provider":
        return "as the requester asked"
    if rule == "fallback":
        return "fallback: no department serves its category"
    return f"rule {rule}"


def render(
    event: LifecycleEvent,
    before: Projection | None,
    after: Projection,
    recipient: Recipient,
    directory: Directory,
) -> str:
    """The one sentence ``recipient`` reads about ``event``: who did what, why, and when."""
    zone = directory.zone(recipient.department)
    name = directory.name
    what = f"'{clip(after.title, TITLE_LIMIT)}' ({event.request_id})"

    if isinstance(event, Created):
        requester = name(event.requester.department)
        if event.provider_department:
            text = f"{requester} raised {what} for {name(event.provider_department)}"
        else:
            text = f"{requester} raised {what} in category {event.category}"
        text += f" — priority {event.priority.value}"
        if event.due_by is not None:
            text += f", due by {when(event.due_by, zone)}"
        return text

    if isinstance(event, Routed):
        source = f"from {name(event.previous_department)} " if event.previous_department else ""
        text = f"{what} was routed {source}to {name(event.provider_department)} ({_rule(event.rule)})"
        if event.reason.strip():
            text += f": {clip(event.reason, REASON_LIMIT)}"
        if recipient.role is Role.PROVIDER:
            text = f"New work from {name(after.requester_department)}: {text}"
            if event.accept_by is not None:
                text += f" — accept by {when(event.accept_by, zone)}"
        return text

    actor = name(event.actor.department)
    if isinstance(event, Accepted):
        return f"{actor} accepted {what}: {clip(event.assignee, 100)} will deliver by {when(event.eta, zone)}"

    if isinstance(event, Delayed):
        reason = clip(event.reason, REASON_LIMIT)
        if event.blocking_department:
            reason += f" (waiting on {name(event.blocking_department)})"
        text = f"{actor} delayed {what}: {reason} — new ETA {when(event.new_eta, zone)}"
        if before is not None and before.eta is not None:
            text += f", was {when(before.eta, zone)}"
        return text + f" ({ordinal(after.delay_count)} delay)"

    assert isinstance(event, Resolved)
    return f"{actor} resolved {what}: {_OUTCOME_WORDS[event.outcome]} — {clip(event.resolution, REASON_LIMIT)}"


# --- putting it together -------------------------------------------------------------------------


def notification_id(event_id: str, department: str) -> str:
    """Deterministic, so that a republished notification is deduplicated by JetStream (Nats-Msg-Id)."""
    return "n-" + hashlib.sha256(f"{event_id}:{department}".encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Plan:
    projection: Projection
    notifications: tuple[Notification, ...]


def plan(before: Projection | None, event: LifecycleEvent, directory: Directory, now: datetime) -> Plan | Poison:
    """Apply ``event`` (the next one of its request) and write every notification it causes."""
    after = advance(before, event)
    if isinstance(after, Poison):
        return after
    notifications = tuple(
        Notification(
            notification_id=notification_id(event.event_id, r.department),
            department=r.department,
            role=r.role,
            request_id=event.request_id,
            type=event.type,
            sequence=event.sequence,
            text=render(event, before, after, r, directory),
            title=after.title,
            event=event,
            trace_id=event.trace_id,
            created_at=now,
        )
        for r in recipients(after, event)
    )
    return Plan(after, notifications)
