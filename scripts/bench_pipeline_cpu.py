"""CPU per canonical event of each service's batch path, in one process, without the broker.

Run: ``.venv/bin/python scripts/bench_pipeline_cpu.py [--lifecycles 400] [--batch 64] [--repeat 5]``.

``baton bench`` measures the whole stack on a real broker, but on a shared 2-core machine its throughput and its
CPU per event move by 10 to 50 % between runs of the same commit (docs/performance.md). This script measures
only what a service's own code costs, so that a change to it can be compared run against run:

* the four services' processors, built as their apps build them (the embedded default: a SQLite file each,
  ``synchronous=FULL``, the tracer of ``make_tracer_provider`` without an exporter unless ``--record-spans``),
  play ``--lifecycles`` full lifecycles (created, routed, accepted, delayed, resolved, feedback) in batches of
  ``--batch``, one event type after the other: intake appends, routing routes (its ``routed`` goes back to
  intake), the notifier and metrics consume every canonical event;
* the broker is replaced by a list: each batch's effects are sent through a producer span, as
  ``jetstream_publish_many`` sends them, and handed to the next stage. What is left out is the broker's
  part: the pull loop, FastStream's subscriber, the sockets, the PubAcks and the acks (``baton bench``'s
  ``raw`` phase measures that part on the real broker);
* CPU time (``time.process_time``: every thread of the process, so SQLite's commits in aiosqlite's thread too)
  is summed around each service's ``process_batch`` calls, and the statements each database received are
  counted. The best of ``--repeat`` runs is printed (the least disturbed by the rest of the machine), with the
  median and the statements per canonical event, which do not depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from sqlalchemy import event

from baton.demo import envelope
from libs.contracts import tracing as telemetry
from libs.contracts.catalog_file import load_catalog
from libs.contracts.publishing import Outgoing
from libs.contracts.subjects import DLQ_PREFIX, STREAM_EVENTS, STREAM_IN, inbound_subject
from services.intake import db as intake_db
from services.intake import handlers as intake
from services.metrics import db as metrics_db
from services.metrics import handlers as metrics
from services.notifier import db as notifier_db
from services.notifier import handlers as notifier
from services.notifier.domain import Directory
from services.routing import db as routing_db
from services.routing import handlers as routing

SERVICES = ("intake", "routing", "notifier", "metrics")
Sent = tuple[str, bytes, dict[str, str]]  # subject, body, headers (trace context included)


class Stage:
    """One service: its processor's batch call, the CPU spent in it, and the statements it sent."""

    def __init__(self, name: str, engine: Any, run: Callable[[list[Any]], Awaitable[Any]], inbound: type) -> None:
        self.name = name
        self.run = run
        self.inbound = inbound
        self.cpu = 0.0
        self.statements = 0
        self.sequence = 0

        def count(*_args: Any) -> None:
            self.statements += 1

        event.listen(engine.sync_engine, "before_cursor_execute", count)

    async def feed(self, sent: Sequence[Sent], batch: int) -> None:
        for start in range(0, len(sent), batch):
            msgs = []
            for subject, body, headers in sent[start : start + batch]:
                self.sequence += 1
                msgs.append(self.inbound(subject, body, headers, self.sequence, 1))
            began = time.process_time()
            await self.run(msgs)
            self.cpu += time.process_time() - began


def sender(tracer: trace.Tracer, sink: list[Sent]) -> Callable[[Sequence[Outgoing]], Awaitable[None]]:
    """A ``PublishMany`` that sends into ``sink``: a producer span per message, as ``jetstream_publish_many``."""

    async def publish_many(items: Sequence[Outgoing]) -> None:
        for item in items:
            with (
                telemetry.within(item.context),
                telemetry.send_span(tracer, item.subject, item.body, item.all_headers()) as headers,
            ):
                sink.append((item.subject, item.body, headers))

    return publish_many


