"""Intake's HTTP API, beside NATS, for systems that don't speak NATS.

A submission over HTTP goes through exactly what an inbound NATS message goes through:
``decode_document`` and ``check_document`` (the two halves of ``check_inbound``) on the body, with
the subject ``baton.in.<dept>.<type>`` built from the *token's* department and a checked event
type → ``decide`` → commit → the canonical event published on ``BATON_EVENTS``
(``Nats-Msg-Id`` = event_id). Idempotency is keyed on ``event_id`` in intake's database, so a
retry, over either channel, has one effect.

Every refusal is an RFC 9457 ``application/problem+json`` response carrying the same ``code``, message
and field-level ``errors`` as the rejection notice over NATS, and is recorded in the rejections table
(``source_key`` ``http:<uuid>``, the problem's ``instance``), so ``baton rejected <dept>`` shows both
channels.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import nats.errors
import orjson
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from opentelemetry import trace
from pydantic import BaseModel, Field, TypeAdapter
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from libs.contracts import EVENT_ADAPTER, EVENT_MODELS, INBOUND_TYPES, SYSTEM_DEPARTMENT
from libs.contracts import tracing as telemetry
from libs.contracts.envelope import ID_PATTERN, SLUG_PATTERN, Envelope
from libs.contracts.events import (
    Accepted,
    Commented,
    Created,
    Declined,
    Delayed,
    Feedback,
    Reassigned,
    Reopened,
    Resolved,
)
from libs.contracts.notifications import FieldError, RejectionCode
from libs.contracts.problems import PROBLEM_MEDIA_TYPE, Problem, problem_type
from libs.contracts.subjects import inbound_subject, parse_inbound_subject
from libs.contracts.tokens import Principal, TokenRegistry

from . import db
from .domain import MAX_PAYLOAD_BYTES, Refusal, Rejected, check_document, decode_document
from .handlers import IntakeProcessor, request_span_parent

log = logging.getLogger("baton.intake.http")

router = APIRouter()

CREATE_TYPES: frozenset[str] = frozenset({"created"})
#: What ``POST /v1/requests/{request_id}/events`` takes: every type a department publishes, except ``created``.
EVENT_TYPES: frozenset[str] = INBOUND_TYPES - CREATE_TYPES

STATUS: dict[str, int] = {
    RejectionCode.BAD_SUBJECT: 400,  # not reachable over HTTP: the subject is built from checked values
    RejectionCode.MALFORMED_JSON: 400,
    RejectionCode.TOO_LARGE: 413,
    RejectionCode.VALIDATION_FAILED: 422,
    RejectionCode.STAMPED_FIELD: 422,
    RejectionCode.SUBJECT_MISMATCH: 422,
    RejectionCode.NOT_ALLOWED: 403,
    RejectionCode.UNKNOWN_REQUEST: 404,
    RejectionCode.DUPLICATE_REQUEST: 409,
    RejectionCode.ILLEGAL_TRANSITION: 409,
    RejectionCode.ID_CONFLICT: 409,
}
TITLES: dict[str, str] = {
    RejectionCode.BAD_SUBJECT: "Bad subject",
    RejectionCode.MALFORMED_JSON: "Malformed JSON",
    RejectionCode.TOO_LARGE: "Payload too large",
    RejectionCode.VALIDATION_FAILED: "Invalid event",
    RejectionCode.STAMPED_FIELD: "Field set by intake",
    RejectionCode.SUBJECT_MISMATCH: "Event does not match its endpoint",
    RejectionCode.NOT_ALLOWED: "Not allowed",
    RejectionCode.UNKNOWN_REQUEST: "Unknown request",
    RejectionCode.DUPLICATE_REQUEST: "Request already exists",
    RejectionCode.ILLEGAL_TRANSITION: "Illegal transition",
    RejectionCode.ID_CONFLICT: "event_id already used",
    "unauthorized": "Missing or invalid token",
    "not_found": "Not found",
    "method_not_allowed": "Method not allowed",
    "unavailable": "Temporarily unavailable",
}
REJECTION_CODES = frozenset(c.value for c in RejectionCode)
#: Failures that a retry with the same event_id will get past (database or NATS briefly unreachable).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    TimeoutError,
    ConnectionError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
)


class ApiError(Exception):
    """A refusal, rendered as problem+json by :func:`install_error_handlers`."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        errors: Sequence[FieldError] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = list(errors)
        self.headers = headers or {}

    @classmethod
    def refusal(cls, refusal: Refusal) -> ApiError:
        return cls(STATUS[refusal.code], refusal.code.value, refusal.message, refusal.errors)


