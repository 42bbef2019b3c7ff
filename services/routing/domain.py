"""Routing's decisions: which department serves a request, why, and by when. Pure: no I/O, no FastStream.

The steps, first match wins (``choose``):

0. ``suggested``: only when re-routing after a ``declined``: the department the decliner suggested,
   when it is in the catalog, serves the request's category and has not declined already;
1. ``explicit-provider``: the request names a ``provider_department`` that is in the catalog
   and serves the request's category;
2. ``rule:<name>``: the first catalog rule (``rules:``, in order) whose conditions all hold:
   category, keywords in the title, attributes, priority, requesting department;
3. ``category:<category>``: the first department, in catalog order, whose ``categories``
   contain the request's category;
4. ``fallback``: the catalog's ``fallback_department`` (the triage department).

A department that already declined the request is never chosen again; when every step is
exhausted the request is returned to the requester (``returned``).

Deadlines (``accept_by`` / ``resolve_by``) are the handoff time plus the provider's SLA for the
request's priority, counted in the provider's *business time* (its hours, time zone and
holidays; see :mod:`services.routing.business_time`); a day of SLA is one working day of the
provider (:func:`business_amount`). No SLA for that priority means no deadline.

:func:`explain` returns every step with its outcome: what ``baton route --explain`` prints.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from libs.contracts import SYSTEM_DEPARTMENT, Actor, Catalog, Created, Department, Priority, Returned, Routed
from libs.contracts.catalog import RoutingRule
from libs.contracts.events import Escalated, HandoffLoopDetected, LoopPattern, SlaClock, SlaWarning

from .business_time import BusinessCalendar, NoBusinessTime

RULE_SUGGESTED = "suggested"
RULE_EXPLICIT = "explicit-provider"
RULE_FALLBACK = "fallback"
#: ``actor.person`` of every event routing emits (``actor.department`` is Baton's own).
ROUTING_PERSON = "routing"


def category_rule(category: str) -> str:
    return f"category:{category}"


def named_rule(name: str) -> str:
    return f"rule:{name}"


# --- the request as routing sees it ---------------------------------------------------------
@dataclass(frozen=True)
class RoutingRequest:
    """What the routing steps look at."""

    category: str
    title: str = ""
    priority: Priority = Priority.NORMAL
    requester: str | None = None
    requested_provider: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, created: Created) -> RoutingRequest:
        return cls(
            category=created.category,
            title=created.title,
            priority=created.priority,
            requester=created.requester.department,
            requested_provider=created.provider_department,
            attributes=dict(created.attributes),
        )


@dataclass(frozen=True)
class Step:
    """One routing step and what came of it."""

    name: str  # "suggested", "explicit-provider", "rule:<name>", "category", "fallback"
    outcome: str  # "chosen", "skipped" (did not apply or did not match), "not reached"
    detail: str
    department: str | None = None  # the department this step would pick


@dataclass(frozen=True)
class Choice:
    """The outcome of the routing steps: a department (or None: return it to the requester), and why."""

    department: Department | None
    rule: str
    reason: str
    steps: tuple[Step, ...]


# --- rule matching ------------------------------------------------------------------------------
@lru_cache(maxsize=1024)
def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in keyword.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def match_rule(rule: RoutingRule, request: RoutingRequest) -> tuple[bool, list[str]]:
    """Whether every condition of ``rule`` holds, and a phrase per condition saying why (or why not)."""
    when = rule.when
    notes: list[str] = []
    ok = True
    if when.categories:
        hit = request.category in when.categories
        ok &= hit
        notes.append(f"category '{request.category}' {'is' if hit else 'is not'} in [{', '.join(when.categories)}]")
    if when.title_keywords:
        found = next((k for k in when.title_keywords if _keyword_pattern(k).search(request.title)), None)
        ok &= found is not None
        notes.append(f"title has '{found}'" if found else f"title has none of [{', '.join(when.title_keywords)}]")
    for key, allowed in when.attributes.items():
        value = request.attributes.get(key)
        hit = value is not None and ("*" in allowed or value.casefold() in {a.casefold() for a in allowed})
        ok &= hit
        if value is None:
            notes.append(f"attribute {key} is missing")
        else:
            listed = ", ".join(allowed)
            notes.append(f"attribute {key} is {value!r}" + ("" if hit else f", not one of [{listed}]"))
    if when.priorities:
        hit = request.priority in when.priorities
        ok &= hit
        notes.append(f"priority {request.priority.value} {'is' if hit else 'is not'} in [{', '.join(when.priorities)}]")
    if when.requesters:
        hit = request.requester in when.requesters
        ok &= hit
        notes.append(
            f"requester {request.requester or '(none)'} {'is' if hit else 'is not'} in [{', '.join(when.requesters)}]"
        )
    return ok, notes


# --- the steps ------------------------------------------------------------------------------------
def choose(
    catalog: Catalog,
    request: RoutingRequest,
    *,
    excluded: frozenset[str] = frozenset(),
    suggested: str | None = None,
    suggested_by: str | None = None,
) -> Choice:
    """Run the routing steps; ``excluded`` departments (those that declined) are never chosen."""
    steps: list[Step] = []
    chosen: tuple[Department, str, str] | None = None
    why_not: list[str] = []  # what the reason says about steps that did not apply
    category = request.category

    def unavailable(slug: str) -> str | None:
        dept = catalog.get(slug)
        if slug in excluded:
            return f"{slug} already declined"
        if dept is None:
            return f"{slug} is not in the catalog"
        return None

    if suggested is not None:
        problem = unavailable(suggested)
        dept = catalog.get(suggested)
        if problem is None and dept is not None and category not in dept.categories:
            problem = f"{suggested} does not serve '{category}'"
        if problem is None and dept is not None:
            detail = f"{suggested_by or 'the decliner'} suggested {suggested}, which serves '{category}'"
            steps.append(Step(RULE_SUGGESTED, "chosen", detail, suggested))
            chosen = (dept, RULE_SUGGESTED, detail)
        else:
            steps.append(Step(RULE_SUGGESTED, "skipped", f"suggested {problem}", suggested))
            why_not.append(f"suggested {problem}")

    requested = request.requested_provider
    if chosen is not None:
        steps.append(Step(RULE_EXPLICIT, "not reached", "", requested))
    elif requested is None:
        steps.append(Step(RULE_EXPLICIT, "skipped", "no provider_department was requested"))
    else:
        problem = unavailable(requested)
        dept = catalog.get(requested)
        if problem is None and dept is not None and category not in dept.categories:
            problem = f"{requested} does not serve '{category}'"
        if problem is None and dept is not None:
            detail = f"{requested} was asked for and serves category '{category}'"
            steps.append(Step(RULE_EXPLICIT, "chosen", detail, requested))
            chosen = (dept, RULE_EXPLICIT, detail)
        else:
            if requested not in excluded and catalog.get(requested) is None:
                problem = f"requested provider {requested} is not in the catalog"
            steps.append(Step(RULE_EXPLICIT, "skipped", problem or "", requested))
            why_not.append(problem or "")

    for rule in catalog.rules:
        name = named_rule(rule.name)
        if chosen is not None:
            steps.append(Step(name, "not reached", "", rule.route_to))
            continue
        matched, notes = match_rule(rule, request)
        if not matched:
            steps.append(Step(name, "skipped", "; ".join(notes), rule.route_to))
            continue
        problem = unavailable(rule.route_to)
        target = catalog.get(rule.route_to)
        if problem is not None or target is None:
            steps.append(Step(name, "skipped", f"matched ({'; '.join(notes)}) but {problem}", rule.route_to))
            why_not.append(f"rule '{rule.name}' matched but {problem}")
            continue
        detail = f"rule '{rule.name}' matched: {'; '.join(notes)}"
        steps.append(Step(name, "chosen", detail, rule.route_to))
        chosen = (target, name, detail)

    if chosen is not None:
        steps.append(Step("category", "not reached", ""))
    else:
        serving = [d for d in catalog.departments if category in d.categories]
        available = [d for d in serving if d.slug not in excluded]
        if available:
            dept = available[0]
            detail = f"{dept.slug} serves category '{category}'"
            steps.append(Step("category", "chosen", detail, dept.slug))
            chosen = (dept, category_rule(category), detail)
        elif serving:
            detail = f"every department serving '{category}' already declined ({', '.join(d.slug for d in serving)})"
            steps.append(Step("category", "skipped", detail))
            why_not.append(detail)
        else:
            detail = f"no department serves '{category}'"
            steps.append(Step("category", "skipped", detail))
            why_not.append(detail)

    fallback = catalog.fallback_department
    if chosen is not None:
        steps.append(Step(RULE_FALLBACK, "not reached", "", fallback))
    else:
        fallback_dept = catalog.get(fallback)
        if fallback in excluded or fallback_dept is None:
            steps.append(Step(RULE_FALLBACK, "skipped", f"triage department {fallback} already declined", fallback))
        else:
            detail = f"fallback to triage department {fallback}"
            steps.append(Step(RULE_FALLBACK, "chosen", detail, fallback))
            chosen = (fallback_dept, RULE_FALLBACK, detail)

    lead = "; ".join(w for w in why_not if w)
    if chosen is None:
        reason = f"{lead}; no other department can take it" if lead else "no department can take it"
        return Choice(None, "returned", reason, tuple(steps))
    dept, rule_id, detail = chosen
    # The reason keeps what was tried and skipped, so the requester sees why an asked-for department lost.
    reason = f"{lead}; {detail}" if lead and rule_id not in (RULE_SUGGESTED, RULE_EXPLICIT) else detail
    return Choice(dept, rule_id, reason, tuple(steps))


def explain(catalog: Catalog, request: RoutingRequest) -> Choice:
    """The routing of a new request with every step's outcome (for ``baton route --explain``)."""
    return choose(catalog, request)


