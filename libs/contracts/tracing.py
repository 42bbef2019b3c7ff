"""Baton's tracing contract, shared by the four services: one trace per request.

* ``make_tracer_provider``: the OpenTelemetry SDK configured by the standard ``OTEL_*`` variables;
  spans are exported over OTLP only when an OTLP endpoint is set (otherwise nothing leaves the process, and
  nothing is recorded: ``BatonTracerProvider``'s tracers then only propagate the trace context).
* ``process_span`` / ``send_span``: consumer and producer spans named and attributed per OpenTelemetry's
  messaging semantic conventions (``process BATON_EVENTS``, ``send baton.events``), with the W3C
  ``traceparent`` of the producer span injected into the NATS headers of the message it sends.
* ``event_attributes``: the Baton attributes of a message (``baton.request_id``, ``baton.event_type``,
  ``baton.department``, ``messaging.message.id``), taken only from identifiers that match Baton's id,
  slug and type patterns: never a title, a description or any other free text.
* ``request_parent``: where a span of a request's lifecycle hangs when the message that caused it was
  published outside the request's trace (a department system, days later): under the request's own
  first span, with a *link* to the publisher's context.

See docs/tracing.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

from libs.contracts.envelope import EVENT_TYPE_RE, ID_RE, SLUG_RE
from libs.contracts.subjects import (
    DLQ_PREFIX,
    EVENTS_PREFIX,
    INBOUND_PREFIX,
    NOTIFY_PREFIX,
    SERVICE_PREFIX,
    TIMER_DUE_PREFIX,
    TIMER_SCHEDULE_PREFIX,
)

#: Baton's own span attributes (identifiers only).
REQUEST_ID = "baton.request_id"
EVENT_TYPE = "baton.event_type"
DEPARTMENT = "baton.department"

_TRACEPARENT = "traceparent"
_SAMPLED = frozenset({Decision.RECORD_AND_SAMPLE})


# --- the SDK ------------------------------------------------------------------------------------------
class BatonTracerProvider(TracerProvider):
    """The SDK's tracer provider, whose tracers record spans only once a span processor has been added.

    With no processor (no exporter configured: the embedded default) a recorded span goes nowhere, yet the SDK
    builds each one in full: bounded attributes, limits, a lock, links, its processors' hooks. Until a processor
    is added, this provider's tracers make *propagating* spans instead: a new span id in the parent's trace (a
    new trace at a root), trace flags and state as the provider's sampler decides, nothing recorded. The W3C
    context they inject and the trace ids Baton stores are the same as a recorded span's, so a downstream
    service that does export hangs its spans in the request's trace as before. ``OTEL_SDK_DISABLED=true``
    still gives the SDK's no-op tracer.
    """

    _exporting = False

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        self._exporting = True
        super().add_span_processor(span_processor)

    @property
    def exporting(self) -> bool:
        """True once a span processor was added: spans are then recorded by the SDK."""
        return self._exporting

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> trace.Tracer:
        tracer = super().get_tracer(instrumenting_module_name, instrumenting_library_version, schema_url, attributes)
        return PropagatingTracer(self, tracer) if isinstance(tracer, SdkTracer) else tracer


class PropagatingTracer(trace.Tracer):
    """A tracer of ``BatonTracerProvider``: the SDK's own while the provider exports, else propagation only."""

    def __init__(self, provider: BatonTracerProvider, sdk: SdkTracer) -> None:
        self._provider = provider
        self._sdk = sdk

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        if self._provider.exporting:
            return self._sdk.start_span(
                name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
            )
        parent = trace.get_current_span(context).get_span_context()
        ids = self._sdk.id_generator
        if parent.is_valid:
            trace_id, random_id = parent.trace_id, parent.trace_flags.random_trace_id
        else:
            trace_id, random_id = ids.generate_trace_id(), ids.is_trace_id_random()
        sampled = self._sdk.sampler.should_sample(context, trace_id, name, kind, attributes, links or ())
        flags = TraceFlags.SAMPLED if sampled.decision in _SAMPLED else TraceFlags.DEFAULT
        if random_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(
            trace_id,
            ids.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=sampled.trace_state,
        )
        return trace.NonRecordingSpan(span_context)

    @contextmanager
    def start_as_current_span(  # type: ignore[override]  # the API types it with its private decorator
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(
            name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
        )
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


def make_tracer_provider(service_name: str) -> BatonTracerProvider:
    """A tracer provider configured by the standard ``OTEL_*`` variables.

    ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` name the service (default ``service_name``);
    ``OTEL_TRACES_SAMPLER`` samples; ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` turns on OTLP/HTTP export
    (``OTEL_BSP_*`` tune its batching); ``OTEL_TRACES_EXPORTER=console`` prints spans, ``none`` exports
    nothing even with an endpoint; ``OTEL_SDK_DISABLED=true`` turns tracing off. Without an endpoint
    Baton exports nothing, records nothing (``BatonTracerProvider``) and stays silent.
    """
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = BatonTracerProvider(resource=Resource.create(attributes))
    exporters = {e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")}
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if "otlp" in exporters and endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if "console" in exporters:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider


# --- W3C trace context ----------------------------------------------------------------------------------
def extract(headers: Mapping[str, str]) -> Context:
    """The trace context a message or an HTTP request carries (an empty context when it carries none)."""
    return propagate.extract(dict(headers))


def span_context_of(ctx: Context) -> SpanContext | None:
    """The span context held by ``ctx``, if valid."""
    sc = trace.get_current_span(ctx).get_span_context()
    return sc if sc.is_valid else None


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, if any."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get(_TRACEPARENT)


def trace_id_hex(sc: SpanContext | None) -> str | None:
    return format(sc.trace_id, "032x") if sc is not None and sc.is_valid else None


def context_of(traceparent: str | None) -> Context | None:
    """A context whose (remote) parent is the span a stored ``traceparent`` names; None when invalid."""
    if not traceparent:
        return None
    ctx = propagate.extract({_TRACEPARENT: traceparent})
    return ctx if span_context_of(ctx) is not None else None


@contextmanager
def within(ctx: Context | None) -> Iterator[None]:
    """Make ``ctx`` current for the block (e.g. a background re-publish continuing a request's trace)."""
    if ctx is None:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def request_parent(anchor: str | None, inbound: Context) -> tuple[Context, list[Link]]:
    """Parent and links of the span that handles a message of a request (one trace per request).

    ``anchor`` is the stored ``traceparent`` of the request's first span (intake's span of ``created``);
    ``inbound`` the context the message carried.

    * a message published inside the request's trace (a Baton service's event): child of its publisher;
    * a message published outside it (a department system's event, with no or another trace context):
      child of the anchor, with a link to the publisher's span when there is one;
    * no anchor yet (the request's ``created``): a new trace (the request's), linked to the publisher.
    """
    inbound_sc = span_context_of(inbound)
    links = [Link(inbound_sc, {"baton.link": "publisher"})] if inbound_sc is not None else []
    anchor_ctx = context_of(anchor)
    anchor_sc = span_context_of(anchor_ctx) if anchor_ctx is not None else None
    if anchor_ctx is None or anchor_sc is None:
        return Context(), links
    if inbound_sc is not None and inbound_sc.trace_id == anchor_sc.trace_id:
        return inbound, []
    return anchor_ctx, links


def legacy_anchor(trace_id: str | None) -> str | None:
    """A ``traceparent`` in a request's trace for requests recorded before their first span was stored.

    Only the trace id was kept then: the parent span id is derived from it (that span is not in any
    backend, so such spans show as children of a missing span, but in the right trace).
    """
    if not trace_id or len(trace_id) != 32:
        return None
    try:
        trace_int = int(trace_id, 16)
    except ValueError:
        return None
    span_id = (trace_int & 0xFFFFFFFFFFFFFFFF) or 1
    sc = SpanContext(trace_int, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(trace.NonRecordingSpan(sc)))
    return carrier.get(_TRACEPARENT)


# --- span names and attributes (messaging semantic conventions) -------------------------------------------
def destination_template(subject: str) -> str:
    """The low-cardinality part of a subject, for span names: ``baton.events``, ``baton.svc.routing``, ..."""
    parts = subject.split(".")
    for prefix, keep in (
        (TIMER_SCHEDULE_PREFIX, 0),
        (TIMER_DUE_PREFIX, 0),
        (SERVICE_PREFIX, 1),
        (DLQ_PREFIX, 1),
        (EVENTS_PREFIX, 0),
        (NOTIFY_PREFIX, 0),
        (INBOUND_PREFIX, 0),
    ):
        if subject.startswith(prefix + "."):
            return ".".join(parts[: prefix.count(".") + 1 + keep])
    return "baton"


def _checked(value: Any, pattern: Any) -> str | None:
    return value if isinstance(value, str) and pattern.fullmatch(value) else None


def event_attributes(subject: str, data: bytes) -> dict[str, AttributeValue]:
    """Baton attributes of a message: identifiers from its subject and body, each checked against its
    pattern (free text never becomes an attribute, whatever a body holds)."""
    parts = subject.split(".")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        doc = {}
    actor = doc.get("actor")
    department = (
        _checked(doc.get("department"), SLUG_RE)
        or (_checked(actor.get("department"), SLUG_RE) if isinstance(actor, dict) else None)
        or (parts[2] if subject.startswith((INBOUND_PREFIX + ".", NOTIFY_PREFIX + ".")) and len(parts) > 2 else None)
    )
    values = {
        REQUEST_ID: _checked(doc.get("request_id"), ID_RE),
        EVENT_TYPE: _checked(doc.get("type"), EVENT_TYPE_RE),
        DEPARTMENT: _checked(department, SLUG_RE),
        "messaging.message.id": _checked(doc.get("event_id") or doc.get("notification_id"), ID_RE),
    }
    return {k: v for k, v in values.items() if v is not None}


def _messaging(operation: str, subject: str) -> dict[str, AttributeValue]:
    return {
        "messaging.system": "nats",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": subject[:256],
    }


@contextmanager
def process_span(
    tracer: trace.Tracer,
    *,
    stream: str,
    subject: str,
    data: bytes,
    parent: Context,
    consumer: str | None = None,
    links: list[Link] | None = None,
) -> Iterator[trace.Span]:
    """The consumer span of one message: ``process <stream>``, a child of ``parent`` (``with process_span(...) as
    span``). Baton's attributes, which parse the body, are computed only when the span is recorded."""
    attrs = _messaging("process", subject)
    if consumer:
        attrs["messaging.consumer.group.name"] = consumer
    with tracer.start_as_current_span(
        f"process {stream}", context=parent, kind=SpanKind.CONSUMER, links=links, attributes=attrs
    ) as span:
        if span.is_recording():
            span.set_attributes(event_attributes(subject, data))
        yield span


@contextmanager
def send_span(tracer: trace.Tracer, subject: str, data: bytes, headers: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """A producer span ``send <destination>`` (child of the current span); yields ``headers`` plus the W3C
    trace context of this span, to publish with: the consumer's span is then its child. Baton's attributes,
    which parse the body, are computed only when the span is recorded."""
    template = destination_template(subject)
    attrs = _messaging("send", subject)
    attrs["messaging.destination.template"] = template
    with tracer.start_as_current_span(f"send {template}", kind=SpanKind.PRODUCER, attributes=attrs) as span:
        if span.is_recording():
            extra = event_attributes(subject, data)
            msg_id = headers.get("Nats-Msg-Id")
            if msg_id:
                extra["messaging.message.id"] = msg_id[:64]
            span.set_attributes(extra)
        out = dict(headers)
        propagate.inject(out)
        yield out
