"""The department catalog file format (YAML), shared by the services that read it.

The catalog is a public contract too: operators write it by hand. Parsing YAML
is left to the caller; this module validates the resulting data.
"""

from __future__ import annotations

import re
from datetime import date, time, timedelta
from enum import StrEnum
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, Field, StringConstraints, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .envelope import SYSTEM_DEPARTMENT, NonBlank, Slug, StrictModel
from .events import AttributeKey, AttributeValue, Category, Priority

_DURATION_RE = re.compile(r"^\s*(?:(\d+)d)?\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*$")


def parse_duration(value: str | int | float | timedelta) -> timedelta:
    """``"4h"``, ``"2d"``, ``"1d 4h 30m"`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    match = _DURATION_RE.fullmatch(value)
    if not match or not any(match.groups()):
        raise ValueError(f"{value!r} is not a duration like '4h', '2d' or '1d 4h 30m'")
    days, hours, minutes = (int(g) if g else 0 for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes)


def _zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {value!r}") from exc
    return value


Duration = Annotated[timedelta, Field(description="'4h', '2d', '1d 4h 30m' or seconds")]
TimeZoneName = Annotated[str, AfterValidator(_zone)]


class Kind(StrEnum):
    INTERNAL = "internal"
    VENDOR = "vendor"


class Weekday(StrEnum):
    MON = "mon"
    TUE = "tue"
    WED = "wed"
    THU = "thu"
    FRI = "fri"
    SAT = "sat"
    SUN = "sun"


class BusinessHours(StrictModel):
    """When a department's SLA clocks run, in its own time zone. ``always: true`` means around the clock
    (24/7: ``days``, ``start`` and ``end`` are then ignored; holidays still stop the clock)."""

    days: list[Weekday] = Field(default_factory=lambda: [Weekday(d) for d in ("mon", "tue", "wed", "thu", "fri")])
    start: time = time(9, 0)
    end: time = time(17, 0)
    always: bool = Field(default=False, description="24/7: the clock runs every day, all day (except holidays).")

    @model_validator(mode="after")
    def _order(self) -> BusinessHours:
        if not self.always and self.end <= self.start:
            raise ValueError("business_hours.end must be after start")
        return self


class SlaTarget(StrictModel):
    accept_within: Duration
    resolve_within: Duration

    @field_validator("accept_within", "resolve_within", mode="before")
    @classmethod
    def _duration(cls, value: object) -> timedelta:
        if not isinstance(value, str | int | float | timedelta):
            raise ValueError("must be a duration like '4h'")
        return parse_duration(value)


class Department(StrictModel):
    slug: Slug
    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    kind: Kind = Kind.INTERNAL
    categories: list[Category] = Field(default_factory=list)
    timezone: TimeZoneName = "UTC"
    business_hours: BusinessHours = Field(default_factory=BusinessHours)
    holidays: list[date] = Field(default_factory=list)
    sla: dict[Priority, SlaTarget] = Field(default_factory=dict)

    @field_validator("slug")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == SYSTEM_DEPARTMENT:
            raise ValueError(f"{SYSTEM_DEPARTMENT!r} is reserved for Baton's own services")
        return value


RuleName = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z][a-z0-9_.-]{0,63}$"),
    Field(description="Rule name, ^[a-z][a-z0-9_.-]{0,63}$; the routed event's rule is 'rule:<name>'."),
]
Keyword = Annotated[NonBlank, StringConstraints(max_length=100)]


def _as_list(value: object) -> object:
    """A single value where a list is expected: ``site: paris`` means ``site: [paris]``."""
    return [value] if isinstance(value, str) else value


class RuleMatch(StrictModel):
    """A routing rule's conditions. Every condition given must hold; a list matches any of its values.

    Keywords and attribute values are compared case-insensitively; a keyword matches whole words
    (``laptop`` matches "Broken laptop screen", not "laptops"); a phrase matches words in sequence.
    """

    categories: list[Category] = Field(default_factory=list, description="The request's category is one of these.")
    title_keywords: list[Keyword] = Field(default_factory=list, description="The title contains one of these.")
    attributes: dict[AttributeKey, list[AttributeValue]] = Field(
        default_factory=dict, description="Each attribute is present with one of the listed values ('*': any value)."
    )
    priorities: list[Priority] = Field(default_factory=list, description="The request's priority is one of these.")
    requesters: list[Slug] = Field(default_factory=list, description="The requesting department is one of these.")

    @field_validator("attributes", mode="before")
    @classmethod
    def _single_values(cls, value: object) -> object:
        if isinstance(value, dict):
            return {k: _as_list(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> RuleMatch:
        if not (self.categories or self.title_keywords or self.attributes or self.priorities or self.requesters):
            raise ValueError(
                "a rule needs at least one condition (categories, title_keywords, attributes, priorities, requesters)"
            )
        return self


class RoutingRule(StrictModel):
    """``when`` the request matches, route it ``route_to`` this department. Rules are tried in order."""

    name: RuleName
    description: Annotated[str, StringConstraints(max_length=300)] = ""
    when: RuleMatch
    route_to: Slug


def _located(problems: list[tuple[tuple[str | int, ...], str, object]]) -> ValidationError:
    """A ValidationError whose errors point at the offending fields (so the loader can name their lines)."""
    return ValidationError.from_exception_data(
        "Catalog",
        [
            InitErrorDetails(type=PydanticCustomError("catalog_reference", message), loc=loc, input=value)
            for loc, message, value in problems
        ],
    )


class Catalog(StrictModel):
    version: int = 1
    fallback_department: Slug = Field(description="Triage department used when no department serves a category.")
    departments: list[Department]
    rules: list[RoutingRule] = Field(
        default_factory=list,
        description="Routing rules, tried in order after an explicit provider and before the category match.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Catalog:
        slugs = [d.slug for d in self.departments]
        problems: list[tuple[tuple[str | int, ...], str, object]] = []
        seen: set[str] = set()
        for index, slug in enumerate(slugs):
            if slug in seen:
                problems.append((("departments", index, "slug"), f"duplicate department slug '{slug}'", slug))
            seen.add(slug)
        if self.fallback_department not in seen:
            message = f"fallback_department '{self.fallback_department}' is not a department in the catalog"
            problems.append((("fallback_department",), message, self.fallback_department))
        names: set[str] = set()
        for index, rule in enumerate(self.rules):
            if rule.name in names:
                problems.append((("rules", index, "name"), f"duplicate rule name '{rule.name}'", rule.name))
            names.add(rule.name)
            if rule.route_to not in seen:
                message = f"route_to '{rule.route_to}' is not a department in the catalog"
                problems.append((("rules", index, "route_to"), message, rule.route_to))
        if problems:
            raise _located(problems)
        return self

    def get(self, slug: str) -> Department | None:
        return next((d for d in self.departments if d.slug == slug), None)

    @property
    def slugs(self) -> list[str]:
        return [d.slug for d in self.departments]
