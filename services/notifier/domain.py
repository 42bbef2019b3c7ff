"""Notifier's behaviour: the per-request projection, who hears what, and the sentence they read.

Pure functions, no I/O and no FastStream: everything here is unit-tested directly.

Who hears what. The parties of a request, after the event is applied:

* **requester**: the department that raised the request (role ``requester``);
* **holder**: the department holding it after the event (role ``provider``); for ``routed`` and
  ``reassigned`` that is the new holder (new work), for ``reopened`` and ``feedback`` the last holder;
* **old holder**: the department that held it just before the event: the decliner of
  ``declined``, the old holder of ``reassigned`` (role ``provider``);
* **clock owner**: the department whose SLA clock an ``sla_warning`` / ``escalated`` is about (``provider``);
* **past holders**: every department that ever held it, the current one included (``provider``);
* **watchers**: the departments listed in ``created.watchers`` (role ``watcher``);
* **other party**: for ``commented``, the requester and the holder except the commenter.

This table is :data:`WHO_HEARS` (docs/notifications.md shows the same, and a test keeps them equal)::

    | event                 | requester | holder | old holder | clock owner | past holders | watchers | other party |
    |-----------------------|-----------|--------|------------|-------------|--------------|----------|-------------|
    | created               | ✔         |        |            |             |              | ✔        |             |
    | routed                | ✔         | ✔      |            |             |              |          |             |
    | accepted              | ✔         | ✔      |            |             |              |          |             |
    | delayed               | ✔         | ✔      |            |             | ✔            | ✔        |             |
    | resolved              | ✔         | ✔      |            |             | ✔            | ✔        |             |
    | declined              | ✔         |        | ✔          |             |              |          |             |
    | reassigned            | ✔         | ✔      | ✔          |             |              |          |             |
    | reopened              | ✔         | ✔      |            |             |              |          |             |
    | feedback              | ✔         | ✔      |            |             |              |          |             |
    | commented             |           |        |            |             |              |          | ✔           |
    | returned              | ✔         |        |            |             |              | ✔        |             |
    | sla_warning           |           |        |            | ✔           |              |          |             |
    | escalated             | ✔         |        |            | ✔           |              |          |             |
    | handoff_loop_detected | ✔         | ✔      |            |             | ✔            | ✔        |             |

One event never produces two notifications for the same department: a department with
several roles hears once, in the strongest role (provider > requester > watcher).
``sla_warning`` and ``escalated`` are told once per breach episode: a repeat of the same
(type, clock, department, episode) advances the projection and tells nobody.

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
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from zoneinfo import ZoneInfo

from libs.contracts import SYSTEM_DEPARTMENT, Catalog, Notification, Role
from libs.contracts.events import (
    EVENT_MODELS,
    Accepted,
    Commented,
    Created,
    Declined,
    Delayed,
    Escalated,
    Feedback,
    HandoffLoopDetected,
    LifecycleEvent,
    Outcome,
    Reassigned,
    Reopened,
    Resolved,
    Returned,
    Routed,
    SlaClock,
    SlaWarning,
)
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
_CLOCK_WORDS = {SlaClock.ACCEPT: "accept", SlaClock.RESOLVE: "resolve"}
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
    reopen_count: int = 0
    #: SLA notices already told, as :func:`notice_key` (one notice per breach episode).
    notices: tuple[str, ...] = ()


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


def notice_key(event: SlaWarning | Escalated) -> str:
    """What makes two SLA notices "the same breach episode": type, clock, department and episode."""
    return f"{event.type}:{event.clock}:{event.department}:{event.episode}"


def is_repeat_notice(before: Projection | None, event: LifecycleEvent) -> bool:
    """An ``sla_warning`` / ``escalated`` for an episode that was already told (a timer tick repeating)."""
    return before is not None and isinstance(event, SlaWarning | Escalated) and notice_key(event) in before.notices


def _hold(before: Projection, department: str) -> tuple[str, ...]:
    return before.past_holders if department in before.past_holders else (*before.past_holders, department)


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
        return replace(nxt, holder_department=provider, past_holders=_hold(before, provider))
    if isinstance(event, Accepted):
        return replace(nxt, eta=event.eta)
    if isinstance(event, Delayed):
        return replace(nxt, eta=event.new_eta, delay_count=before.delay_count + 1)
    if isinstance(event, Declined | Returned):
        return replace(nxt, holder_department=None, eta=None)
    if isinstance(event, Reassigned):
        target = event.to_department
        return replace(nxt, holder_department=target, past_holders=_hold(before, target), eta=None)
    if isinstance(event, Reopened):
        return replace(nxt, eta=None, reopen_count=before.reopen_count + 1)
    if isinstance(event, SlaWarning | Escalated):
        key = notice_key(event)
        return nxt if key in before.notices else replace(nxt, notices=(*before.notices, key))
    return nxt  # resolved, feedback, commented, handoff_loop_detected: the parties do not change


# --- who hears what ------------------------------------------------------------------------------


class Party(StrEnum):
    """A way of being concerned by a request (the columns of the table in the module docstring)."""

    REQUESTER = "requester"
    HOLDER = "holder"
    PREVIOUS_HOLDER = "old holder"
    CLOCK_OWNER = "clock owner"
    PAST_HOLDERS = "past holders"
    WATCHERS = "watchers"
    OTHER_PARTY = "other party"


_R, _H, _PH, _CO, _PAST, _W, _OP = Party

#: Who hears each event type. Every event type of the contract has a row (a test checks it).
WHO_HEARS: dict[str, tuple[Party, ...]] = {
    "created": (_R, _W),
    "routed": (_H, _R),  # new work first
    "accepted": (_R, _H),
    "delayed": (_R, _H, _PAST, _W),
    "resolved": (_R, _H, _PAST, _W),
    "declined": (_R, _PH),
    "reassigned": (_R, _PH, _H),
    "reopened": (_R, _H),
    "feedback": (_R, _H),
    "commented": (_OP,),
    "returned": (_R, _W),
    "sla_warning": (_CO,),
    "escalated": (_R, _CO),
    "handoff_loop_detected": (_R, _H, _PAST, _W),
}
assert set(WHO_HEARS) == set(EVENT_MODELS), "every event type needs a row in WHO_HEARS"


def who_hears_table() -> str:
    """:data:`WHO_HEARS` as the Markdown table shown in the docs."""
    parties = list(Party)
    width = max(len(t) for t in WHO_HEARS)
    header = f"| {'event':<{width}} | " + " | ".join(p.value for p in parties) + " |"
    rule = f"|{'-' * (width + 2)}|" + "|".join("-" * (len(p.value) + 2) for p in parties) + "|"
    rows = [
        f"| {kind:<{width}} | " + " | ".join(f"{'✔' if p in heard else '':<{len(p.value)}}" for p in parties) + " |"
        for kind, heard in WHO_HEARS.items()
    ]
    return "\n".join([header, rule, *rows])


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


def _party(
    party: Party, before: Projection | None, after: Projection, event: LifecycleEvent
) -> list[tuple[str | None, Role]]:
    if party is Party.REQUESTER:
        return [(after.requester_department, Role.REQUESTER)]
    if party is Party.HOLDER:
        return [(after.holder_department, Role.PROVIDER)]
    if party is Party.PREVIOUS_HOLDER:
        return [(before.holder_department if before is not None else None, Role.PROVIDER)]
    if party is Party.CLOCK_OWNER:
        return [(event.department, Role.PROVIDER)] if isinstance(event, SlaWarning | Escalated) else []
    if party is Party.PAST_HOLDERS:
        return [(d, Role.PROVIDER) for d in after.past_holders]
    if party is Party.WATCHERS:
        return [(w, Role.WATCHER) for w in after.watchers]
    # the other party of a comment: requester and holder, except the commenter's own department
    others = [(after.requester_department, Role.REQUESTER), (after.holder_department, Role.PROVIDER)]
    return [(d, r) for d, r in others if d != event.actor.department]


def recipients(before: Projection | None, after: Projection, event: LifecycleEvent) -> list[Recipient]:
    """The departments told about ``event`` (see :data:`WHO_HEARS`), strongest role first, each once."""
    if is_repeat_notice(before, event):
        return []
    candidates = [c for party in WHO_HEARS[event.type] for c in _party(party, before, after, event)]
    return _merge(candidates)


# --- the sentence --------------------------------------------------------------------------------


class Directory:
    """Department display names and time zones from the catalog (slug and UTC when unknown)."""

    def __init__(self, catalog: Catalog | None) -> None:
        self._names: dict[str, str] = {}
        self._zones: dict[str, tzinfo] = {}
        self._zone_names: dict[str, str] = {}
        for department in catalog.departments if catalog else ():
            self._names[department.slug] = department.name
            self._zones[department.slug] = ZoneInfo(department.timezone)
            self._zone_names[department.slug] = department.timezone

    def name(self, slug: str) -> str:
        return self._names.get(slug, slug)

    def zone(self, slug: str) -> tzinfo:
        return self._zones.get(slug, UTC)

    def zone_name(self, slug: str) -> str:
        return self._zone_names.get(slug, "UTC")

    def __contains__(self, slug: object) -> bool:
        return slug in self._names


def when(moment: datetime, zone: tzinfo) -> str:
    """``Tue 25 Nov 14:00`` in ``zone`` (English names whatever the process locale)."""
    local = moment.astimezone(zone)
    return f"{_WEEKDAYS[local.weekday()]} {local.day} {_MONTHS[local.month - 1]} {local:%H:%M}"


def span(seconds: float) -> str:
    """A duration people read: ``45m``, ``1h 30m``, ``2d 4h`` (under a minute: ``<1m``)."""
    minutes = int(seconds // 60)
    if minutes < 1:
        return "<1m"
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {mins}m" if mins else f"{hours}h"
    return f"{mins}m"


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
    actor = name(event.actor.department)

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

    if isinstance(event, Resolved):
        return f"{actor} resolved {what}: {_OUTCOME_WORDS[event.outcome]} — {clip(event.resolution, REASON_LIMIT)}"

    if isinstance(event, Declined):
        text = f"{actor} declined {what}: {clip(event.reason, REASON_LIMIT)}"
        if event.suggested_department:
            text += f" — suggests {name(event.suggested_department)}"
        return text

    if isinstance(event, Reassigned):
        text = f"{actor} handed {what} to {name(event.to_department)}: {clip(event.reason, REASON_LIMIT)}"
        if recipient.department == event.to_department:
            text = f"New work from {actor}: {text} — please accept it"
        return text

    if isinstance(event, Reopened):
        holder = name(after.holder_department) if after.holder_department else "the last holder"
        text = f"{actor} reopened {what}: {clip(event.reason, REASON_LIMIT)} — {holder} must accept it again"
        return text + (f" ({ordinal(after.reopen_count)} reopening)" if after.reopen_count > 1 else "")

    if isinstance(event, Feedback):
        text = f"{actor} rated {what} {event.rating}/5"
        if event.comment.strip():
            text += f": {clip(event.comment, REASON_LIMIT)}"
        return text + " — request closed"

    if isinstance(event, Commented):
        person = clip(event.actor.person, 60)
        return f"{person} ({actor}) commented on {what}: {clip(event.comment, REASON_LIMIT)}"

    if isinstance(event, Returned):
        text = f"{what} was returned to {name(after.requester_department)}: {clip(event.reason, REASON_LIMIT)}"
        if event.declined_by:
            text += f" (declined by {', '.join(name(d) for d in event.declined_by)})"
        return text

    if isinstance(event, SlaWarning):
        clock = _CLOCK_WORDS[event.clock]
        return (
            f"{what}: {name(event.department)} has used {round(event.fraction * 100)}% of its time to {clock} — "
            f"deadline {when(event.deadline, zone)} ({span(event.remaining_seconds)} left)"
        )

    if isinstance(event, Escalated):
        clock = _CLOCK_WORDS[event.clock]
        text = (
            f"{what} is overdue: {name(event.department)} missed its {clock} deadline {when(event.deadline, zone)} "
            f"by {span(event.overdue_seconds)} — escalated"
        )
        return text + (f" ({ordinal(event.episode)} breach)" if event.episode > 1 else "")

    assert isinstance(event, HandoffLoopDetected)
    chain = " → ".join(name(d) for d in event.chain)
    text = f"{what} is being passed around ({event.pattern.value.replace('_', ' ')}): {chain}"
    if event.detail.strip():
        text += f" — {clip(event.detail, REASON_LIMIT)}"
    return text


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
    previous_eta = before.eta if isinstance(event, Delayed) and before is not None else None
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
            requester_department=after.requester_department,
            holder_department=after.holder_department,
            eta=after.eta,
            previous_eta=previous_eta,
            delay_count=after.delay_count,
            time_zone=directory.zone_name(r.department),
        )
        for r in recipients(before, after, event)
    )
    return Plan(after, notifications)


# --- digests -------------------------------------------------------------------------------------


class Delivery(StrEnum):
    """How a department receives one event type: at once, or collected into a digest."""

    IMMEDIATE = "immediate"
    HOURLY = "hourly"
    DAILY = "daily"


def digest_window(period: Delivery, moment: datetime, zone: tzinfo, daily_at: int = 8) -> tuple[datetime, datetime]:
    """The digest window (start, end] that ``moment`` falls in, in UTC.

    Hourly windows end on the hour; daily windows end at ``daily_at`` o'clock in the department's
    ``zone`` (so a daily digest arrives at the start of its working day, whatever the DST).
    """
    local = moment.astimezone(zone)
    if period is Delivery.HOURLY:
        start = local.replace(minute=0, second=0, microsecond=0)
        return start.astimezone(UTC), (start + timedelta(hours=1)).astimezone(UTC)
    if period is Delivery.DAILY:
        day = local.date() if local.hour >= daily_at else local.date() - timedelta(days=1)
        start = datetime(day.year, day.month, day.day, daily_at, tzinfo=zone)
        nxt = day + timedelta(days=1)
        end = datetime(nxt.year, nxt.month, nxt.day, daily_at, tzinfo=zone)
        return start.astimezone(UTC), end.astimezone(UTC)
    raise ValueError("immediate delivery has no digest window")
