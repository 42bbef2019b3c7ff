"""Routing's behaviour: which department serves a new request, why, and by when.

Pure functions, no I/O and no FastStream: everything here is unit-tested directly.

The rules, first match wins:

1. ``explicit-provider``: the request names a ``provider_department`` that is in the catalog
   and serves the request's category;
2. ``category:<category>``: the first department, in catalog order, whose ``categories``
   contain the request's category;
3. ``fallback``: the catalog's ``fallback_department`` (the triage department).

Deadlines (``accept_by`` / ``resolve_by``) are the request's ``occurred_at`` plus the
provider's SLA for the request's priority, counted in plain wall-clock time (UTC): the
provider's business hours, time zone and holidays are not applied yet. No SLA for that
priority means no deadline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from libs.contracts import SYSTEM_DEPARTMENT, Actor, Catalog, Created, Department, Priority, Routed

RULE_EXPLICIT = "explicit-provider"
RULE_FALLBACK = "fallback"
#: ``actor.person`` of every event routing emits (``actor.department`` is Baton's own).
ROUTING_PERSON = "routing"


def category_rule(category: str) -> str:
    return f"category:{category}"


@dataclass(frozen=True)
class Decision:
    """The outcome of routing one request."""

    provider_department: str
    rule: str
    reason: str
    accept_by: datetime | None
    resolve_by: datetime | None


def choose_provider(catalog: Catalog, category: str, requested: str | None) -> tuple[Department, str, str]:
    """The provider department, the rule id that chose it and a one-line human reason."""
    why_not_requested = ""
    if requested is not None:
        wanted = catalog.get(requested)
        if wanted is not None and category in wanted.categories:
            return wanted, RULE_EXPLICIT, f"{requested} was asked for and serves category '{category}'"
        if wanted is None:
            why_not_requested = f"requested provider {requested} is not in the catalog; "
        else:
            why_not_requested = f"{requested} does not serve '{category}'; "

    serving = next((d for d in catalog.departments if category in d.categories), None)
    if serving is not None:
        return serving, category_rule(category), f"{why_not_requested}{serving.slug} serves category '{category}'"

    fallback = catalog.get(catalog.fallback_department)
    if fallback is None:  # pragma: no cover - Catalog validation guarantees it exists
        raise ValueError(f"fallback_department {catalog.fallback_department!r} is not in the catalog")
    lead = why_not_requested or f"no department serves '{category}'; "
    return fallback, RULE_FALLBACK, f"{lead}fallback to triage department {fallback.slug}"


def sla_deadlines(
    department: Department, priority: Priority, start: datetime
) -> tuple[datetime | None, datetime | None]:
    """``(accept_by, resolve_by)``: ``start`` plus the department's SLA for ``priority``, wall-clock, in UTC."""
    target = department.sla.get(priority)
    if target is None:
        return None, None
    begin = start.astimezone(UTC)
    return begin + target.accept_within, begin + target.resolve_within


def decide(catalog: Catalog, created: Created) -> Decision:
    """Route a new request: provider, rule, reason and SLA deadlines (counted from ``created.occurred_at``)."""
    provider, rule, reason = choose_provider(catalog, created.category, created.provider_department)
    accept_by, resolve_by = sla_deadlines(provider, created.priority, created.occurred_at)
    return Decision(provider.slug, rule, reason, accept_by, resolve_by)


def routed_event_id(caused_by: str) -> str:
    """Deterministic id of the ``routed`` event answering event ``caused_by`` (also its Nats-Msg-Id)."""
    return "rt-" + hashlib.sha256(caused_by.encode()).hexdigest()[:40]


def build_routed(created: Created, decision: Decision, now: datetime) -> Routed:
    """The ``routed`` event routing publishes; intake stamps ``sequence``/``recorded_at``/``trace_id`` later."""
    return Routed(
        event_id=routed_event_id(created.event_id),
        request_id=created.request_id,
        occurred_at=now.astimezone(UTC),
        actor=Actor(department=SYSTEM_DEPARTMENT, person=ROUTING_PERSON),
        caused_by=created.event_id,
        provider_department=decision.provider_department,
        rule=decision.rule,
        reason=decision.reason,
        accept_by=decision.accept_by,
        resolve_by=decision.resolve_by,
    )
