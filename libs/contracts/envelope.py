"""The event envelope every Baton event carries, and the checked scalar types.

Pure pydantic: no broker, no database. Every id and slug that may end up in a
NATS subject is constrained here, so nothing downstream ever builds a subject
from unchecked input.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

SLUG_PATTERN = r"^[a-z][a-z0-9-]{1,31}$"
ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
EVENT_TYPE_PATTERN = r"^[a-z][a-z_]{1,31}$"

SLUG_RE = re.compile(SLUG_PATTERN)
ID_RE = re.compile(ID_PATTERN)
EVENT_TYPE_RE = re.compile(EVENT_TYPE_PATTERN)

#: Reserved pseudo-department used as the actor of events Baton's own services emit.
SYSTEM_DEPARTMENT = "baton"

SCHEMA_VERSION = 1

# pydantic validates these with Rust regexes, where ``$`` matches only at the very end of the text.
Slug = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z][a-z0-9-]{1,31}$"),
    Field(description="Department slug: ^[a-z][a-z0-9-]{1,31}$", examples=["it", "finance"]),
]
EventId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,64}$"),
    Field(description="Publisher-chosen unique id, 8-64 of [A-Za-z0-9_-]; used as Nats-Msg-Id."),
]
RequestId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,64}$"),
    Field(description="Request id, 8-64 of [A-Za-z0-9_-].", examples=["REQ-8F2K0001"]),
]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


#: Free text that must contain something other than whitespace.
NonBlank = Annotated[str, AfterValidator(_not_blank)]
#: An RFC 3339 timestamp that carries its UTC offset (naive times are refused).
Timestamp = AwareDatetime
PersonName = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_not_blank)]


class StrictModel(BaseModel):
    """Base for every contract model: unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class Actor(StrictModel):
    """Who did it: the department (which must match the subject) and a person."""

    department: Slug
    person: PersonName


def _type_is_required(schema: dict[str, Any]) -> None:
    """``type`` has a default in Python (convenient when building events) but is the union's tag:
    a published event must carry it, so the JSON Schema says so."""
    if "type" in schema.get("properties", {}):
        required = schema.setdefault("required", [])
        if "type" not in required:
            required.insert(0, "type")


class Envelope(StrictModel):
    """Fields common to every event.

    ``sequence``, ``recorded_at`` and ``trace_id`` are stamped by intake when it
    appends the event to the canonical log; publishers must leave them out.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_type_is_required)

    event_id: EventId
    request_id: RequestId
    occurred_at: Timestamp = Field(description="RFC 3339 with an offset, e.g. 2026-11-24T09:30:00+01:00")
    actor: Actor
    schema_version: Literal[1] = 1
    sequence: int | None = Field(
        default=None, ge=1, description="Per-request sequence number; set by intake, omit when publishing."
    )
    recorded_at: Timestamp | None = Field(default=None, description="When intake appended the event; set by intake.")
    trace_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] | None = Field(
        default=None, description="OpenTelemetry trace id of the request; set by intake."
    )

    #: Fields only intake may set.
    STAMPED_FIELDS: ClassVar[frozenset[str]] = frozenset({"sequence", "recorded_at", "trace_id"})
