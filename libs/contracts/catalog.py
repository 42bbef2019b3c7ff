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

from pydantic import AfterValidator, Field, StringConstraints, field_validator, model_validator

from .envelope import SYSTEM_DEPARTMENT, Slug, StrictModel
from .events import Category, Priority

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
    days: list[Weekday] = Field(default_factory=lambda: [Weekday(d) for d in ("mon", "tue", "wed", "thu", "fri")])
    start: time = time(9, 0)
    end: time = time(17, 0)

    @model_validator(mode="after")
    def _order(self) -> BusinessHours:
        if self.end <= self.start:
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


class Catalog(StrictModel):
    version: int = 1
    fallback_department: Slug = Field(description="Triage department used when no department serves a category.")
    departments: list[Department]

    @model_validator(mode="after")
    def _consistent(self) -> Catalog:
        slugs = [d.slug for d in self.departments]
        dupes = sorted({s for s in slugs if slugs.count(s) > 1})
        if dupes:
            raise ValueError(f"duplicate department slugs: {', '.join(dupes)}")
        if self.fallback_department not in slugs:
            raise ValueError(f"fallback_department {self.fallback_department!r} is not a department in the catalog")
        return self

    def get(self, slug: str) -> Department | None:
        return next((d for d in self.departments if d.slug == slug), None)

    @property
    def slugs(self) -> list[str]:
        return [d.slug for d in self.departments]
