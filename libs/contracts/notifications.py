"""What departments receive on ``baton.notify.<dept>.<type>`` (stream ``BATON_NOTIFY``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from .envelope import EventId, RequestId, Slug, StrictModel, Timestamp
from .events import LifecycleEvent


class Role(StrEnum):
    REQUESTER = "requester"
    PROVIDER = "provider"
    WATCHER = "watcher"


NotificationId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,80}$")]


class Notification(StrictModel):
    """One department's view of one canonical event. ``notification_id`` is its Nats-Msg-Id."""

    notification_id: NotificationId
    department: Slug = Field(description="The recipient department.")
    role: Role
    request_id: RequestId
    type: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z_]{1,31}$")]
    sequence: int | None = None
    text: str = Field(description="One human sentence: who did what, why, and when.")
    title: str = ""
    event: LifecycleEvent
    trace_id: str | None = None
    created_at: Timestamp
    # Structured facts for machines (optional, additive): the state after the event, as the notifier knows it.
    requester_department: Slug | None = Field(default=None, description="The department that raised the request.")
    holder_department: Slug | None = Field(
        default=None, description="The department holding the request after this event (none while unassigned)."
    )
    eta: Timestamp | None = Field(default=None, description="The committed ETA after this event, if any.")
    previous_eta: Timestamp | None = Field(default=None, description="The ETA this event replaced (delayed).")
    delay_count: int | None = Field(default=None, ge=0, description="How many times the request was delayed so far.")
    time_zone: str | None = Field(default=None, description="IANA zone the times in `text` are shown in.")


class FieldError(StrictModel):
    """One field-level problem, machine- and human-readable."""

    loc: list[str | int] = Field(description="Path to the field, e.g. ['actor', 'department'].")
    code: str = Field(description="Machine-readable code, e.g. 'missing', 'string_pattern_mismatch'.")
    message: str


class RejectionCode(StrEnum):
    BAD_SUBJECT = "bad_subject"
    MALFORMED_JSON = "malformed_json"
    VALIDATION_FAILED = "validation_failed"
    SUBJECT_MISMATCH = "subject_mismatch"
    STAMPED_FIELD = "stamped_field"
    UNKNOWN_REQUEST = "unknown_request"
    DUPLICATE_REQUEST = "duplicate_request"
    ILLEGAL_TRANSITION = "illegal_transition"
    NOT_ALLOWED = "not_allowed"
    ID_CONFLICT = "id_conflict"
    TOO_LARGE = "too_large"


class Rejection(StrictModel):
    """Published on ``baton.notify.<dept>.rejected`` when intake refuses an event from ``<dept>``."""

    notification_id: NotificationId
    department: Slug
    type: Annotated[str, StringConstraints(pattern=r"^rejected$")] = "rejected"
    event_id: str | None = Field(default=None, description="The refused event's event_id, when it could be read.")
    request_id: str | None = None
    event_type: str | None = None
    subject: str
    code: RejectionCode
    message: str
    errors: list[FieldError] = Field(default_factory=list)
    rejected_at: Timestamp


class DeadLetter(StrictModel):
    """An entry on ``baton.dlq.<service>.<code>`` (stream ``BATON_DLQ``): the original message and why."""

    dead_letter_id: NotificationId
    service: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{1,31}$")]
    code: str
    message: str
    errors: list[FieldError] = Field(default_factory=list)
    original_subject: str
    original_stream_sequence: int | None = None
    original_headers: dict[str, str] = Field(default_factory=dict)
    payload: str = Field(description="The original payload, base64-encoded (exact bytes, replayable).")
    event_id: EventId | None = None
    department: Slug | None = None
    dead_lettered_at: Timestamp
    details: dict[str, Any] = Field(default_factory=dict)