def publisher(tracer: trace.Tracer, sink: list[Sent]) -> Any:
    async def publish(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        with telemetry.send_span(tracer, subject, body, {"Nats-Msg-Id": msg_id}) as headers:
            sink.append((subject, body, headers))

    return publish


def span_factory(tracer: trace.Tracer, stream: str, consumer: str) -> Callable[[Any], AbstractContextManager[Any]]:
    def span(msg: Any) -> AbstractContextManager[Any]:
        return telemetry.process_span(  # type: ignore[no-any-return]
            tracer,
            stream=stream,
            subject=msg.subject,
            data=msg.data,
            parent=telemetry.extract(msg.headers),
            consumer=consumer,
        )

    return span


def intake_span_factory(tracer: trace.Tracer) -> Callable[[Any, str | None], AbstractContextManager[Any]]:
    """Intake's: under the request's own trace (its anchor), linked to the publisher's (``build_router``)."""

    def span(msg: Any, anchor: str | None) -> AbstractContextManager[Any]:
        parent, links = telemetry.request_parent(anchor, telemetry.extract(msg.headers))
        return telemetry.process_span(  # type: ignore[no-any-return]
            tracer,
            stream=STREAM_IN,
            subject=msg.subject,
            data=msg.data,
            parent=parent,
            consumer="intake",
            links=links,
        )

    return span


def lifecycle_events(lifecycles: int, catalog_path: Path) -> list[list[tuple[str, dict[str, Any]]]]:
    """The inbound events of every lifecycle, one list per step, as ``baton bench``'s publishers send them."""
    served = [(d.slug, str(d.categories[0])) for d in load_catalog(catalog_path).departments if d.categories]
    steps: list[list[tuple[str, dict[str, Any]]]] = [[] for _ in range(5)]
    eta = datetime.now(UTC) + timedelta(days=1)
    for n in range(lifecycles):
        requester = served[n % len(served)][0]
        provider, category = served[(n + 1) % len(served)]
        rid = f"BENCH-{uuid.uuid4().hex[:16]}"
        steps[0].append(
            (
                requester,
                envelope("created", rid, requester, person="Bench")
                | {
                    "title": "Bench request",
                    "description": "Published by the pipeline benchmark.",
                    "category": category,
                    "priority": "normal",
                    "requester": {"department": requester, "person": "Bench"},
                    "provider_department": provider,
                },
            )
        )
        accepted = {"assignee": "Bench", "eta": eta.isoformat()}
        steps[1].append((provider, envelope("accepted", rid, provider, person="Bench") | accepted))
        delayed = {"reason": "bench", "new_eta": (eta + timedelta(days=1)).isoformat(), "reason_code": "capacity"}
        steps[2].append((provider, envelope("delayed", rid, provider, person="Bench") | delayed))
        resolved = {"resolution": "Done by the benchmark.", "outcome": "done"}
        steps[3].append((provider, envelope("resolved", rid, provider, person="Bench") | resolved))
        steps[4].append((requester, envelope("feedback", rid, requester, person="Bench") | {"rating": 5}))
    return steps


async def one_run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    catalog = load_catalog(args.catalog)
    provider = telemetry.make_tracer_provider("baton-bench-pipeline")
    if args.record_spans:
        provider.add_span_processor(SpanProcessor())  # recorded by the SDK, then dropped: the cost of recording
    tracer = provider.get_tracer("bench")

    canonical: list[Sent] = []  # intake's canonical events (the next stages' input)
    to_intake: list[Sent] = []  # routing's emitted events (back to intake)
    ignored: list[Sent] = []  # notifications, timer schedules, dead letters

    intake_database = intake_db.Database(f"sqlite+aiosqlite:///{folder}/intake.db")
    routing_database = routing_db.Database(f"sqlite+aiosqlite:///{folder}/routing.db")
    notifier_database = notifier_db.Database(f"sqlite+aiosqlite:///{folder}/notifier.db")
    metrics_database = metrics_db.Database(f"sqlite+aiosqlite:///{folder}/metrics.db")
    await intake_database.start()
    await routing_database.start()
    await notifier_database.start()
    await metrics_database.start()

    intake_proc = intake.IntakeProcessor(
        intake_database, publisher(tracer, canonical), publish_many=sender(tracer, canonical)
    )
    routing_proc = routing.RoutingProcessor(
        routing_database,
        catalog,
        publisher(tracer, to_intake),
        schedule=None,
        publish_many=sender(tracer, to_intake),
        schedule_many=sender(tracer, ignored),
    )
    notifier_proc = notifier.NotifierProcessor(
        notifier_database, publisher(tracer, ignored), Directory(catalog), publish_many=sender(tracer, ignored)
    )
    metrics_proc = metrics.MetricsProcessor(
        metrics_database, publisher(tracer, ignored), publish_many=sender(tracer, ignored)
    )
    outcomes: dict[str, list[Any]] = {name: [] for name in SERVICES}

    def runner(name: str, process: Callable[..., Awaitable[list[Any]]], stream: str) -> Any:
        span = intake_span_factory(tracer) if name == "intake" else span_factory(tracer, stream, name)

        async def run(msgs: list[Any]) -> None:
            outcomes[name].extend(await process(msgs, span))

        return run

    stages = {
        "intake": Stage(
            "intake", intake_database.engine, runner("intake", intake_proc.process_batch, STREAM_IN), intake.Inbound
        ),
        "routing": Stage(
            "routing",
            routing_database.engine,
            runner("routing", routing_proc.process_batch, STREAM_EVENTS),
            routing.Inbound,
        ),
        "notifier": Stage(
            "notifier",
            notifier_database.engine,
            runner("notifier", notifier_proc.process_batch, STREAM_EVENTS),
            notifier.Inbound,
        ),
        "metrics": Stage(
            "metrics",
            metrics_database.engine,
            runner("metrics", metrics_proc.process_batch, STREAM_EVENTS),
            metrics.Inbound,
        ),
    }

    async def canonical_round(inbound: list[Sent]) -> None:
        """Inbound events through intake, then their canonical events through the three consumers."""
        canonical.clear()
        await stages["intake"].feed(inbound, args.batch)
        appended = list(canonical)
        to_intake.clear()
        for name in ("routing", "notifier", "metrics"):
            await stages[name].feed(appended, args.batch)
        if to_intake:  # routing's routed events: one more trip
            await canonical_round(list(to_intake))

    events = 0
    for step in lifecycle_events(args.lifecycles, args.catalog):
        inbound = [
            (inbound_subject(dept, doc["type"]), orjson.dumps(doc), {"Nats-Msg-Id": doc["event_id"]})
            for dept, doc in step
        ]
        events += len(inbound)
        await canonical_round(inbound)
    await intake_database.close()
    await routing_database.close()
    await notifier_database.close()
    await metrics_database.close()

    expected = args.lifecycles * 6
    appended = outcomes["intake"].count(intake.Outcome.APPLIED)
    projected = outcomes["metrics"].count(metrics.Outcome.PROJECTED)
    letters = sum(1 for subject, _, _ in ignored if subject.startswith(DLQ_PREFIX + "."))
    if appended != expected or projected != expected or letters:
        raise SystemExit(
            f"not a clean run: {appended} appended, {projected} projected ({expected} expected), {letters} dead "
            f"letters; intake's outcomes: {sorted(set(outcomes['intake']))}"
        )
    return {
        name: {"cpu_us": stage.cpu / expected * 1e6, "statements": stage.statements / expected}
        for name, stage in stages.items()
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lifecycles", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--catalog", type=Path, default=Path("deploy/catalog.yaml"))
    parser.add_argument("--record-spans", action="store_true", help="record every span (as with an exporter)")
    args = parser.parse_args()
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        os.environ.pop(name, None)
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="baton-pipeline-") as folder:
            runs.append(await one_run(args, Path(folder)))
    print(
        f"{args.lifecycles} lifecycles ({args.lifecycles * 6} canonical events), batches of {args.batch}, "
        f"{args.repeat} runs{', spans recorded' if args.record_spans else ''}"
    )
    print(f"{'service':10} {'CPU us/event best':>18} {'median':>8} {'statements/event':>17}")
    best_total = 0.0
    for name in SERVICES:
        cpu = [run[name]["cpu_us"] for run in runs]
        best_total += min(cpu)
        statements = runs[-1][name]["statements"]
        print(f"{name:10} {min(cpu):18.0f} {statistics.median(cpu):8.0f} {statements:17.2f}")
    totals = [sum(run[name]["cpu_us"] for name in SERVICES) for run in runs]
    print(f"{'the four':10} {min(totals):18.0f} {statistics.median(totals):8.0f}")


if __name__ == "__main__":
    asyncio.run(main())
