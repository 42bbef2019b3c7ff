"""Lifecycle events, contract v1.

Owning producers (exactly one per type):

- ``created``, ``reopened``, ``feedback``: the requester's systems, via intake;
- ``accepted``, ``delayed``, ``resolved``, ``declined``, ``reassigned``: the holding department's systems;
- ``commented``: either party's systems;
- ``routed``, ``returned``, ``sla_warning``, ``escalated``, ``handoff_loop_detected``: the routing
  service, via intake (``baton.svc.routing.<type>``).

Intake validates every event, stamps ``sequence``/``recorded_at``/``trace_id``
and appends it to the canonical log.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, TypeAdapter, model_validator

from .envelope import Actor, Envelope, EventId, NonBlank, Slug, Timestamp


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"


class DelayReasonCode(StrEnum):
    WAITING_ON_REQUESTER = "waiting_on_requester"
    WAITING_ON_VENDOR = "waiting_on_vendor"
    WAITING_ON_DEPARTMENT = "waiting_on_department"
    CAPACITY = "capacity"
    OTHER = "other"


class Outcome(StrEnum):
    DONE = "done"
    DECLINED = "declined"
    DUPLICATE = "duplicate"
    WONT_FIX = "wont_fix"


Category = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,63}$"),
    Field(description="Request category, e.g. hardware, invoice, contract-review."),
]
AttributeKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
AttributeValue = Annotated[str, StringConstraints(max_length=1024)]

MAX_WATCHERS = 20
MAX_ATTRIBUTES = 32


class Created(Envelope):
    """A department raises a request. Published by the requesting department."""

    type: Literal["created"] = "created"
    title: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    description: Annotated[str, StringConstraints(max_length=10_000)] = ""
    category: Category
    priority: Priority
    requester: Actor
    provider_department: Slug | None = Field(default=None, description="Explicit provider; else routing decides.")
    due_by: Timestamp | None = None
    watchers: list[Slug] = Field(default_factory=list, max_length=MAX_WATCHERS)
    attributes: dict[AttributeKey, AttributeValue] = Field(default_factory=dict, max_length=MAX_ATTRIBUTES)

    @model_validator(mode="after")
    def _title_not_blank(self) -> Created:
        if not self.title.strip():
            raise ValueError("title must not be blank")
        return self


class Routed(Envelope):
    """Routing assigned the request to a provider department. Emitted by the routing service."""

    type: Literal["routed"] = "routed"
    provider_department: Slug
    previous_department: Slug | None = None
    rule: Annotated[str, StringConstraints(min_length=1, max_length=100)] = Field(
        description="Which routing rule fired, e.g. 'explicit-provider', 'category:hardware', 'fallback'."
    )
    reason: Annotated[str, StringConstraints(max_length=500)] = ""
    caused_by: EventId = Field(description="event_id of the event that triggered this routing decision.")
    accept_by: Timestamp | None = None
    resolve_by: Timestamp | None = None


class Accepted(Envelope):
    """The holding department accepts the request and commits to an ETA."""

    type: Literal["accepted"] = "accepted"
    assignee: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    eta: Timestamp = Field(description="The completion time the provider commits to.")

    @model_validator(mode="after")
    def _eta_after_occurred(self) -> Accepted:
        if self.eta <= self.occurred_at:
            raise ValueError("eta must be later than occurred_at")
        return self


class Delayed(Envelope):
    """The holding department moves its ETA, with a reason everyone concerned hears."""

    type: Literal["delayed"] = "delayed"
    reason: Annotated[NonBlank, StringConstraints(max_length=1000)]
    new_eta: Timestamp
    reason_code: DelayReasonCode | None = None
    blocking_department: Slug | None = None

    @model_validator(mode="after")
    def _new_eta_after_occurred(self) -> Delayed:
        if self.new_eta <= self.occurred_at:
            raise ValueError("new_eta must be later than occurred_at")
        return self


class Resolved(Envelope):
    """The holding department resolves the request."""

    type: Literal["resolved"] = "resolved"
    resolution: Annotated[NonBlank, StringConstraints(max_length=10_000)]
    outcome: Outcome


class Declined(Envelope):
    """The holding department refuses the request before accepting it; routing then picks the next
    department or returns the request to the requester."""

    type: Literal["declined"] = "declined"
    reason: Annotated[NonBlank, StringConstraints(max_length=1000)]
    suggested_department: Slug | None = Field(default=None, description="Who the decliner thinks should serve it.")


class Reassigned(Envelope):
    """The holding department hands the request to another department (which must then accept it)."""

    type: Literal["reassigned"] = "reassigned"
    reason: Annotated[NonBlank, StringConstraints(max_length=1000)]
    to_department: Slug


class Reopened(Envelope):
    """The requester is not satisfied after ``resolved``: the last holder must accept it again."""

    type: Literal["reopened"] = "reopened"
    reason: Annotated[NonBlank, StringConstraints(max_length=1000)]


class Feedback(Envelope):
    """The requester rates a resolved request; this closes it (nothing may follow)."""

    type: Literal["feedback"] = "feedback"
    rating: Annotated[int, Field(ge=1, le=5, description="1 (poor) to 5 (excellent).")]
    comment: Annotated[str, StringConstraints(max_length=2000)] = ""


class Commented(Envelope):
    """Either party (the requester or the holding department) adds information; the state is unchanged."""

    type: Literal["commented"] = "commented"
    comment: Annotated[NonBlank, StringConstraints(max_length=10_000)]


class SlaClock(StrEnum):
    ACCEPT = "accept"  # time for the holding department to accept a handoff
    RESOLVE = "resolve"  # time for the holding department to resolve, counted from the handoff


class Returned(Envelope):
    """Routing found no (further) department to serve the request and hands it back to the requester."""

    type: Literal["returned"] = "returned"
    reason: Annotated[NonBlank, StringConstraints(max_length=2000)]
    declined_by: list[Slug] = Field(
        default_factory=list, max_length=100, description="Departments that declined, in order."
    )
    caused_by: EventId


class SlaWarning(Envelope):
    """A department's SLA clock reached the warning fraction (default 75 %) of its target. Emitted by routing."""

    type: Literal["sla_warning"] = "sla_warning"
    clock: SlaClock
    department: Slug = Field(description="Whose clock it is.")
    deadline: Timestamp
    fraction: Annotated[float, Field(gt=0, lt=1)]
    remaining_seconds: Annotated[float, Field(ge=0)]
    episode: Annotated[int, Field(ge=1, description="Breach episode of this clock (1, 2, … after re-routing).")] = 1


