"""Baton's tracing conventions (libs/telemetry): names, attributes without personal data, where spans hang."""

from __future__ import annotations

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler
from opentelemetry.trace import NoOpTracer, format_span_id, format_trace_id
from opentelemetry.util.types import AttributeValue

from libs.contracts import tracing as telemetry

TITLE = "Badge reader broken in Mrs Example's office"
DESCRIPTION = "Since Monday the reader at door 4 refuses every badge; call Ana on +33 6 00 00 00 00."
CREATED = {
    "type": "created",
    "event_id": "evt-0000000000000001",
    "request_id": "REQ-TRACE00001",
    "occurred_at": "2026-11-22T10:00:00+00:00",
    "actor": {"department": "marketing", "person": "Ana Requester"},
    "title": TITLE,
    "description": DESCRIPTION,
    "category": "ops-task",
    "priority": "normal",
    "requester": {"department": "marketing", "person": "Ana Requester"},
    "attributes": {"room": "door 4, Mrs Example"},
}


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_span_attributes_never_hold_the_title_description_or_any_free_text(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    data = orjson.dumps(CREATED)
    subject = "baton.in.marketing.created"
    with (
        telemetry.process_span(
            tracer, stream="BATON_IN", subject=subject, data=data, parent=telemetry.extract({}), consumer="intake"
        ),
        telemetry.send_span(tracer, "baton.events.REQ-TRACE00001.created", data, {"Nats-Msg-Id": "evt-1x"}),
    ):
        pass
    (send, process) = exporter.get_finished_spans()
    assert process.name == "process BATON_IN"
    assert send.name == "send baton.events"
    assert dict(process.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": subject,
        "messaging.consumer.group.name": "intake",
        "messaging.message.id": "evt-0000000000000001",
        "baton.request_id": "REQ-TRACE00001",
        "baton.event_type": "created",
        "baton.department": "marketing",
    }
    for span in (send, process):
        for key, value in (span.attributes or {}).items():
            for text in (TITLE, DESCRIPTION, "Ana", "Mrs Example", "door 4"):
                assert text not in str(value), f"{span.name}: {key}={value!r}"


def test_identifiers_that_do_not_match_their_pattern_are_left_out() -> None:
    body = {"request_id": "REQ 1; drop table", "type": "Created!", "actor": {"department": "Ana Requester"}}
    assert telemetry.event_attributes("baton.events.x.y", orjson.dumps(body)) == {}
    assert telemetry.event_attributes("baton.events.x.y", b"not json") == {}
    assert telemetry.event_attributes("baton.notify.it.routed", b"[]") == {"baton.department": "it"}


@pytest.mark.parametrize(
    ("subject", "template"),
    [
        ("baton.events.REQ-1234567.created", "baton.events"),
        ("baton.svc.routing.escalated", "baton.svc.routing"),
        ("baton.in.marketing.created", "baton.in"),
        ("baton.notify.it.routed", "baton.notify"),
        ("baton.dlq.intake.validation_failed", "baton.dlq.intake"),
        ("baton.timers.sched.REQ-1234567.it.accept.1.breach", "baton.timers.sched"),
        ("baton.timers.due.REQ-1234567.it.accept.1.breach", "baton.timers.due"),
    ],
)
def test_span_names_use_the_low_cardinality_part_of_the_subject(subject: str, template: str) -> None:
    assert telemetry.destination_template(subject) == template


def _traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


REQUEST_TRACE = "a" * 32
ANCHOR = _traceparent(REQUEST_TRACE, "b" * 16)


def test_created_starts_the_requests_own_trace_linked_to_its_publisher() -> None:
    inbound = telemetry.extract({"traceparent": _traceparent("c" * 32, "d" * 16)})
    parent, links = telemetry.request_parent(None, inbound)
    assert telemetry.span_context_of(parent) is None  # a root: the request's trace
    assert [(format_trace_id(lk.context.trace_id), format_span_id(lk.context.span_id)) for lk in links] == [
        ("c" * 32, "d" * 16)
    ]
    assert telemetry.request_parent(None, telemetry.extract({})) == (parent, [])


def test_a_later_event_from_outside_hangs_under_the_request_with_a_link_to_its_publisher() -> None:
    foreign = telemetry.extract({"traceparent": _traceparent("c" * 32, "d" * 16)})
    parent, links = telemetry.request_parent(ANCHOR, foreign)
    sc = telemetry.span_context_of(parent)
    assert sc is not None
    assert (format_trace_id(sc.trace_id), format_span_id(sc.span_id)) == (REQUEST_TRACE, "b" * 16)
    assert [format_trace_id(lk.context.trace_id) for lk in links] == ["c" * 32]
    parent, links = telemetry.request_parent(ANCHOR, telemetry.extract({}))  # no context at all: no link
    assert telemetry.span_context_of(parent) == sc
    assert links == []


def test_a_message_published_inside_the_requests_trace_is_a_child_of_its_publisher() -> None:
    routing_send = telemetry.extract({"traceparent": _traceparent(REQUEST_TRACE, "e" * 16)})
    parent, links = telemetry.request_parent(ANCHOR, routing_send)
    sc = telemetry.span_context_of(parent)
    assert sc is not None
    assert format_span_id(sc.span_id) == "e" * 16
    assert links == []


def test_requests_recorded_before_their_first_span_was_stored_keep_their_trace_id() -> None:
    anchor = telemetry.legacy_anchor(REQUEST_TRACE)
    ctx = telemetry.context_of(anchor)
    assert ctx is not None
    sc = telemetry.span_context_of(ctx)
    assert sc is not None
    assert format_trace_id(sc.trace_id) == REQUEST_TRACE
    assert telemetry.legacy_anchor(None) is None
    assert telemetry.legacy_anchor("not-hex" * 5) is None


def test_the_sdk_exports_nothing_without_an_otlp_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    silent = telemetry.make_tracer_provider("baton-test")
    assert silent._active_span_processor._span_processors == ()
    assert silent.resource.attributes["service.name"] == "baton-test"

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "intake-eu-1")
    exporting = telemetry.make_tracer_provider("baton-test")
    (processor,) = exporting._active_span_processor._span_processors
    assert type(processor.span_exporter).__name__ == "OTLPSpanExporter"  # type: ignore[attr-defined]
    assert exporting.resource.attributes["service.name"] == "intake-eu-1"
    exporting.shutdown()

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert telemetry.make_tracer_provider("baton-test")._active_span_processor._span_processors == ()
    assert not telemetry.make_tracer_provider("baton-test").exporting
    assert exporting.exporting


