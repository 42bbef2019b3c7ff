"""``baton up --demo``: realistic handoffs between departments and a vendor, published with plain
nats-py exactly as a line-of-business system would (``baton.in.<dept>.<type>`` + ``Nats-Msg-Id``).

Each simulated provider reacts to its own ``routed`` notifications: it accepts with an ETA,
sometimes delays with a reason, then resolves; now and then it declines instead. The simulated
requester comments, sometimes reopens, and always closes with feedback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import orjson
from nats.js.api import ConsumerConfig, DeliverPolicy

from libs.contracts.subjects import STREAM_NOTIFY, inbound_subject

log = logging.getLogger("baton.demo")


@dataclass(frozen=True)
class Scenario:
    requester: str
    person: str
    category: str
    title: str
    priority: str
    provider: str | None = None
    watchers: tuple[str, ...] = ()


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("hr", "Priya", "laptop", "Laptop for new hire (starts Monday)", "high", watchers=("facilities",)),
    Scenario("marketing", "Ana", "invoice", "Approve agency invoice INV-4411", "normal"),
    Scenario("marketing", "Ana", "contract-review", "Review influencer contract", "high"),
    Scenario("finance", "Marc", "access", "ERP access for new controller", "urgent"),
    Scenario("it", "Sam", "purchase-order", "PO for 20 monitors", "normal"),
    Scenario("legal", "Grace", "badge", "Badge for external counsel", "low"),
    Scenario(
        "facilities", "Luis", "hardware-repair", "Replace broken meeting-room screen", "normal", provider="acme-it"
    ),
    Scenario("it", "Sam", "onboarding", "Onboarding pack for 3 IT interns", "normal", provider="hr"),
    Scenario("it", "Sam", "nda", "NDA with cloud vendor", "high", watchers=("finance",)),
    Scenario("marketing", "Ana", "maintenance", "Fix the showroom booth lighting", "low", provider="facilities"),
    Scenario("finance", "Marc", "office-move", "Move finance team to 3rd floor", "normal"),
    Scenario("legal", "Grace", "laptop-supply", "Two laptops for the new paralegals", "high", provider="acme-it"),
)

DELAY_REASONS: tuple[tuple[str, str, str | None], ...] = (
    ("supplier backorder", "waiting_on_vendor", "acme-it"),
    ("waiting for the requester's cost centre", "waiting_on_requester", None),
    ("team at capacity this week", "capacity", None),
    ("needs sign-off from finance", "waiting_on_department", "finance"),
)

#: How often the simulated departments decline, comment and reopen (the rest is the happy path).
DECLINE_SHARE = 0.08
COMMENT_SHARE = 0.25
REOPEN_SHARE = 0.10

PEOPLE = {
    "it": "Sam",
    "finance": "Marc",
    "legal": "Grace",
    "facilities": "Luis",
    "hr": "Priya",
    "marketing": "Ana",
    "service-desk": "Kim",
    "acme-it": "Raj",
}


def envelope(event_type: str, request_id: str, dept: str, person: str | None = None) -> dict[str, Any]:
    """A fresh event envelope, as a line-of-business system builds it (shared with ``baton bench``)."""
    return {
        "type": event_type,
        "event_id": f"evt-{uuid.uuid4().hex[:20]}",
        "request_id": request_id,
        "occurred_at": datetime.now(UTC).isoformat(),
        "actor": {"department": dept, "person": person or PEOPLE.get(dept, "Alex")},
        "schema_version": 1,
    }


class Demo:
    """Publishes one new request every ``interval`` seconds and plays every provider."""

    def __init__(
        self,
        nats_url: str,
        *,
        interval: float = 3.0,
        speed: float = 1.0,
        seed: int | None = None,
        options: Callable[[str | None], dict[str, Any]] | None = None,
    ) -> None:
        self.nats_url = nats_url
        #: nats-py ``connect`` keywords per department (its own credential), ``None`` = the operator's
        #: (which watches every 'routed' notification). Unset: one unauthenticated connection for all.
        self.options = options
        self._departments: dict[str, Any] = {}  # slug -> its own connection's JetStream context
        self._connecting = asyncio.Lock()
        self._connections: list[Any] = []
        self.interval = interval
        self.speed = speed  # > 1 = providers react faster
        self.random = random.Random(seed)
        self.created = 0
        self.published = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, *, requests: int | None = None) -> None:
        nc = await nats.connect(
            self.nats_url, name="baton-demo", max_reconnect_attempts=-1, **(self.options(None) if self.options else {})
        )
        self._connections.append(nc)
        js = nc.jetstream()
        # An ephemeral, read-only view of every 'routed' notification: the departments' own durable
        # consumers are left untouched for `baton tail` and real subscribers.
        sub = await js.pull_subscribe(
            "baton.notify.*.routed",
            stream=STREAM_NOTIFY,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, inactive_threshold=60.0),
        )
        provider_loop = asyncio.create_task(self._providers(js, sub))
        try:
            while requests is None or self.created < requests:
                await self._create(js, self.random.choice(SCENARIOS))
                await asyncio.sleep(self.interval)
            # let the open lifecycles finish
            while self._tasks:
                await asyncio.wait(set(self._tasks), timeout=1.0)
        finally:
            provider_loop.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(provider_loop, *self._tasks, return_exceptions=True)
            for conn in self._connections:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 5)

    async def _as(self, dept: str, js: Any) -> Any:
        """The JetStream context that publishes as ``dept``: its own login when ``options`` is set."""
        if self.options is None:
            return js
        async with self._connecting:
            if dept not in self._departments:
                conn = await nats.connect(
                    self.nats_url, name=f"baton-demo-{dept}", max_reconnect_attempts=-1, **self.options(dept)
                )
                self._connections.append(conn)
                self._departments[dept] = conn.jetstream()
        return self._departments[dept]

    async def _publish(self, js: Any, dept: str, event: dict[str, Any]) -> None:
        js = await self._as(dept, js)
        await js.publish(
            inbound_subject(dept, event["type"]), orjson.dumps(event), headers={"Nats-Msg-Id": event["event_id"]}
        )
        self.published += 1

    async def _create(self, js: Any, scenario: Scenario) -> None:
        request_id = f"REQ-{uuid.uuid4().hex[:8].upper()}"
        event = envelope("created", request_id, scenario.requester) | {
            "title": scenario.title,
            "description": f"Raised by {scenario.person} in {scenario.requester}.",
            "category": scenario.category,
            "priority": scenario.priority,
            "requester": {"department": scenario.requester, "person": scenario.person},
            "watchers": list(scenario.watchers),
            "due_by": (datetime.now(UTC) + timedelta(days=5)).isoformat(),
        }
        if scenario.provider:
            event["provider_department"] = scenario.provider
        await self._publish(js, scenario.requester, event)
        self.created += 1
        log.info("%s raised %s: %s", scenario.requester, request_id, scenario.title)

    async def _providers(self, js: Any, sub: Any) -> None:
        while True:
            try:
                msgs = await sub.fetch(20, timeout=1.0)
            except TimeoutError:
                continue
            for msg in msgs:
                await msg.ack()
                note = orjson.loads(msg.data)
                if note.get("role") != "provider":
                    continue
                serve = self._serve(js, note["department"], note["request_id"], note.get("requester_department"))
                task = asyncio.create_task(serve)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _pause(self, low: float, high: float) -> None:
        await asyncio.sleep(self.random.uniform(low, high) / self.speed)

    async def _serve(self, js: Any, dept: str, request_id: str, requester: str | None) -> None:
        """One provider's side of a request (accept, maybe delay, resolve), and the requester's answer
        (a comment now and then, sometimes a reopening, then feedback). Some requests are declined."""
        await self._pause(1, 4)
        if self.random.random() < DECLINE_SHARE:
            declined = envelope("declined", request_id, dept) | {"reason": "Not something we handle, sorry."}
            await self._publish(js, dept, declined)  # routing re-routes it, or returns it to the requester
            return
        for round_ in range(2):
            eta = await self._work(js, dept, request_id)
            if requester and round_ == 0 and self.random.random() < COMMENT_SHARE:
                comment = envelope("commented", request_id, requester) | {"comment": "Any news? We need it soon."}
                await self._publish(js, requester, comment)
            await self._pause(2, 8)
            outcome = self.random.choice(("done", "done", "done", "wont_fix"))
            resolved = envelope("resolved", request_id, dept) | {
                "resolution": f"Done, see the ticket notes (ETA was {eta:%a %H:%M}).",
                "outcome": outcome,
            }
            await self._publish(js, dept, resolved)
            if requester is None:
                return
            await self._pause(1, 4)
            if round_ == 0 and self.random.random() < REOPEN_SHARE:
                reopened = envelope("reopened", request_id, requester) | {"reason": "Still not working, sorry."}
                await self._publish(js, requester, reopened)
                await self._pause(1, 3)
                continue  # the same department accepts it again
            rating = self.random.choice((5, 5, 4, 4, 4, 3, 2))
            feedback = envelope("feedback", request_id, requester) | {
                "rating": rating,
                "comment": "Thanks!" if rating >= 4 else "Took longer than promised.",
            }
            await self._publish(js, requester, feedback)
            return

    async def _work(self, js: Any, dept: str, request_id: str) -> datetime:
        """Accept with an ETA, then maybe delay it once or twice; returns the last ETA."""
        eta = datetime.now(UTC) + timedelta(hours=self.random.choice((4, 8, 24, 48)))
        accepted = envelope("accepted", request_id, dept) | {
            "assignee": PEOPLE.get(dept, "Alex"),
            "eta": eta.isoformat(),
        }
        await self._publish(js, dept, accepted)
        for _ in range(self.random.choice((0, 0, 1, 1, 2))):
            await self._pause(2, 6)
            eta += timedelta(hours=self.random.choice((4, 24, 48)))
            reason, code, blocking = self.random.choice(DELAY_REASONS)
            delayed = envelope("delayed", request_id, dept) | {
                "reason": reason,
                "new_eta": eta.isoformat(),
                "reason_code": code,
            }
            if blocking and blocking != dept:
                delayed["blocking_department"] = blocking
            await self._publish(js, dept, delayed)
        return eta