@dataclass
class Submission:
    """An authenticated submission in progress: from here on, every refusal is recorded."""

    principal: Principal
    document: dict[str, Any] | None = None


# --- identity ----------------------------------------------------------------------------
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="departmentToken",
    bearerFormat="bt_<department>_<secret>",
    description="A department's token (`baton token new <dept>`); operator tokens may read everything.",
)


async def authenticated(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """The department (or operator) the bearer token speaks for; 401 otherwise."""
    registry: TokenRegistry = request.app.state.tokens
    if credentials is None:
        raise ApiError(
            401,
            "unauthorized",
            "a department token is required: Authorization: Bearer <token>",
            headers={"WWW-Authenticate": 'Bearer realm="baton"'},
        )
    principal = registry.verify(credentials.credentials)
    if principal is None:
        raise ApiError(
            401,
            "unauthorized",
            "the token is unknown, expired or revoked",
            headers={"WWW-Authenticate": 'Bearer realm="baton", error="invalid_token"'},
        )
    return principal


async def submitter(request: Request, principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
    """A department that may publish: operator tokens read, they don't act as a department."""
    request.state.submission = Submission(principal)
    if principal.operator or principal.department is None:
        raise ApiError(
            403,
            RejectionCode.NOT_ALLOWED,
            "operator tokens may read every request but not publish events; use a department token",
        )
    if principal.department == SYSTEM_DEPARTMENT:
        raise ApiError(403, RejectionCode.NOT_ALLOWED, f"{SYSTEM_DEPARTMENT!r} is reserved for Baton's own services")
    return principal


Reader = Annotated[Principal, Depends(authenticated)]
Submitter = Annotated[Principal, Depends(submitter)]
RequestIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="Request id, 8-64 of [A-Za-z0-9_-].")]


# --- OpenAPI documentation of bodies and problems ------------------------------------------
InboundEvent = Annotated[
    Accepted | Delayed | Resolved | Declined | Reassigned | Reopened | Feedback | Commented,
    Field(discriminator="type"),
]
REF = "#/components/schemas/{model}"
CONTRACT_COMPONENTS: dict[str, TypeAdapter[Any]] = {
    "Created": TypeAdapter(Created),
    "InboundEvent": TypeAdapter(InboundEvent),
    "LifecycleEvent": EVENT_ADAPTER,
    "Problem": TypeAdapter(Problem),
}
PROBLEM_DOCS: dict[int, str] = {
    400: "Malformed JSON, or not a JSON object (`malformed_json`).",
    401: "Missing, unknown, expired or revoked token (`unauthorized`).",
    403: "This department may not do this (`not_allowed`): another department in `actor`/`requester`, "
    "not the holder or the requester, an operator token publishing, a department reading a request it is "
    "no party to.",
    404: "No such request (`unknown_request`).",
    409: "The lifecycle does not allow it now (`illegal_transition`), the request exists (`duplicate_request`), "
    "or the event_id was used for a different event (`id_conflict`).",
    413: "The body is over 64 KiB (`too_large`).",
    422: "Invalid fields (`validation_failed`, `stamped_field`); see `errors`.",
    503: "Database or NATS briefly unreachable (`unavailable`): retry with the same event_id.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"description": PROBLEM_DOCS[status], "content": {PROBLEM_MEDIA_TYPE: {"schema": _ref("Problem")}}}
        for status in statuses
    }


def _accepted_docs(schema: str) -> dict[int | str, dict[str, Any]]:
    location = {"Location": {"description": "The request: GET it for its state.", "schema": {"type": "string"}}}
    return {
        201: {
            "description": "Appended to the canonical log: the canonical event (with sequence, recorded_at, trace_id).",
            "content": {"application/json": {"schema": _ref(schema)}},
            "headers": location,
        },
        200: {
            "description": "A retry of an event already appended (same event_id and payload): the canonical event.",
            "content": {"application/json": {"schema": _ref(schema)}},
            "headers": location,
        },
    }


def _body_docs(schema: str, description: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": _ref(schema)}},
        }
    }


