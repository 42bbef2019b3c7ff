"""Intake's advisory consumer logic (no broker): which advisories become dead letters, and how."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import orjson
import pytest

from libs.contracts import DeadLetter
from libs.contracts.dlq import (
    ADVISORY_MAX_DELIVER,
    ADVISORY_TERMINATED,
    TERM_DEAD_LETTERED,
    dead_letter_id,
    service_of_consumer,
    term_payload,
    wait_out_transient,
)
from libs.contracts.subjects import ADVISORY_SUBJECTS, SubjectError, dlq_replay_subject
from services.intake.advisories import AdvisoryOutcome, AdvisoryProcessor, Original

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str, str]] = []

    async def __call__(self, subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        self.sent.append((subject, body, msg_id, stream))


def advisory(kind: str, **over: object) -> bytes:
    doc = {
        "type": kind,
        "id": "adv1",
        "stream": "BATON_EVENTS",
        "consumer": "metrics",
        "stream_seq": 7,
        "deliveries": 60,
    } | over
    return orjson.dumps(doc)


async def original(stream: str, seq: int) -> Original | None:
    assert (stream, seq) == ("BATON_EVENTS", 7)
    return Original("baton.events.REQ-00000001.created", b'{"event_id":"evt-00000001"}', {"Nats-Msg-Id": "x"})


async def gone(stream: str, seq: int) -> Original | None:
    return None


async def test_max_deliveries_becomes_a_dead_letter_with_the_original() -> None:
    sink = Sink()
    outcome = await AdvisoryProcessor(original, sink, clock=lambda: NOW).process(advisory(ADVISORY_MAX_DELIVER))
    assert outcome is AdvisoryOutcome.DEAD_LETTERED
    [(subject, body, msg_id, stream)] = sink.sent
    letter = DeadLetter.model_validate_json(body)
    assert (subject, msg_id, stream) == ("baton.dlq.metrics.max_deliveries", "dlq-metrics-7", "BATON_DLQ")
    assert letter.message.startswith("max deliveries exceeded after 60 deliveries")
    assert base64.b64decode(letter.payload) == b'{"event_id":"evt-00000001"}'
    assert letter.event_id == "evt-00000001"
    assert letter.original_stream_sequence == 7


async def test_a_termination_by_the_service_itself_is_not_dead_lettered_twice() -> None:
    sink = Sink()
    processor = AdvisoryProcessor(original, sink, clock=lambda: NOW)
    outcome = await processor.process(advisory(ADVISORY_TERMINATED, reason=TERM_DEAD_LETTERED))
    assert outcome is AdvisoryOutcome.ALREADY_DEAD_LETTERED
    assert sink.sent == []
    assert await processor.process(advisory(ADVISORY_TERMINATED, reason="operator")) is AdvisoryOutcome.DEAD_LETTERED
    letter = DeadLetter.model_validate_json(sink.sent[0][1])
    assert letter.code == "terminated"
    assert letter.message.endswith("operator")


async def test_a_vanished_original_or_foreign_consumer_or_garbage() -> None:
    sink = Sink()
    processor = AdvisoryProcessor(gone, sink, clock=lambda: NOW)
    assert await processor.process(advisory(ADVISORY_MAX_DELIVER)) is AdvisoryOutcome.DEAD_LETTERED
    assert DeadLetter.model_validate_json(sink.sent[0][1]).details["original_missing"] is True
    assert await processor.process(advisory(ADVISORY_MAX_DELIVER, consumer="someone")) is AdvisoryOutcome.IGNORED
    assert await processor.process(b"{not json") is AdvisoryOutcome.IGNORED
    assert len(sink.sent) == 1


def test_ids_subjects_and_term_payloads() -> None:
    assert dead_letter_id("routing-timers", 5) == "dlq-routing-timers-5"
    with pytest.raises(ValueError, match="no dead-letter id"):
        dead_letter_id("a.b", 1)
    assert service_of_consumer("dept-it") == "notifier"
    assert service_of_consumer("x") is None
    assert term_payload("dead  lettered\nby me") == b"+TERM dead lettered by me"
    assert term_payload("") == b"+TERM"
    assert dlq_replay_subject(3) == "baton.dlq.replay.3"
    with pytest.raises(SubjectError):
        dlq_replay_subject(0)
    assert "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.BATON_IN.intake" in ADVISORY_SUBJECTS
    assert all("*" not in s and ">" not in s for s in ADVISORY_SUBJECTS)


class Flaky(Exception):
    pass


async def test_wait_out_transient_retries_while_transient_then_returns_or_raises_the_real_failure() -> None:
    beats: list[int] = []
    delays: list[float] = []
    failures: list[BaseException] = [Flaky("db down"), Flaky("db down")]

    async def attempt() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    async def heartbeat() -> None:
        beats.append(1)

    result = await wait_out_transient(
        attempt,
        Flaky("first"),
        (Flaky,),
        heartbeat=heartbeat,
        base_delay=0.001,
        on_retry=lambda _e, d: delays.append(d),
    )
    assert result == "done"
    assert len(beats) == 3
    assert delays == sorted(delays)
    assert delays[-1] > delays[0]

    failures[:] = [Flaky("db down"), ValueError("poison")]
    with pytest.raises(ValueError, match="poison"):
        await wait_out_transient(attempt, Flaky("x"), (Flaky,), heartbeat=heartbeat, base_delay=0.001)
    with pytest.raises(KeyError):  # not transient to begin with: no retry at all
        await wait_out_transient(attempt, KeyError("k"), (Flaky,), heartbeat=heartbeat, base_delay=0.001)
