"""Notifier's background workers: webhook delivery and digests. Both read their work from the database,
so they pick up exactly where they stopped after a restart.

**WebhookWorker.** Each tick finds the subscriptions that have deliveries due, and for each one
starts at most ``per_subscription`` attempts (and at most ``concurrency`` in all). A slow or dead
endpoint therefore holds at most ``per_subscription`` slots, each for at most ``timeout`` seconds,
and every other subscription keeps being served. An attempt first *leases* its row (so that two
notifier replicas never POST the same delivery at once; a lease left by a killed process expires),
then POSTs, then records the outcome: delivered, retry at ``now + backoff``, or dead (still failing
``give_up_after`` seconds after it was queued). Delivery is at least once.

**DigestWorker.** Each tick groups the notifications held for a digest by department, period and
window; every window that has closed becomes one digest (one transaction: the digest row, the
notifications claimed, the webhook deliveries queued), then every unpublished digest is published
on ``baton.notify.<dept>.digest`` with ``Nats-Msg-Id`` = its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.util.types import AttributeValue
from sqlalchemy.exc import IntegrityError

from libs.contracts import Notification
from libs.contracts import tracing as telemetry
from libs.contracts.subjects import STREAM_NOTIFY, notify_subject

from . import db
from .digest import Held, build_digest
from .domain import Delivery, Directory, digest_window
from .handlers import Publish
from .webhooks import SIGNATURE_HEADER, Format, RetryPolicy, render_body, sign

log = logging.getLogger("baton.notifier.webhooks")
USER_AGENT = "baton-notifier/1"
#: How much longer than the HTTP timeout a lease lasts (the attempt's own bookkeeping).
LEASE_MARGIN = 5.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Attempt:
    delivery_id: str
    subscription_id: str
    notification_id: str
    kind: str
    body: bytes
    traceparent: str | None
    department: str
    request_id: str | None
    attempts: int
    created_at: datetime


class WebhookWorker:
    def __init__(
        self,
        database: db.Database,
        *,
        policy: RetryPolicy,
        timeout: float = 10.0,
        poll_interval: float = 0.5,
        concurrency: int = 32,
        per_subscription: int = 2,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], datetime] = _utcnow,
        transport: httpx.AsyncBaseTransport | None = None,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        self.db = database
        self.policy = policy
        self.on_outcome = on_outcome
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.concurrency = concurrency
        self.per_subscription = per_subscription
        self.tracer = tracer or trace.get_tracer("baton.notifier")
        self.clock = clock
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._inflight: dict[str, int] = defaultdict(int)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._rng = random.Random()  # jitter, not security
        self.attempted = 0

    def wake(self) -> None:
        """New deliveries were queued: look now instead of at the next poll."""
        self._wake.set()

    @property
    def busy(self) -> int:
        return sum(self._inflight.values())

    async def run(self) -> None:
        self._client = httpx.AsyncClient(
            transport=self._transport,
            timeout=self.timeout,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
            headers={"User-Agent": USER_AGENT},
        )
        try:
            while not self._stopping:
                try:
                    await self.tick()
                except Exception:
                    log.exception("webhook tick failed; trying again")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        finally:
            await self._drain()
            await self._client.aclose()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def _drain(self, grace: float = 5.0) -> None:
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()  # its lease expires and another attempt follows: at least once
            await asyncio.gather(*pending, return_exceptions=True)

    async def tick(self) -> int:
        """Start every attempt that is due and has a free slot; returns how many were started."""
        now = self.clock()
        async with self.db.transaction() as session:
            subscriptions = await db.due_subscriptions(session, now)
        self._rng.shuffle(subscriptions)  # no subscription is always first in line
        started = 0
        for subscription_id in subscriptions:
            free = min(self.per_subscription - self._inflight[subscription_id], self.concurrency - self.busy)
            if free <= 0:
                continue
            async with self.db.transaction() as session:
                rows = await db.due_deliveries(session, subscription_id, now, free)
                claimed = []
                for row in rows:
                    until = now + timedelta(seconds=self.timeout + LEASE_MARGIN)
                    if await db.lease_delivery(session, row, now, until):
                        claimed.append(
                            _Attempt(
                                row.id,
                                row.subscription_id,
                                row.notification_id,
                                row.type,
                                row.body.encode(),
                                row.traceparent,
                                row.department,
                                row.request_id,
                                row.attempts,
                                db.aware(row.created_at) or now,
                            )
                        )
            for attempt in claimed:
                self._inflight[subscription_id] += 1
                task = asyncio.create_task(self._deliver(attempt), name=f"webhook-{attempt.delivery_id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                started += 1
        return started

    async def _deliver(self, attempt: _Attempt) -> None:
        try:
            await self._attempt(attempt)
        except Exception:
            log.exception("webhook delivery %s: unexpected error", attempt.delivery_id)
        finally:
            self._inflight[attempt.subscription_id] -= 1
            if self._inflight[attempt.subscription_id] <= 0:
                del self._inflight[attempt.subscription_id]
            self._wake.set()  # a slot is free

    async def _attempt(self, attempt: _Attempt) -> None:
        async with self.db.transaction() as session:
            hook = await session.get(db.WebhookRow, attempt.subscription_id)
        now = self.clock()
        number = attempt.attempts + 1
        if hook is None or not hook.active:
            await self._finish(attempt, number, now, error="the webhook was removed", status=None, dead=True)
            return
        body = render_body(Format(hook.format), attempt.body)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(hook.secret, int(time.time()), body),
            "Baton-Delivery-Id": attempt.delivery_id,
            "Baton-Notification-Id": attempt.notification_id,
            "Baton-Event-Type": attempt.kind,
            "Baton-Webhook-Id": hook.id,
            "Baton-Attempt": str(number),
        }
        # The POST is a child of the notifier's span of the event that caused the notification (stored with
        # the delivery), and carries its own traceparent: the receiver continues the request's trace.
        # A digest (many requests) has no such parent: each of its deliveries starts a trace of its own.
        parent = telemetry.context_of(attempt.traceparent) or Context()
        url = httpx.URL(hook.url)
        attributes: dict[str, AttributeValue] = {
            "http.request.method": "POST",
            "server.address": url.host,
            "server.port": url.port or (443 if url.scheme == "https" else 80),
            "baton.webhook.id": hook.id,
            "baton.delivery.attempt": number,
            telemetry.DEPARTMENT: attempt.department,
            telemetry.EVENT_TYPE: attempt.kind,
        }
        if attempt.request_id:
            attributes[telemetry.REQUEST_ID] = attempt.request_id
        status: int | None = None
        error: str | None = None
        with self.tracer.start_as_current_span(
            "POST", context=parent, kind=trace.SpanKind.CLIENT, attributes=attributes
        ) as span:
            propagate.inject(headers)
            assert self._client is not None
            self.attempted += 1
            try:
                response = await self._client.post(hook.url, content=body, headers=headers)
                status = response.status_code
                span.set_attribute("http.response.status_code", status)
                if not 200 <= status < 300:
                    error = f"HTTP {status}: {response.text[:200]}"
                    span.set_attribute("error.type", str(status))
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__
                span.set_attribute("error.type", type(exc).__name__)
        now = self.clock()
        if error is None:
            await self._finish(attempt, number, now, error=None, status=status, dead=False)
            return
        dead = (now - attempt.created_at).total_seconds() >= self.policy.give_up_after
        log.info("webhook %s attempt %d failed (%s)%s", hook.id, number, error, "; dead-lettered" if dead else "")
        await self._finish(attempt, number, now, error=error, status=status, dead=dead)

    async def _finish(
        self, attempt: _Attempt, number: int, now: datetime, *, error: str | None, status: int | None, dead: bool
    ) -> None:
        values: dict[str, object] = {"attempts": number, "last_status": status, "last_error": error}
        if error is None:
            values |= {"status": db.DeliveryStatus.DELIVERED, "delivered_at": now}
            outcome = "delivered"
        elif dead:
            values |= {"status": db.DeliveryStatus.DEAD, "dead_at": now}
            outcome = "dead"
        else:
            delay = self.policy.delay(number, self._rng)
            values |= {"next_attempt_at": now + timedelta(seconds=delay)}
            outcome = "retrying"
        async with self.db.transaction() as session:
            await db.record_attempt(session, attempt.delivery_id, **values)
        if self.on_outcome is not None:
            self.on_outcome(outcome)


class DigestWorker:
    def __init__(
        self,
        database: db.Database,
        publish: Publish,
        directory: Directory,
        *,
        interval: float = 30.0,
        clock: Callable[[], datetime] = _utcnow,
        on_deliveries: Callable[[], None] | None = None,
    ) -> None:
        self.db = database
        self.publish = publish
        self.directory = directory
        self.interval = interval
        self.clock = clock
        self.on_deliveries = on_deliveries
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.run_once(self.clock())
            except Exception:
                log.exception("digest tick failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)

    async def stop(self) -> None:
        self._stopping.set()

    async def run_once(self, now: datetime) -> int:
        """Build every digest whose window closed by ``now``, then publish every unpublished one."""
        async with self.db.transaction() as session:
            held = await db.digest_pending(session)
            prefs = await db.preferences(session, sorted({r.department for r in held}))
        groups: dict[tuple[str, Delivery, datetime, datetime], list[db.OutboxRow]] = defaultdict(list)
        for row in held:
            period = Delivery(row.delivery or "hourly")
            pref = prefs.get(row.department)
            created = db.aware(row.created_at) or now
            window = digest_window(period, created, self.directory.zone(row.department), pref.daily_at if pref else 8)
            groups[(row.department, period, *window)].append(row)
        queued = 0
        for (department, period, start, end), rows in groups.items():
            if end > now:
                continue
            items = [Held(Notification.model_validate_json(r.body), db.aware(r.created_at) or now) for r in rows]
            digest = build_digest(department, period, (start, end), items, self.directory, now)
            body = digest.model_dump_json(exclude_none=True)
            try:
                async with self.db.transaction() as session:
                    ids = [r.notification_id for r in rows]
                    if await db.claim_for_digest(session, ids, digest.notification_id) != len(ids):
                        raise _Taken
                    session.add(
                        db.DigestRow(
                            digest_id=digest.notification_id,
                            department=department,
                            period=period.value,
                            window_start=start,
                            window_end=end,
                            count=digest.count,
                            subject=notify_subject(department, "digest"),
                            body=body,
                            created_at=now,
                        )
                    )
                    hooks = await db.active_webhooks(session, [department])
                    queued += db.queue_deliveries(
                        session,
                        hooks,
                        department=department,
                        notification_id=digest.notification_id,
                        kind="digest",
                        request_id=None,
                        body=body,
                        traceparent=None,
                        now=self.clock(),  # due at once, even when ``now`` is a chosen moment (tests)
                        digest_types=frozenset(r.type for r in rows),
                    )
            except (_Taken, IntegrityError):
                log.info("digest %s was built by another replica", digest.notification_id)
        if queued and self.on_deliveries is not None:
            self.on_deliveries()
        return await self.publish_pending()

    async def publish_pending(self) -> int:
        async with self.db.transaction() as session:
            rows = await db.unpublished_digests(session)
        for row in rows:
            await self.publish(row.subject, row.body.encode(), msg_id=row.digest_id, stream=STREAM_NOTIFY)
            async with self.db.transaction() as session:
                digest = await session.get(db.DigestRow, row.digest_id)
                if digest is not None:
                    digest.published_at = self.clock()
        return len(rows)


class _Taken(Exception):
    """Some of the notifications were claimed by another digest meanwhile (another replica)."""