# --- SLA deadlines --------------------------------------------------------------------------------
def calendar_of(catalog: Catalog, slug: str) -> BusinessCalendar:
    """The department's business calendar; plain wall-clock time for a department no longer in the catalog."""
    department = catalog.get(slug)
    return BusinessCalendar.of(department) if department is not None else BusinessCalendar.around_the_clock()


def workday(department: Department) -> timedelta:
    """How long one working day of the department is: ``end - start``, or 24 h around the clock."""
    hours = department.business_hours
    if hours.always:
        return timedelta(days=1)
    return datetime.combine(datetime.min.date(), hours.end) - datetime.combine(datetime.min.date(), hours.start)


def business_amount(amount: timedelta, department: Department) -> timedelta:
    """An SLA duration as business time: each whole day is one *working day* of the department (so ``2d`` is two
    working days, ``1d 4h`` one working day and four working hours); hours and minutes are working hours and
    minutes. Durations are parsed to plain time spans, so ``24h`` counts as ``1d``."""
    days = amount.days
    return workday(department) * days + (amount - timedelta(days=days))


def sla_targets(department: Department | None, priority: Priority) -> tuple[timedelta, timedelta] | None:
    """``(accept_within, resolve_within)`` of the department for ``priority`` in its business time (see
    :func:`business_amount`); None when it has no SLA for that priority."""
    if department is None:
        return None
    target = department.sla.get(priority)
    if target is None:
        return None
    return business_amount(target.accept_within, department), business_amount(target.resolve_within, department)


