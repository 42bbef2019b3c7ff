"""``baton route``: where would a request go, by which rule, and by when must it be accepted and resolved?

Reads the catalog file locally (no service, no NATS) and runs routing's own decision code
(:mod:`services.routing.domain`) on a sample request. ``--explain`` lists every step: the
explicit provider, each rule in order with why it matched or not, the category match and the
fallback.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer

from libs.contracts.catalog import Catalog, Department
from libs.contracts.catalog_file import CatalogError, load_catalog
from libs.contracts.events import Priority
from services.routing.domain import Choice, RoutingRequest, business_amount, explain, sla_deadlines


def _attributes(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="--attr")
        out[key] = value
    return out


def _when(at: str | None) -> datetime:
    if at is None:
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(at)
    except ValueError as exc:
        raise typer.BadParameter(f"{at!r} is not an ISO 8601 time", param_hint="--at") from exc
    if value.tzinfo is None:
        raise typer.BadParameter(f"{at!r} has no UTC offset (e.g. 2026-11-27T17:00:00+01:00)", param_hint="--at")
    return value


def _hours(department: Department) -> str:
    hours = department.business_hours
    if hours.always:
        text = "around the clock"
    else:
        text = f"{','.join(d.value for d in hours.days)} {hours.start:%H:%M}-{hours.end:%H:%M}"
    holidays = f", {len(department.holidays)} holidays" if department.holidays else ""
    return f"{text} {department.timezone}{holidays}"


def _span(seconds: float) -> str:
    minutes = round(seconds / 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def decision_document(catalog: Catalog, request: RoutingRequest, at: datetime) -> dict[str, Any]:
    """What ``baton route --json`` prints: the steps, the choice and the deadlines."""
    choice = explain(catalog, request)
    doc: dict[str, Any] = {
        "request": {
            "category": request.category,
            "title": request.title,
            "priority": request.priority.value,
            "requester": request.requester,
            "provider_department": request.requested_provider,
            "attributes": dict(request.attributes),
        },
        "steps": [
            {"step": s.name, "outcome": s.outcome, "department": s.department, "detail": s.detail} for s in choice.steps
        ],
        "provider_department": choice.department.slug if choice.department else None,
        "rule": choice.rule,
        "reason": choice.reason,
        "handoff_at": at.astimezone(UTC).isoformat(),
    }
    if choice.department is not None:
        accept_by, resolve_by = sla_deadlines(choice.department, request.priority, at)
        target = choice.department.sla.get(request.priority)
        doc["accept_by"] = accept_by.isoformat() if accept_by else None
        doc["resolve_by"] = resolve_by.isoformat() if resolve_by else None
        if target is not None:
            doc["accept_within_business_seconds"] = business_amount(
                target.accept_within, choice.department
            ).total_seconds()
            doc["resolve_within_business_seconds"] = business_amount(
                target.resolve_within, choice.department
            ).total_seconds()
    return doc


def _print(catalog: Catalog, request: RoutingRequest, choice: Choice, at: datetime, *, steps: bool) -> None:
    who = f" from {request.requester}" if request.requester else ""
    typer.echo(f"A {request.priority.value}-priority '{request.category}' request{who}: {request.title!r}")
    if request.attributes:
        typer.echo("  attributes: " + ", ".join(f"{k}={v}" for k, v in request.attributes.items()))
    if steps:
        width = max(len(s.name) for s in choice.steps)
        for number, step in enumerate(choice.steps, 1):
            colour = {"chosen": typer.colors.GREEN, "skipped": typer.colors.YELLOW}.get(step.outcome)
            outcome = typer.style(
                f"{step.outcome.upper() if step.outcome == 'chosen' else step.outcome:<11}", fg=colour
            )
            target = f" -> {step.department}" if step.department and step.outcome == "chosen" else ""
            typer.echo(f"  {number}. {step.name:<{width}}  {outcome} {step.detail}{target}".rstrip())
    dept = choice.department
    if dept is None:
        typer.secho(f"=> returned to the requester: {choice.reason}", bold=True)
        return
    typer.secho(f"=> {dept.slug} ({dept.name}, {dept.kind.value}) by {choice.rule}", bold=True)
    typer.echo(f"   reason: {choice.reason}")
    zone = ZoneInfo(dept.timezone)
    typer.echo(f"   handoff at {at.astimezone(zone):%a %d %b %Y %H:%M %Z}; business hours: {_hours(dept)}")
    sla = dept.sla.get(request.priority)
    if sla is None:
        typer.echo(f"   no SLA for {request.priority.value} priority at {dept.slug}: no deadlines")
        return
    accept_by, resolve_by = sla_deadlines(dept, request.priority, at)
    for label, deadline, within in (
        ("accept_by ", accept_by, sla.accept_within),
        ("resolve_by", resolve_by, sla.resolve_within),
    ):
        business = business_amount(within, dept).total_seconds()
        when = f"{deadline.astimezone(zone):%a %d %b %Y %H:%M %Z} ({deadline.isoformat()})" if deadline else "none"
        typer.echo(f"   {label} {when}: {_span(business)} of {dept.slug} business time")


def route(
    category: Annotated[str, typer.Option(help="The request's category, e.g. laptop.")],
    title: Annotated[str, typer.Option(help="The request's title (rules match keywords in it).")] = "",
    priority: Annotated[Priority, typer.Option(help="low, normal, high or urgent.")] = Priority.NORMAL,
    requester: Annotated[str | None, typer.Option(help="The requesting department.")] = None,
    provider: Annotated[str | None, typer.Option(help="An explicit provider_department.")] = None,
    attr: Annotated[list[str] | None, typer.Option("--attr", help="An attribute key=value (repeatable).")] = None,
    at: Annotated[str | None, typer.Option(help="Handoff time, ISO 8601 with offset (default: now).")] = None,
    catalog: Annotated[Path, typer.Option("--catalog", help="Department catalog (YAML).")] = Path(
        "deploy/catalog.yaml"
    ),
    explain_steps: Annotated[bool, typer.Option("--explain", help="Show every routing step and why.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decision as JSON.")] = False,
) -> None:
    """Which department a sample request would go to, by which rule and why, and its SLA deadlines."""
    try:
        loaded = load_catalog(catalog)
    except CatalogError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise SystemExit(2) from exc
    request = RoutingRequest(
        category=category,
        title=title,
        priority=priority,
        requester=requester,
        requested_provider=provider,
        attributes=_attributes(attr or []),
    )
    when = _when(at)
    if as_json:
        typer.echo(json.dumps(decision_document(loaded, request, when), indent=2))
        return
    _print(loaded, request, explain(loaded, request), when, steps=explain_steps)