class Escalated(Envelope):
    """A department's SLA clock passed its deadline (once per breach episode). Emitted by routing."""

    type: Literal["escalated"] = "escalated"
    clock: SlaClock
    department: Slug = Field(description="Whose clock breached.")
    deadline: Timestamp
    overdue_seconds: Annotated[float, Field(ge=0)]
    episode: Annotated[int, Field(ge=1)] = 1


class LoopPattern(StrEnum):
    BOUNCE = "bounce"  # A -> B -> A
    TOO_MANY_HOPS = "too_many_hops"
    QUICK_REASSIGN = "quick_reassign"  # accepted, then reassigned within minutes


class HandoffLoopDetected(Envelope):
    """The request is being passed around; everyone involved hears about it. Emitted by routing."""

    type: Literal["handoff_loop_detected"] = "handoff_loop_detected"
    pattern: LoopPattern
    chain: list[Slug] = Field(max_length=100, description="The handoff chain so far, oldest first.")
    detail: Annotated[str, StringConstraints(max_length=1000)] = ""


LifecycleEvent = Annotated[
    Created
    | Routed
    | Accepted
    | Delayed
    | Resolved
    | Declined
    | Reassigned
    | Reopened
    | Feedback
    | Commented
    | Returned
    | SlaWarning
    | Escalated
    | HandoffLoopDetected,
    Field(discriminator="type"),
]

#: Validates any lifecycle event from JSON bytes or a dict.
EVENT_ADAPTER: TypeAdapter[LifecycleEvent] = TypeAdapter(LifecycleEvent)

EVENT_MODELS: dict[str, type[Envelope]] = {
    "created": Created,
    "routed": Routed,
    "accepted": Accepted,
    "delayed": Delayed,
    "resolved": Resolved,
    "declined": Declined,
    "reassigned": Reassigned,
    "reopened": Reopened,
    "feedback": Feedback,
    "commented": Commented,
    "returned": Returned,
    "sla_warning": SlaWarning,
    "escalated": Escalated,
    "handoff_loop_detected": HandoffLoopDetected,
}

#: Event types a line-of-business system may publish on ``baton.in.<dept>.<type>``.
INBOUND_TYPES: frozenset[str] = frozenset(
    {"created", "accepted", "delayed", "resolved", "declined", "reassigned", "reopened", "feedback", "commented"}
)
#: Event types Baton's services emit (on ``baton.svc.<service>.<type>``), with their owner.
SERVICE_TYPES: dict[str, str] = {
    "routed": "routing",
    "returned": "routing",
    "sla_warning": "routing",
    "escalated": "routing",
    "handoff_loop_detected": "routing",
}
#: Service notices that join the request's sequence without changing its state.
NOTICE_TYPES: frozenset[str] = frozenset({"sla_warning", "escalated", "handoff_loop_detected"})


def parse_event(data: bytes | str) -> LifecycleEvent:
    """Validate JSON into the matching event model (raises pydantic.ValidationError)."""
    return EVENT_ADAPTER.validate_json(data)