def sla_deadlines(
    department: Department, priority: Priority, start: datetime
) -> tuple[datetime | None, datetime | None]:
    """``(accept_by, resolve_by)``: ``start`` plus the SLA for ``priority`` in the department's business time (UTC)."""
    targets = sla_targets(department, priority)
    if targets is None:
        return None, None
    calendar = BusinessCalendar.of(department)
    try:
        return calendar.add(start, targets[0]), calendar.add(start, targets[1])
    except NoBusinessTime:
        return None, None


# --- the events routing emits (deterministic ids: a redelivery produces the same event_id) ----------
def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]


def routed_event_id(caused_by: str) -> str:
    """Deterministic id of the ``routed`` event answering event ``caused_by`` (also its Nats-Msg-Id)."""
    return "rt-" + hashlib.sha256(caused_by.encode()).hexdigest()[:40]


def returned_event_id(caused_by: str) -> str:
    return "rtn-" + _digest(caused_by)


def clock_event_id(prefix: str, request_id: str, department: str, clock: SlaClock, episode: int) -> str:
    """``esc-`` / ``slw-`` ids: one per clock episode, whatever triggered it (timer or event)."""
    return f"{prefix}-" + _digest(request_id, department, clock.value, str(episode))


def loop_event_id(caused_by: str, pattern: LoopPattern) -> str:
    return "loop-" + _digest(caused_by, pattern.value)


