"""The fault tests' oracle: publish N lifecycles, then check every effect Baton should have had.

A lifecycle is ``created -> routed (by routing) -> accepted -> delayed -> resolved -> feedback``,
raised by a department from the example catalog and served by whichever department routing picks.
It is published with plain nats-py (``baton.in.<dept>.<type>`` + ``Nats-Msg-Id``, waiting for each
PubAck, retrying on a broken connection with the same id) and each event only after the previous
one is in the canonical log, as a department's system would act on what it is told.

At the end :meth:`Oracle.check` reads everything back and classifies each expected effect:

* the canonical log (``BATON_EVENTS``): one event per (request, sequence), sequences 1..6 in order;
* every department's notification stream (``BATON_NOTIFY``): one notification per (department,
  request, event type), to exactly the departments that hear it (:data:`HEARS`, the rows of
  ``services/notifier/domain.py``'s ``WHO_HEARS`` these lifecycles use);
* the projections: metrics' timeline, intake's ``GET /v1/requests/{id}`` and routing's decisions;
* dead letters (``BATON_DLQ``): none, unless the scenario expects them.

``ok`` = present exactly once; ``lost`` = missing; ``duplicated`` = present more than once;
``unexpected`` = present but not expected (another type, another department, a dead letter).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import orjson
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from baton.cmd_tokens import token_from_file
from baton.demo import envelope
from baton.supervisor import Stack
from libs.contracts.subjects import (
    CONSUMER_INTAKE,
    CONSUMER_METRICS,
    CONSUMER_NOTIFIER,
    CONSUMER_ROUTING,
    STREAM_DLQ,
    STREAM_EVENTS,
    STREAM_IN,
    STREAM_NOTIFY,
    event_subject,
    inbound_subject,
)

#: The lifecycle every request goes through; routing publishes ``routed``.
LIFECYCLE = ("created", "routed", "accepted", "delayed", "resolved", "feedback")

#: Who hears each of these events (notifier's WHO_HEARS, restricted to one provider and no reassignment):
#: R = requester, P = provider (the holder, also the only past holder), W = watchers.
HEARS: dict[str, str] = {
    "created": "RW",
    "routed": "RP",
    "accepted": "RP",
    "delayed": "RPW",
    "resolved": "RPW",
    "feedback": "RP",
}

#: Requesters, categories (served by another department) and watchers the lifecycles are drawn from.
SHAPES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("marketing", "laptop", ()),
    ("hr", "laptop", ("facilities",)),
    ("marketing", "invoice", ()),
    ("finance", "access", ()),
    ("it", "purchase-order", ("legal",)),
    ("legal", "badge", ()),
    ("marketing", "contract-review", ("finance",)),
    ("finance", "nda", ()),
)

WAIT_CANONICAL = 120.0  # bounded waits only: the test fails with the counts, never hangs
CATEGORIES = ("canonical", "notify", "timeline", "intake", "routing", "dlq")


@dataclass
class Lifecycle:
    request_id: str
    requester: str
    category: str
    watchers: tuple[str, ...]
    provider: str | None = None
    #: how many LIFECYCLE events are expected (a poison request stops after ``created``)
    expected_length: int = len(LIFECYCLE)
    #: event type -> the inbound event published for it (routed is routing's)
    published: dict[str, dict[str, Any]] = field(default_factory=dict)

    def hears(self, event_type: str) -> set[str]:
        roles = HEARS[event_type]
        who: set[str] = set()
        if "R" in roles:
            who.add(self.requester)
        if "P" in roles and self.provider:
            who.add(self.provider)
        if "W" in roles:
            who.update(self.watchers)
        return who


@dataclass
class Counts:
    ok: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if kind != "ok" and len(self.examples) < 8:
            self.examples.append(f"{kind}: {what}")


@dataclass
class Report:
    scenario: str
    by_category: dict[str, Counts]
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def total(self, kind: str) -> int:
        return sum(getattr(c, kind) for c in self.by_category.values())

    @property
    def clean(self) -> bool:
        return not (self.total("lost") or self.total("duplicated") or self.total("unexpected"))

    def line(self) -> str:
        parts = [
            f"{self.scenario:<28} effects={sum(self.total(k) for k in ('ok', 'lost', 'duplicated')):>5}",
            f"ok={self.total('ok'):>5} lost={self.total('lost')} duplicated={self.total('duplicated')}",
            f"unexpected={self.total('unexpected')}",
            f"({self.seconds:.1f}s)",
        ]
        parts += [f"{k}={v}" for k, v in self.notes.items()]
        return " ".join(parts)

    def details(self) -> str:
        rows = []
        for name, c in self.by_category.items():
            rows.append(f"  {name:<10} ok={c.ok} lost={c.lost} duplicated={c.duplicated} unexpected={c.unexpected}")
            rows += [f"    {e}" for e in c.examples]
        return "\n".join(rows)


def new_request_id(rng: random.Random) -> str:
    return f"REQ-F{rng.getrandbits(40):010X}"


class Oracle:
    """Publishes lifecycles into a running :class:`Stack` and checks what came out."""

    def __init__(self, stack: Stack, n: int, *, seed: int = 7, interval: float = 0.25, concurrency: int = 12) -> None:
        self.stack = stack
        self.rng = random.Random(seed)
        self.interval = interval
        self.concurrency = concurrency
        self.lifecycles: list[Lifecycle] = []
        for _ in range(n):
            requester, category, watchers = self.rng.choice(SHAPES)
            self.lifecycles.append(Lifecycle(new_request_id(self.rng), requester, category, watchers))
        self.nc: NATS | None = None
        self.publish_retries = 0
        self.pubacks_duplicate = 0
        #: (dept, request_id, type) notifications a scenario expects on top of the lifecycle (e.g. rejections)
        self.extra_notifications: Counter[tuple[str, str, str]] = Counter()
        #: dead letters a scenario expects: (service, request_id, code)
        self.expected_dead_letters: Counter[tuple[str, str | None, str]] = Counter()
        #: routing decisions a scenario expects on top of the routed lifecycles: (request_id, provider)
        self.extra_routing: Counter[tuple[str, str]] = Counter()
        #: stream sequences on BATON_EVENTS the test itself put there (stale copies), not intake
        self.injected_sequences: set[int] = set()
        #: a hook per event: ``(lifecycle, event_type, event) -> awaitable`` replaces the plain publish
        self.publish_hook: Callable[[Lifecycle, str, dict[str, Any]], Awaitable[None]] | None = None

    # --- connection ------------------------------------------------------------------
    async def connect(self) -> NATS:
        self.nc = await nats.connect(
            self.stack.nats_url,
            name="faults-oracle",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            **self.stack.client_options(),  # the operator login (the stack runs with NATS users)
        )
        return self.nc

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)

    # --- publishing ------------------------------------------------------------------
    async def publish(self, dept: str, event: dict[str, Any], *, msg_id: str | None = None) -> bool:
        """Publish until a PubAck arrives (same ``Nats-Msg-Id`` on every try); True if it was a duplicate."""
        assert self.nc is not None
        js = self.nc.jetstream()
        deadline = time.monotonic() + WAIT_CANONICAL
        while True:
            try:
                ack = await js.publish(
                    inbound_subject(dept, event["type"]),
                    orjson.dumps(event),
                    headers={"Nats-Msg-Id": msg_id or event["event_id"]},
                    timeout=2.0,
                )
            except Exception:
                if time.monotonic() > deadline:
                    raise
                self.publish_retries += 1
                await asyncio.sleep(0.5)
                continue
            if ack.duplicate:
                self.pubacks_duplicate += 1
            return bool(ack.duplicate)

    async def canonical(self, request_id: str, event_type: str, within: float = WAIT_CANONICAL) -> dict[str, Any]:
        """Wait for ``event_type`` of ``request_id`` in the canonical log; its body."""
        assert self.nc is not None
        jsm = self.nc.jsm()
        deadline = time.monotonic() + within
        last_error: BaseException | None = None
        while True:
            try:
                msg = await jsm.get_last_msg(STREAM_EVENTS, event_subject(request_id, event_type))
                assert msg.data is not None
                return dict(orjson.loads(msg.data))
            except NotFoundError:
                pass
            except Exception as exc:  # NATS restarting: try again
                last_error = exc
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{event_type} of {request_id} never reached {STREAM_EVENTS} within {within:.0f}s "
                    f"(last error: {last_error!r})\n{await self.diagnose(request_id)}"
                )
            await asyncio.sleep(0.2)

    async def diagnose(self, request_id: str) -> str:
        """What a stuck request looks like from outside: the consumers' state and the services' log lines about
        it (printed with a timeout, so that a failure in CI says where the event stopped)."""
        lines: list[str] = []
        assert self.nc is not None
        jsm = self.nc.jsm()
        for stream, durable in (
            (STREAM_IN, CONSUMER_INTAKE),
            (STREAM_EVENTS, CONSUMER_ROUTING),
            (STREAM_EVENTS, CONSUMER_NOTIFIER),
            (STREAM_EVENTS, CONSUMER_METRICS),
        ):
            try:
                info = await jsm.consumer_info(stream, durable)
                lines.append(
                    f"  consumer {stream}/{durable}: pending={info.num_pending} ack_pending={info.num_ack_pending} "
                    f"redelivered={info.num_redelivered} waiting={info.num_waiting} "
                    f"delivered={info.delivered.stream_seq if info.delivered else '?'} "
                    f"ack_floor={info.ack_floor.stream_seq if info.ack_floor else '?'}"
                )
            except Exception as exc:
                lines.append(f"  consumer {stream}/{durable}: {exc!r}")
        for name, svc in self.stack.services.items():
            try:
                text = svc.log_path.read_text(errors="replace").splitlines()
            except OSError as exc:
                lines.append(f"  {name} log: {exc!r}")
                continue
            about = [x for x in text if request_id in x or " ERROR " in x or "WARNING" in x]
            lines.append(f"  {name} log ({svc.log_path}): {len(about)} lines about it or at WARNING/ERROR; last 15:")
            lines += [f"    {x[:300]}" for x in about[-15:]]
        return "\n".join(lines)

    def build(self, lc: Lifecycle, event_type: str) -> tuple[str, dict[str, Any]]:
        """The inbound event ``event_type`` of ``lc`` and the department that publishes it."""
        now = datetime.now(UTC)
        if event_type == "created":
            body = envelope("created", lc.request_id, lc.requester) | {
                "title": f"Fault test {lc.request_id} ({lc.category})",
                "category": lc.category,
                "priority": "low",
                "requester": {"department": lc.requester, "person": "Tester"},
                "watchers": list(lc.watchers),
            }
            return lc.requester, body
        assert lc.provider is not None
        if event_type == "accepted":
            body = envelope("accepted", lc.request_id, lc.provider) | {
                "assignee": "Fixer",
                "eta": (now + timedelta(days=2)).isoformat(),
            }
            return lc.provider, body
        if event_type == "delayed":
            body = envelope("delayed", lc.request_id, lc.provider) | {
                "reason": "supplier backorder",
                "new_eta": (now + timedelta(days=3)).isoformat(),
                "reason_code": "waiting_on_vendor",
            }
            return lc.provider, body
        if event_type == "resolved":
            body = envelope("resolved", lc.request_id, lc.provider) | {"resolution": "Done", "outcome": "done"}
            return lc.provider, body
        if event_type == "feedback":
            return lc.requester, envelope("feedback", lc.request_id, lc.requester) | {"rating": 5, "comment": "ok"}
        raise ValueError(event_type)

    async def play(self, lc: Lifecycle) -> None:
        for event_type in LIFECYCLE:
            if event_type == "routed":
                routed = await self.canonical(lc.request_id, "routed")
                lc.provider = routed["provider_department"]
                continue
            dept, event = self.build(lc, event_type)
            lc.published[event_type] = event
            if self.publish_hook is not None:
                await self.publish_hook(lc, event_type, event)
            else:
                await self.publish(dept, event)
            await self.canonical(lc.request_id, event_type)

    async def run(self, lifecycles: Iterable[Lifecycle] | None = None) -> float:
        """Play every lifecycle (a new one every ``interval`` seconds, at most ``concurrency`` at once)."""
        started = time.monotonic()
        gate = asyncio.Semaphore(self.concurrency)

        async def one(lc: Lifecycle) -> None:
            async with gate:
                await self.play(lc)

        tasks = []
        for lc in lifecycles if lifecycles is not None else self.lifecycles:
            tasks.append(asyncio.create_task(one(lc)))
            await asyncio.sleep(self.interval)
        await asyncio.gather(*tasks)
        return time.monotonic() - started

    # --- reading back ----------------------------------------------------------------
    async def read_all(self, stream: str, subject: str) -> list[tuple[int, str, dict[str, Any]]]:
        """Every message on ``subject`` in ``stream``: (stream sequence, subject, body)."""
        assert self.nc is not None
        js = self.nc.jetstream()
        sub = await js.pull_subscribe(
            subject, stream=stream, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0)
        )
        found: list[tuple[int, str, dict[str, Any]]] = []
        try:
            while True:
                try:
                    msgs = await sub.fetch(500, timeout=0.5)
                except (TimeoutError, nats.errors.TimeoutError):
                    break
                for m in msgs:
                    found.append((m.metadata.sequence.stream, m.subject, orjson.loads(m.data)))
                    await m.ack()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return found

    async def check(self, scenario: str, *, within: float = WAIT_CANONICAL, lifecycles: list[Lifecycle] | None = None,
                    ) -> Report:  # fmt: skip
        """Classify every effect, polling until everything is ok or ``within`` seconds passed."""
        started = time.monotonic()
        deadline = started + within
        while True:
            report = await self._check_once(scenario, lifecycles if lifecycles is not None else self.lifecycles)
            if report.clean or time.monotonic() > deadline:
                report.seconds = time.monotonic() - started
                return report
            await asyncio.sleep(2.0)

    async def _check_once(self, scenario: str, lifecycles: list[Lifecycle]) -> Report:
        counts = {name: Counts() for name in CATEGORIES}
        mine = {lc.request_id: lc for lc in lifecycles}

        # the canonical log
        canonical = await self.read_all(STREAM_EVENTS, "baton.events.>")
        seen: Counter[tuple[str, int, str]] = Counter()
        for seq, _subject, body in canonical:
            if seq in self.injected_sequences or body.get("request_id") not in mine:
                continue
            seen[(body["request_id"], int(body["sequence"]), body["type"])] += 1
        classify(counts["canonical"], expected_log(lifecycles), seen)

        # every department's notifications
        notes = await self.read_all(STREAM_NOTIFY, "baton.notify.>")
        heard: Counter[tuple[str, str, str]] = Counter()
        for _seq, subject, body in notes:
            rid = body.get("request_id")
            if rid not in mine:
                continue
            heard[(subject.split(".")[2], rid, body.get("type", "?"))] += 1
        expected_notes: Counter[tuple[str, str, str]] = Counter()
        for lc in lifecycles:
            for event_type in LIFECYCLE[: lc.expected_length]:
                for dept in lc.hears(event_type):
                    expected_notes[(dept, lc.request_id, event_type)] += 1
        expected_notes.update({k: v for k, v in self.extra_notifications.items() if k[1] in mine})
        classify(counts["notify"], expected_notes, heard)

        # dead letters
        letters = await self.read_all(STREAM_DLQ, "baton.dlq.>")
        dead: Counter[tuple[str, str | None, str]] = Counter()
        for _seq, _subject, body in letters:
            dead[(body["service"], dead_letter_request(body), body["code"])] += 1
        classify(counts["dlq"], self.expected_dead_letters, dead, count_ok=True)

        # projections over HTTP
        operator = {"Authorization": f"Bearer {token_from_file(self.stack.data_dir / 'tokens.txt', None)}"}
        metrics = self.stack.services["metrics"].url
        intake = self.stack.services["intake"].url
        routing = self.stack.services["routing"].url
        gate = asyncio.Semaphore(8)
        async with httpx.AsyncClient(timeout=10, headers=operator) as client:

            async def get(url: str) -> dict[str, Any] | None:
                async with gate:
                    with contextlib.suppress(httpx.HTTPError):
                        response = await client.get(url)
                        if response.status_code == 200:
                            return dict(response.json())
                    return None

            timelines = await asyncio.gather(*(get(f"{metrics}/v1/requests/{r}/timeline") for r in mine))
            views = await asyncio.gather(*(get(f"{intake}/v1/requests/{r}") for r in mine))
            decisions = await asyncio.gather(*(get(f"{routing}/v1/requests/{r}/routing") for r in mine))
        line: Counter[tuple[str, int, str]] = Counter()
        stored: Counter[tuple[str, int, str]] = Counter()
        routed: Counter[tuple[str, str]] = Counter()
        for rid, t, v, d in zip(mine, timelines, views, decisions, strict=True):
            for e in (t or {}).get("events", []):
                line[(rid, int(e["sequence"]), e["type"])] += 1
            for e in (v or {}).get("events", []):
                stored[(rid, int(e["sequence"]), e["type"])] += 1
            for decision in (d or {}).get("decisions", []):
                routed[(rid, decision["provider_department"])] += 1
        classify(counts["timeline"], expected_log(lifecycles), line)
        classify(counts["intake"], expected_log(lifecycles), stored)
        expected_routing = Counter({(lc.request_id, lc.provider or "?"): 1 for lc in lifecycles if lc.provider})
        expected_routing.update({k: v for k, v in self.extra_routing.items() if k[0] in mine})
        classify(counts["routing"], expected_routing, routed)
        return Report(scenario, counts)


def expected_log(lifecycles: Iterable[Lifecycle]) -> Counter[tuple[str, int, str]]:
    return Counter(
        {
            (lc.request_id, index, event_type): 1
            for lc in lifecycles
            for index, event_type in enumerate(LIFECYCLE[: lc.expected_length], start=1)
        }
    )


def classify(counts: Counts, expected: Counter[Any], actual: Counter[Any], *, count_ok: bool = True) -> None:
    for key, want in expected.items():
        got = actual.get(key, 0)
        if got == want:
            if count_ok:
                counts.add("ok", str(key))
        elif got < want:
            counts.add("lost", str(key))
        else:
            counts.add("duplicated", f"{key} x{got}")
    for key, got in actual.items():
        if key not in expected:
            counts.add("unexpected", f"{key} x{got}")


def dead_letter_request(letter: dict[str, Any]) -> str | None:
    """The request a dead letter is about, read from its original payload when it is JSON."""
    try:
        doc = orjson.loads(base64.b64decode(letter.get("payload", "")))
    except (orjson.JSONDecodeError, ValueError):
        return None
    value = doc.get("request_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def show(report: Report, capsys: Any) -> None:
    """Print the count line (and the details when something is off) in the test output, even without -s."""
    with capsys.disabled():
        print(f"\n[faults] {report.line()}")
        if not report.clean:
            print(report.details())


def assert_clean(report: Report) -> None:
    assert report.total("lost") == 0, report.details()
    assert report.total("duplicated") == 0, report.details()
    assert report.total("unexpected") == 0, report.details()
    assert report.total("ok") > 0
