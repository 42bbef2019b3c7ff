"""Rebuild metrics' projection from the canonical log (``baton metrics rebuild``).

The log ``BATON_EVENTS`` is read from its first message with an *ephemeral ordered consumer* (no
durable state is touched, the live ``metrics`` consumer keeps its place) up to the last message
present when the rebuild started, through the very same :class:`MetricsProcessor` the service uses,
into a fresh database. The fresh projection is then compared with the live one, table by table,
and (with ``replace``) swapped in.

Messages the live service dead-lettered are refused again here, but not dead-lettered a second
time: the rebuild publishes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.js.api import DeliverPolicy
from sqlalchemy import select

from libs.contracts import parse_event
from libs.contracts.subjects import EVENTS_PREFIX, STREAM_EVENTS

from . import db
from .domain import parties
from .handlers import Inbound, MetricsProcessor, Outcome

log = logging.getLogger("baton.metrics.rebuild")


@dataclass
class RebuildReport:
    through_stream_sequence: int
    messages: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # dead-letter code -> count (not re-published)
    differences: dict[str, dict[str, int]] = field(default_factory=dict)
    replaced: bool = False
    kept_newer: int = 0

    @property
    def identical(self) -> bool:
        return all(not any(d.values()) for d in self.differences.values())

    def lines(self) -> list[str]:
        out = [
            f"read {self.messages} messages of {STREAM_EVENTS} (through stream sequence {self.through_stream_sequence})"
        ]
        out.append("outcomes: " + (", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())) or "none"))
        if self.refused:
            out.append(
                "refused (already dead-lettered by the service): "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.refused.items()))
            )
        for table, diff in self.differences.items():
            out.append(f"{table}: " + ", ".join(f"{k} {v}" for k, v in diff.items()))
        out.append(
            "the rebuilt projection is identical to the live one" if self.identical else "the projections differ"
        )
        if self.replaced:
            out.append(f"replaced the live projection (kept {self.kept_newer} live events newer than the rebuild)")
        return out


async def read_log(
    nats_url: str,
    processor: MetricsProcessor,
    report: RebuildReport,
    idle_timeout: float = 10.0,
    options: dict[str, Any] | None = None,
) -> None:
    """Feed every message of the canonical log, in stream order, to ``processor``.
    ``options``: nats-py ``connect`` keywords (the metrics service's NATS login, TLS)."""
    servers = [s.strip() for s in nats_url.split(",") if s.strip()]
    nc = await nats.connect(
        servers, name="baton-metrics-rebuild", connect_timeout=5, max_reconnect_attempts=5, **(options or {})
    )
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM_EVENTS)
        report.through_stream_sequence = info.state.last_seq
        if info.state.messages == 0:
            return
        sub = await js.subscribe(
            f"{EVENTS_PREFIX}.>", stream=STREAM_EVENTS, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        try:
            while True:
                msg = await sub.next_msg(timeout=idle_timeout)
                meta = msg.metadata
                inbound = Inbound(msg.subject, msg.data or b"", dict(msg.headers or {}), meta.sequence.stream, 1)
                outcome = await processor.process(inbound)
                report.messages += 1
                report.outcomes[outcome.value] = report.outcomes.get(outcome.value, 0) + 1
                if meta.sequence.stream >= report.through_stream_sequence:
                    return
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()


async def rebuild(
    nats_url: str,
    live_url: str,
    *,
    scratch_url: str | None = None,
    replace: bool = False,
    idle_timeout: float = 10.0,
    options: dict[str, Any] | None = None,
) -> RebuildReport:
    """Rebuild into ``scratch_url`` (a temporary SQLite file by default), compare with ``live_url``, maybe replace."""
    report = RebuildReport(through_stream_sequence=0)
    with tempfile.TemporaryDirectory(prefix="baton-metrics-rebuild-") as tmp:
        scratch = db.Database(scratch_url or f"sqlite+aiosqlite:///{Path(tmp) / 'rebuild.db'}")
        live = db.Database(live_url)
        try:
            await scratch.start()
            async with scratch.transaction() as session:
                for table in reversed(db.TABLES):
                    await session.execute(table.__table__.delete())  # type: ignore[attr-defined]
            await live.start()

            async def refuse(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
                code = subject.rsplit(".", 1)[-1]
                report.refused[code] = report.refused.get(code, 0) + 1

            processor = MetricsProcessor(scratch, refuse)
            await read_log(nats_url, processor, report, idle_timeout, options)
            async with scratch.transaction() as s_session, live.transaction() as l_session:
                report.differences = db.differences(await db.snapshot(l_session), await db.snapshot(s_session))
            if replace:
                report.kept_newer = await _replace(live, scratch, report.through_stream_sequence)
                report.replaced = True
        finally:
            await scratch.close()
            await live.close()
    return report


async def _replace(live: db.Database, scratch: db.Database, through: int) -> int:
    """Swap the rebuilt rows in; live events newer than the rebuild are kept (the service may be running)."""
    async with scratch.transaction() as session:
        rows = await db.dump_all(session)
    async with live.transaction() as session:
        newer = list(
            (await session.execute(select(db.EventRow).where(db.EventRow.stream_sequence > through))).scalars()
        )
        kept: list[dict[str, Any]] = [
            {c.name: getattr(row, c.name) for c in db.EventRow.__table__.columns} for row in newer
        ]
        await db.replace_all(session, rows)
        for values in kept:
            if await db.insert_event(session, values) is db.Stored.INSERTED:
                event = parse_event(values["canonical"])
                await db.add_parties(session, event.request_id, parties(event))
        for request_id in sorted({v["request_id"] for v in kept}):
            await db.refresh_facts(session, request_id)
    return len(kept)


def run(nats_url: str, live_url: str, **kwargs: Any) -> RebuildReport:
    return asyncio.run(rebuild(nats_url, live_url, **kwargs))


__all__ = ["Outcome", "RebuildReport", "read_log", "rebuild", "run"]
