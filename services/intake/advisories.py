"""Intake's advisory consumer: JetStream give-up advisories -> dead letters on ``BATON_DLQ``.

JetStream publishes ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`` when a message
ran out of deliveries and ``...MSG_TERMINATED.<stream>.<consumer>`` when a consumer terminated one.
Those are core NATS messages; the ``BATON_ADVISORIES`` stream captures them for Baton's service
consumers, and this consumer (durable ``advisories``, run by intake, the gatekeeper) turns each into
one dead letter: the original message fetched by its stream sequence, and the reason.

* terminated with reason :data:`~libs.contracts.dlq.TERM_DEAD_LETTERED`: the service already wrote
  the rich entry (its own code and message): skipped;
* max deliveries: code ``max_deliveries``, "max deliveries exceeded after N deliveries" (the service
  never reached its own last-delivery code: it crashed, hung or was stopped on that message);
* terminated for another reason: code ``terminated`` with the reason the terminating client gave.

The entry's ``Nats-Msg-Id`` is ``dlq-<consumer>-<stream seq>``, the id a service uses for its own entry,
so the two writers never produce two entries for one give-up (see docs/reliability.md).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol, cast

import orjson
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsMessage, NatsRouter, PullSub
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from libs.contracts import DeadLetter, dumps
from libs.contracts.dlq import TERM_DEAD_LETTERED, Advisory, dead_letter_id, service_of_consumer
from libs.contracts.envelope import ID_RE, SLUG_RE
from libs.contracts.subjects import (
    ADVISORY_SUBJECTS,
    CONSUMER_ADVISORIES,
    STREAM_ADVISORIES,
    STREAM_DLQ,
    dlq_subject,
)

log = logging.getLogger("baton.intake.advisories")

MAX_RETRY_DELAY = 30.0


@dataclass(frozen=True)
class Original:
    """The message an advisory is about, read back from its stream."""

    subject: str
    data: bytes
    headers: dict[str, str]


class Publish(Protocol):
    def __call__(self, subject: str, body: bytes, *, msg_id: str, stream: str) -> Awaitable[None]: ...


#: Read message ``seq`` of ``stream``; None when it is gone (aged out, deleted).
GetOriginal = Callable[[str, int], Awaitable[Original | None]]


class AdvisoryOutcome(StrEnum):
    DEAD_LETTERED = "dead_lettered"
    ALREADY_DEAD_LETTERED = "already_dead_lettered"
    IGNORED = "ignored"


class AdvisoryProcessor:
    def __init__(
        self, get_original: GetOriginal, publish: Publish, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.get_original = get_original
        self.publish = publish
        self.clock = clock

    async def process(self, data: bytes) -> AdvisoryOutcome:
        try:
            advisory = Advisory.model_validate_json(data)
        except ValidationError:
            log.warning("ignoring an unreadable advisory: %r", data[:200])
            return AdvisoryOutcome.IGNORED
        service = service_of_consumer(advisory.consumer)
        if advisory.kind == "other" or service is None:
            log.info("ignoring advisory %s for %s/%s", advisory.type, advisory.stream, advisory.consumer)
            return AdvisoryOutcome.IGNORED
        if advisory.kind == "terminated" and advisory.reason.strip() == TERM_DEAD_LETTERED:
            return AdvisoryOutcome.ALREADY_DEAD_LETTERED
        if advisory.kind == "max_deliveries":
            code = "max_deliveries"
            message = f"max deliveries exceeded after {advisory.deliveries} deliveries (consumer {advisory.consumer})"
        else:
            code = "terminated"
            reason = advisory.reason.strip() or "no reason given"
            message = f"terminated by consumer {advisory.consumer} after {advisory.deliveries} deliveries: {reason}"
        original = await self.get_original(advisory.stream, advisory.stream_seq)
        details: dict[str, object] = {
            "source": "advisory",
            "advisory_id": advisory.id[:64],
            "advisory_type": advisory.type[:100],
            "stream": advisory.stream[:64],
            "consumer": advisory.consumer[:64],
            "deliveries": advisory.deliveries,
        }
        if original is None:
            details["original_missing"] = True
        letter = DeadLetter(
            dead_letter_id=dead_letter_id(advisory.consumer, advisory.stream_seq),
            service=service,
            code=code,
            message=message[:1000],
            original_subject=(original.subject if original else "")[:256],
            original_stream_sequence=advisory.stream_seq,
            original_headers=(
                {k: v for k, v in original.headers.items() if len(k) < 100 and len(v) < 1000} if original else {}
            ),
            payload=base64.b64encode(original.data if original else b"").decode(),
            event_id=_event_id_of(original),
            department=_department_of(original),
            dead_lettered_at=self.clock(),
            details=details,
        )
        log.warning("dead-lettering %s/%s seq %d: %s", advisory.stream, advisory.consumer, advisory.stream_seq, message)
        await self.publish(dlq_subject(service, code), dumps(letter), msg_id=letter.dead_letter_id, stream=STREAM_DLQ)
        return AdvisoryOutcome.DEAD_LETTERED


def _event_id_of(original: Original | None) -> str | None:
    if original is None:
        return None
    try:
        doc = orjson.loads(original.data)
    except Exception:
        return None
    value = doc.get("event_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and ID_RE.fullmatch(value) else None


def _department_of(original: Original | None) -> str | None:
    if original is None:
        return None
    parts = original.subject.split(".")
    if len(parts) == 4 and parts[:2] == ["baton", "in"] and SLUG_RE.fullmatch(parts[2]):
        return parts[2]
    return None


def jetstream_getter(get_msg: Callable[..., Awaitable[object]]) -> GetOriginal:
    """Adapt ``JetStreamManager.get_msg`` (the STREAM.MSG.GET API) to :data:`GetOriginal`."""

    async def get(stream: str, seq: int) -> Original | None:
        try:
            raw = await get_msg(stream, seq=seq)
        except NotFoundError:
            return None
        subject = cast("str", getattr(raw, "subject", "") or "")
        data = cast("bytes", getattr(raw, "data", b"") or b"")
        headers = cast("dict[str, str] | None", getattr(raw, "headers", None)) or {}
        return Original(subject, data, {str(k): str(v) for k, v in headers.items()})

    return get


def backoff_delay(base: float, num_delivered: int, cap: float = MAX_RETRY_DELAY) -> float:
    return float(min(base * 2 ** max(num_delivered - 1, 0), cap))


def build_advisory_router(
    processor: AdvisoryProcessor,
    *,
    batch_size: int,
    fetch_timeout: float,
    retry_delay: float,
    inbox_prefix: bytes = b"_INBOX.",  # the service's own (docs/security.md)
) -> NatsRouter:
    """The durable ``advisories`` consumer on ``BATON_ADVISORIES`` (provisioned by Baton).

    Acked only after the dead letter's PubAck; any failure (BATON_DLQ or the source stream unreachable)
    is naked with a growing delay, never terminated: the consumer has no delivery limit.
    """
    router = NatsRouter()

    @router.subscriber(
        ADVISORY_SUBJECTS[0],
        stream=JStream(STREAM_ADVISORIES, declare=False),
        durable=CONSUMER_ADVISORIES,
        pull_sub=PullSub(batch_size=batch_size, timeout=fetch_timeout, batch=True),
        inbox_prefix=inbox_prefix,
        ack_policy=AckPolicy.MANUAL,
        decoder=_raw_batch,
        title="intake:advisories",
        description="JetStream max-deliveries / terminated advisories of Baton's consumers -> BATON_DLQ.",
    )
    async def on_advisories(body: list[bytes], msg: NatsMessage) -> None:
        for raw in cast("list[Msg]", msg.raw_message):
            try:
                await processor.process(raw.data or b"")
            except Exception:
                delay = backoff_delay(retry_delay, raw.metadata.num_delivered)
                log.exception("advisory %s: dead-lettering failed; retrying in %.1fs", raw.subject[:160], delay)
                await raw.nak(delay=delay)
                continue
            await raw.ack()

    return router


async def _raw_batch(msg: NatsMessage) -> list[bytes]:
    return [m.data for m in cast("list[Msg]", msg.raw_message)]