def _actor() -> Actor:
    return Actor(department=SYSTEM_DEPARTMENT, person=ROUTING_PERSON)


def build_routed(
    request_id: str,
    caused_by: str,
    choice: Choice,
    now: datetime,
    *,
    priority: Priority,
    previous: str | None = None,
) -> Routed:
    """The ``routed`` event; deadlines counted from ``now`` (the handoff) in the provider's business time."""
    if choice.department is None:
        raise ValueError("a routed event needs a department")
    accept_by, resolve_by = sla_deadlines(choice.department, priority, now)
    return Routed(
        event_id=routed_event_id(caused_by),
        request_id=request_id,
        occurred_at=now.astimezone(UTC),
        actor=_actor(),
        caused_by=caused_by,
        provider_department=choice.department.slug,
        previous_department=previous,
        rule=choice.rule[:100],
        reason=choice.reason[:500],
        accept_by=accept_by,
        resolve_by=resolve_by,
    )


def build_returned(request_id: str, caused_by: str, reason: str, declined_by: list[str], now: datetime) -> Returned:
    return Returned(
        event_id=returned_event_id(caused_by),
        request_id=request_id,
        occurred_at=now.astimezone(UTC),
        actor=_actor(),
        reason=reason[:2000],
        declined_by=declined_by,
        caused_by=caused_by,
    )


def build_escalated(
    request_id: str,
    department: str,
    clock: SlaClock,
    episode: int,
    deadline: datetime,
    overdue: timedelta,
    now: datetime,
) -> Escalated:
    return Escalated(
        event_id=clock_event_id("esc", request_id, department, clock, episode),
        request_id=request_id,
        occurred_at=now.astimezone(UTC),
        actor=_actor(),
        clock=clock,
        department=department,
        deadline=deadline.astimezone(UTC),
        overdue_seconds=round(max(overdue.total_seconds(), 0.0), 3),
        episode=episode,
    )


def build_warning(
    request_id: str,
    department: str,
    clock: SlaClock,
    episode: int,
    deadline: datetime,
    fraction: float,
    remaining: timedelta,
    now: datetime,
) -> SlaWarning:
    return SlaWarning(
        event_id=clock_event_id("slw", request_id, department, clock, episode),
        request_id=request_id,
        occurred_at=now.astimezone(UTC),
        actor=_actor(),
        clock=clock,
        department=department,
        deadline=deadline.astimezone(UTC),
        fraction=fraction,
        remaining_seconds=round(max(remaining.total_seconds(), 0.0), 3),
        episode=episode,
    )


def build_loop(
    request_id: str, caused_by: str, pattern: LoopPattern, chain: list[str], detail: str, now: datetime
) -> HandoffLoopDetected:
    return HandoffLoopDetected(
        event_id=loop_event_id(caused_by, pattern),
        request_id=request_id,
        occurred_at=now.astimezone(UTC),
        actor=_actor(),
        pattern=pattern,
        chain=chain,
        detail=detail[:1000],
    )
