"""HTTP error responses: RFC 9457 problem details, with Baton's machine-readable reason code.

Over HTTP a refusal is a ``Problem`` (``application/problem+json``) carrying the same ``code`` and
``errors`` as the ``rejected`` notice intake sends over NATS, so a client handles both alike.
"""

from __future__ import annotations

from pydantic import Field

from .envelope import StrictModel
from .notifications import FieldError

PROBLEM_MEDIA_TYPE = "application/problem+json"

#: ``code`` values that exist only over HTTP (the others are :class:`~.notifications.RejectionCode` values).
HTTP_ONLY_CODES = ("unauthorized", "not_found", "method_not_allowed", "unavailable")


def problem_type(code: str) -> str:
    """The ``type`` URI of a problem: one per reason code, stable, not meant to be dereferenced."""
    return f"urn:baton:problem:{code}"


class Problem(StrictModel):
    """RFC 9457 problem details plus ``code`` (machine-readable reason) and ``errors`` (field-level)."""

    type: str = Field(description="URI of the problem type: urn:baton:problem:<code>.")
    title: str = Field(description="Short summary of the problem type.")
    status: int = Field(ge=400, le=599, description="The HTTP status code.")
    detail: str = Field(description="What went wrong with this request, for humans (same text as over NATS).")
    instance: str = Field(description="This occurrence (urn:uuid:…); `baton rejected` lists it.")
    code: str = Field(
        description="Machine-readable reason: a rejection code of the contract (validation_failed, not_allowed, "
        "unknown_request, illegal_transition, id_conflict, …) or, over HTTP only, unauthorized, not_found, "
        "method_not_allowed, unavailable."
    )
    errors: list[FieldError] = Field(default_factory=list, description="Field-level problems.")
