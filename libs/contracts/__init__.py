"""Baton's public contracts: event models, notifications, subjects, the catalog format.

Pure pydantic v2; no broker and no database imports. The only code services share.
"""

from .catalog import Catalog, Department, Kind, SlaTarget, parse_duration
from .codec import dumps, error_list, loads
from .envelope import (
    ID_PATTERN,
    SCHEMA_VERSION,
    SLUG_PATTERN,
    SYSTEM_DEPARTMENT,
    Actor,
    Envelope,
)
from .events import (
    EVENT_ADAPTER,
    EVENT_MODELS,
    INBOUND_TYPES,
    SERVICE_TYPES,
    Accepted,
    Commented,
    Created,
    Declined,
    Delayed,
    DelayReasonCode,
    Feedback,
    LifecycleEvent,
    Outcome,
    Priority,
    Reassigned,
    Reopened,
    Resolved,
    Routed,
    parse_event,
)
from .notifications import DeadLetter, FieldError, Notification, Rejection, RejectionCode, Role

__all__ = [
    "EVENT_ADAPTER",
    "EVENT_MODELS",
    "ID_PATTERN",
    "INBOUND_TYPES",
    "SCHEMA_VERSION",
    "SERVICE_TYPES",
    "SLUG_PATTERN",
    "SYSTEM_DEPARTMENT",
    "Accepted",
    "Actor",
    "Catalog",
    "Commented",
    "Created",
    "DeadLetter",
    "Declined",
    "DelayReasonCode",
    "Delayed",
    "Department",
    "Envelope",
    "Feedback",
    "FieldError",
    "Kind",
    "LifecycleEvent",
    "Notification",
    "Outcome",
    "Priority",
    "Reassigned",
    "Rejection",
    "RejectionCode",
    "Reopened",
    "Resolved",
    "Role",
    "Routed",
    "SlaTarget",
    "dumps",
    "error_list",
    "loads",
    "parse_duration",
    "parse_event",
]