def _traceparent_of(headers: dict[str, str]) -> tuple[str, str, str]:
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert version == "00"
    return trace_id, span_id, flags


def test_without_an_exporter_spans_only_propagate_the_trace_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """No processor: nothing is recorded and the body is not parsed for attributes, yet each span has its own
    span id in its parent's trace (a new trace at a root) and injects it, as a recorded span would."""
    parsed: list[str] = []
    real = telemetry.event_attributes

    def counting(subject: str, data: bytes) -> dict[str, AttributeValue]:
        parsed.append(subject)
        return real(subject, data)

    monkeypatch.setattr(telemetry, "event_attributes", counting)
    tracer = telemetry.BatonTracerProvider().get_tracer("test")
    data = orjson.dumps(CREATED)
    parent = telemetry.extract({"traceparent": _traceparent(REQUEST_TRACE, "00f067aa0ba902b7")})
    with (
        telemetry.process_span(
            tracer, stream="BATON_IN", subject="baton.in.marketing.created", data=data, parent=parent
        ) as process,
        telemetry.send_span(tracer, "baton.events.REQ-TRACE00001.created", data, {"Nats-Msg-Id": "evt-1x"}) as headers,
    ):
        assert not process.is_recording()
        process_sc = process.get_span_context()
        assert format_trace_id(process_sc.trace_id) == REQUEST_TRACE
        assert format_span_id(process_sc.span_id) != "00f067aa0ba902b7"
        assert telemetry.current_traceparent() is not None
    trace_id, span_id, flags = _traceparent_of(headers)
    assert trace_id == REQUEST_TRACE
    assert span_id not in (format_span_id(process_sc.span_id), "00f067aa0ba902b7")
    assert flags == "01"
    assert headers["Nats-Msg-Id"] == "evt-1x"
    assert parsed == []

    with telemetry.send_span(tracer, "baton.events.REQ-TRACE00001.created", data, {}) as root_headers:
        pass
    root_trace, _, _ = _traceparent_of(root_headers)
    assert root_trace not in (REQUEST_TRACE, "0" * 32)


@pytest.mark.parametrize("sampler", [ALWAYS_ON, ALWAYS_OFF])
def test_without_an_exporter_the_flags_are_the_sdks(sampler: Sampler) -> None:
    """The sampler still decides (sampled or not), and the flags are those a recorded span would carry."""
    flags = []
    for provider in (TracerProvider(sampler=sampler), telemetry.BatonTracerProvider(sampler=sampler)):
        with telemetry.send_span(provider.get_tracer("test"), "baton.events.R-1.created", b"{}", {}) as headers:
            flags.append(_traceparent_of(headers)[2])
    assert flags[0] == flags[1]
    assert (int(flags[1], 16) & 1) == (sampler is ALWAYS_ON)


def test_a_processor_added_later_turns_recording_on_for_tracers_already_handed_out() -> None:
    provider = telemetry.BatonTracerProvider()
    tracer = provider.get_tracer("test")
    data = orjson.dumps(CREATED)
    with telemetry.send_span(tracer, "baton.events.REQ-TRACE00001.created", data, {}):
        pass
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with telemetry.send_span(tracer, "baton.events.REQ-TRACE00001.created", data, {"Nats-Msg-Id": "evt-1x"}):
        pass
    (send,) = exporter.get_finished_spans()
    assert send.name == "send baton.events"
    assert dict(send.attributes or {})["baton.request_id"] == "REQ-TRACE00001"
    assert dict(send.attributes or {})["messaging.message.id"] == "evt-1x"


def test_an_exporting_service_hangs_its_spans_under_a_service_that_exports_nothing() -> None:
    upstream = telemetry.BatonTracerProvider().get_tracer("intake")
    exporter = InMemorySpanExporter()
    downstream_provider = telemetry.BatonTracerProvider()
    downstream_provider.add_span_processor(SimpleSpanProcessor(exporter))
    downstream = downstream_provider.get_tracer("notifier")
    data = orjson.dumps(CREATED)
    subject = "baton.events.REQ-TRACE00001.created"
    with telemetry.send_span(upstream, subject, data, {}) as headers:
        pass
    trace_id, span_id, _ = _traceparent_of(headers)
    with telemetry.process_span(
        downstream, stream="BATON_EVENTS", subject=subject, data=data, parent=telemetry.extract(headers)
    ):
        pass
    (process,) = exporter.get_finished_spans()
    assert process.parent is not None
    assert format_trace_id(process.context.trace_id) == trace_id
    assert format_span_id(process.parent.span_id) == span_id
    assert dict(process.attributes or {})["baton.request_id"] == "REQ-TRACE00001"


def test_a_disabled_sdk_still_gives_the_no_op_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert isinstance(telemetry.BatonTracerProvider().get_tracer("test"), NoOpTracer)