def install_openapi(app: FastAPI) -> None:
    """FastAPI's document plus the contract models that document the raw bodies (read by intake itself)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, component in contract_components().items():
                if components.setdefault(name, component) != component:
                    raise RuntimeError(f"OpenAPI component {name} is defined twice, differently")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]


def contract_components() -> dict[str, Any]:
    """The contract's JSON Schemas as OpenAPI components, stating exactly what intake accepts:

    * ``type`` is required (it selects the model; the models' default makes pydantic call it optional);
    * ``sequence``, ``recorded_at``, ``trace_id`` are ``readOnly``: intake sets them, a body must not;
    * maps with constrained keys (``attributes``) refuse other keys, as the models do.
    """
    out: dict[str, Any] = {}
    for name, adapter in CONTRACT_COMPONENTS.items():
        schema = adapter.json_schema(ref_template=REF)
        out.update(schema.pop("$defs", {}))
        out.setdefault(name, schema)
    for component in out.values():
        properties = component.get("properties", {})
        if "const" in properties.get("type", {}) and "type" not in component.get("required", []):
            component["required"] = ["type", *component.get("required", [])]
        for field in sorted(Envelope.STAMPED_FIELDS & set(properties)):
            properties[field]["readOnly"] = True
        for prop in properties.values():
            if "patternProperties" in prop:
                prop.setdefault("additionalProperties", False)
    return out


# --- submissions ---------------------------------------------------------------------------
@router.post(
    "/v1/requests",
    tags=["requests"],
    status_code=201,
    summary="Create a request (a `created` event)",
    response_class=Response,
    responses={**_accepted_docs("Created"), **problems(400, 401, 403, 409, 413, 422, 503)},
    openapi_extra=_body_docs("Created", "A `created` event; `actor` and `requester` are the token's department."),
)
async def create_request(request: Request, principal: Submitter) -> Response:
    return await _submit(request, principal, CREATE_TYPES, None, "POST /v1/requests")


@router.post(
    "/v1/requests/{request_id}/events",
    tags=["requests"],
    status_code=201,
    summary="Publish a lifecycle event for a request",
    response_class=Response,
    responses={**_accepted_docs("InboundEvent"), **problems(400, 401, 403, 404, 409, 413, 422, 503)},
    openapi_extra=_body_docs(
        "InboundEvent",
        "accepted, delayed, resolved, declined, reassigned (the holder); reopened, feedback (the requester); "
        "commented (either). `request_id` must equal the path's; `actor.department` is the token's department.",
    ),
)
async def add_event(request: Request, request_id: RequestIdPath, principal: Submitter) -> Response:
    return await _submit(request, principal, EVENT_TYPES, request_id, "POST /v1/requests/{request_id}/events")


async def _submit(
    request: Request, principal: Principal, expected: frozenset[str], path_request_id: str | None, route: str
) -> Response:
    processor: IntakeProcessor = request.app.state.processor
    tracer: trace.Tracer = request.app.state.tracer
    submission: Submission = request.state.submission
    assert principal.department is not None  # submitter() refused operator tokens

    data = await read_limited(request, MAX_PAYLOAD_BYTES)
    document = decode_document(data)
    if isinstance(document, Refusal):
        raise ApiError.refusal(document)
    submission.document = document

    # The same checks as over NATS, on the subject this department would have published to.
    subject = inbound_subject(principal.department, event_type_of(document, expected))
    checked = check_document(parse_inbound_subject(subject), document)
    if isinstance(checked, Rejected):
        raise ApiError.refusal(_as_http(checked.refusal))
    if path_request_id is not None and checked.event.request_id != path_request_id:
        err = FieldError(
            loc=["request_id"], code="path_mismatch", message=f"must be {path_request_id!r}, as in the path"
        )
        raise ApiError(422, RejectionCode.VALIDATION_FAILED, f"invalid event: request_id: {err.message}", [err])

    # One trace per request: the span is in the request's trace (a new one for ``created``), linked to
    # the caller's trace context when it sent one (see docs/tracing.md).
    parent, links = await request_span_parent(processor, data, telemetry.extract(request.headers))
    with tracer.start_as_current_span(
        route,
        context=parent,
        kind=trace.SpanKind.SERVER,
        links=links,
        attributes={
            "http.request.method": "POST",
            "http.route": route.split(" ", 1)[1],
            telemetry.REQUEST_ID: checked.event.request_id,
            telemetry.DEPARTMENT: principal.department,
            telemetry.EVENT_TYPE: checked.event.type,
        },
    ):
        result = await processor.submit(checked, outbox=True)
    if isinstance(result, Refusal):
        raise ApiError.refusal(result)
    return Response(
        result.canonical,
        status_code=200 if result.duplicate else 201,
        media_type="application/json",
        headers={"Location": f"/v1/requests/{result.request_id}"},
    )


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (never read whole first)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, RejectionCode.TOO_LARGE, f"payload is {int(declared)} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, RejectionCode.TOO_LARGE, f"payload is over {limit} bytes; the limit is {limit}")
    return bytes(body)


def event_type_of(document: dict[str, Any], expected: frozenset[str]) -> str:
    """The event type for the subject: one of our own constants, never the caller's string."""
    value = document.get("type")
    for known in sorted(expected):
        if value == known:
            return known
    for known in EVENT_MODELS:
        if value == known and known not in INBOUND_TYPES:
            return known  # a service's event type: check_document explains it is not the department's to publish
    allowed = ", ".join(f"'{t}'" for t in sorted(expected))
    if value is None:
        err = FieldError(loc=["type"], code="missing", message="Field required")
    else:
        hint = ""
        if value == "created":
            hint = " (create a request with POST /v1/requests)"
        elif value in INBOUND_TYPES:
            hint = " (post it to /v1/requests/{request_id}/events)"
        err = FieldError(loc=["type"], code="literal_error", message=f"Input should be {allowed}{hint}")
    raise ApiError(422, RejectionCode.VALIDATION_FAILED, f"invalid event: type: {err.message}", [err])


def _as_http(refusal: Refusal) -> Refusal:
    """Over HTTP the department is the token's: another department in ``actor`` is not allowed (403)."""
    if refusal.code is RejectionCode.SUBJECT_MISMATCH and any(e.loc == ["actor", "department"] for e in refusal.errors):
        errors = tuple(
            e.model_copy(update={"code": RejectionCode.NOT_ALLOWED.value}) if e.loc == ["actor", "department"] else e
            for e in refusal.errors
        )
        return Refusal(RejectionCode.NOT_ALLOWED, refusal.message, errors)
    return refusal


# --- reading -------------------------------------------------------------------------------
class RequestView(BaseModel):
    """A request as intake knows it."""

    request_id: str
    state: str = Field(description="created, routed, accepted, declined, returned, resolved or closed.")
    requester_department: str
    holder_department: str | None
    sequence: int = Field(description="Sequence number of the request's last canonical event.")
    eta: datetime | None
    delay_count: int
    reopen_count: int
    title: str
    trace_id: str | None
    watchers: list[str]
    past_holders: list[str] = Field(description="Departments that held the request before, oldest first.")
    events: list[dict[str, Any]] = Field(
        description="The canonical events, in sequence order.",
        json_schema_extra={"items": {"$ref": "#/components/schemas/LifecycleEvent"}},
    )


class RejectionView(BaseModel):
    """One refusal, over either channel."""

    channel: str = Field(description="nats or http")
    source: str = Field(description="nats:<BATON_IN stream sequence> or http:<uuid> (the problem's instance).")
    department: str | None
    subject: str = Field(description="The NATS subject, or the HTTP method and path.")
    event_id: str | None
    request_id: str | None
    event_type: str | None
    code: str
    message: str
    errors: list[FieldError]
    rejected_at: datetime


@router.get(
    "/v1/requests/{request_id}",
    tags=["requests"],
    summary="Current state, holder, ETA, sequence and the canonical events",
    response_model=RequestView,
    responses=problems(401, 403, 404, 422),
)
async def get_request(request: Request, request_id: RequestIdPath, principal: Reader) -> RequestView:
    database: db.Database = request.app.state.database
    async with database.transaction() as session:
        row = await db.load_request(session, request_id, for_update=False)
        if row is None:
            raise ApiError(404, RejectionCode.UNKNOWN_REQUEST, f"request {request_id} does not exist")
        events = [orjson.loads(e.canonical) for e in await db.request_events(session, request_id)]
    state = row.to_state()
    watchers, past = watchers_and_holders(events, state.holder_department)
    parties = {state.requester_department, *watchers, *past} | ({state.holder_department} - {None})
    if not principal.operator and principal.department not in parties:
        raise ApiError(
            403,
            RejectionCode.NOT_ALLOWED,
            f"department {principal.department} is not a party to request {request_id} "
            "(requester, holder, past holder or watcher)",
        )
    return RequestView(
        request_id=state.request_id,
        state=state.state.value,
        requester_department=state.requester_department,
        holder_department=state.holder_department,
        sequence=state.last_sequence,
        eta=state.eta,
        delay_count=state.delay_count,
        reopen_count=state.reopen_count,
        title=state.title,
        trace_id=state.trace_id,
        watchers=watchers,
        past_holders=past,
        events=events,
    )


def watchers_and_holders(events: list[dict[str, Any]], holder: str | None) -> tuple[list[str], list[str]]:
    """Watchers (from ``created``) and every department that held the request but holds it no more."""
    watchers: list[str] = []
    held: list[str] = []
    for event in events:
        kind = event.get("type")
        if kind == "created":
            watchers = list(event.get("watchers", []))
        elif kind == "routed":
            held.append(event["provider_department"])
        elif kind == "reassigned":
            held.append(event["to_department"])
    past = [d for d in dict.fromkeys(held) if d != holder]
    return watchers, past


@router.get(
    "/v1/rejections",
    tags=["rejections"],
    summary="Recent refusals, over NATS and HTTP, newest first",
    response_model=list[RejectionView],
    responses=problems(401, 403, 422),
)
async def list_rejections(
    request: Request,
    principal: Reader,
    department: Annotated[
        str | None, Query(pattern=SLUG_PATTERN, description="Operators: whose refusals (default: everyone's).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[RejectionView]:
    if not principal.operator:
        if department is not None and department != principal.department:
            raise ApiError(
                403, RejectionCode.NOT_ALLOWED, f"department {principal.department} may only list its own refusals"
            )
        department = principal.department
    database: db.Database = request.app.state.database
    async with database.transaction() as session:
        rows = await db.recent_rejections(session, department, limit)
    return [
        RejectionView(
            channel=r.source_key.split(":", 1)[0],
            source=r.source_key,
            department=r.department,
            subject=r.subject,
            event_id=r.event_id,
            request_id=r.request_id,
            event_type=r.event_type,
            code=r.code,
            message=r.message,
            errors=[FieldError.model_validate(e) for e in r.errors or []],
            rejected_at=db.aware(r.rejected_at),
        )
        for r in rows
    ]


# --- errors as problem+json ------------------------------------------------------------------
def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return await problem_response(request, exc.status, exc.code, exc.detail, exc.errors, exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            FieldError(loc=[p if isinstance(p, int) else str(p) for p in e["loc"]], code=e["type"], message=e["msg"])
            for e in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.message}" for e in errors[:5])
        return await problem_response(
            request, 422, RejectionCode.VALIDATION_FAILED, f"invalid request: {summary}", errors
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return await problem_response(request, exc.status_code, code, str(exc.detail), (), dict(exc.headers or {}))

    async def on_transient(request: Request, exc: Exception) -> Response:
        log.warning("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
        detail = "intake could not reach its database or NATS; retry (with the same event_id: it is idempotent)"
        return await problem_response(request, 503, "unavailable", detail, (), {"Retry-After": "2"})

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    for error in TRANSIENT_ERRORS:
        app.add_exception_handler(error, on_transient)


async def problem_response(
    request: Request,
    status: int,
    code: str,
    detail: str,
    errors: Sequence[FieldError] = (),
    headers: dict[str, str] | None = None,
) -> Response:
    occurrence = uuid.uuid4()
    problem = Problem(
        type=problem_type(code),
        title=TITLES.get(code, "Error"),
        status=status,
        detail=detail,
        instance=f"urn:uuid:{occurrence}",
        code=code,
        errors=list(errors),
    )
    submission: Submission | None = getattr(request.state, "submission", None)
    if submission is not None and code in REJECTION_CODES:
        await _record(request, submission, f"http:{occurrence}", Refusal(RejectionCode(code), detail, tuple(errors)))
    return Response(
        orjson.dumps(problem.model_dump(mode="json")),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


async def _record(request: Request, submission: Submission, source_key: str, refusal: Refusal) -> None:
    """Record an HTTP refusal beside the NATS ones; a failure to record never hides the refusal itself."""
    processor: IntakeProcessor = request.app.state.processor
    doc = submission.document or {}
    try:
        await processor.record_rejection(
            source_key=source_key,
            department=submission.principal.department,
            subject=f"{request.method} {request.url.path}",
            event_id=_text(doc.get("event_id")),
            request_id=_text(doc.get("request_id")),
            event_type=_text(doc.get("type")),
            refusal=refusal,
        )
    except Exception:
        log.warning("could not record refusal %s", source_key, exc_info=True)
    log.info("refused %s %s (%s): %s", request.method, request.url.path[:128], refusal.code.value, refusal.message)


def _text(value: object) -> str | None:
    return value[:200] if isinstance(value, str) else None
