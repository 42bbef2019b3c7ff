"""Intake's consumer lease: of several intake replicas, exactly one consumes ``BATON_IN`` at a time.

Intake is the sequencer: the order in which it applies a request's inbound events *is* the order
of the canonical log, and the only order a publisher can rely on is ``BATON_IN``'s stream order.
Two replicas fetching from the one durable consumer would each hold a part of the stream and could
apply a request's later event before its earlier one (``delayed`` refused because its ``accepted``
sat in the other replica's batch). So the consumer runs in one replica only: the holder of a lease
kept in a JetStream key-value bucket (``baton_leases``, provisioned by ``baton provision``, history
1, ``max_age`` = the lease TTL):

* acquire: ``kv.create("intake", holder_id)`` succeeds only while no lease exists (the last one was
  deleted, or expired because nobody renewed it within the TTL);
* renew: ``kv.update("intake", holder_id, last=revision)`` every ``ttl / 4``; it fails if anybody
  else wrote the key since, so two holders cannot both renew;
* the holder considers itself deposed once it has gone ``ttl / 2`` (measured from *before* the
  last successful renewal was sent) without a renewal: it stops fetching well before the key can
  expire on the server and another replica can acquire it;
* a standby tries to acquire every ``ttl / 4``: it takes over at most about ``ttl`` after the
  holder died (or ``ttl / 4`` after a holder that stops cleanly deleted the key);
* a new holder starts fetching only once the previous holder's deliveries are settled (acked, or
  due for redelivery after the consumer's ack wait: ``wait_for_handover``), so that a batch a
  dead holder had fetched comes back before anything later in the stream;
* a deposed holder whose lease nobody took (NATS was briefly unreachable) renews its own key again
  (same holder id, same revision) and resumes.

The lease decides who fetches; it does not fence writes. A holder cut off from NATS for longer than
``ttl / 2`` stops, but the message it is processing at that moment still finishes (its effect is
guarded by the request's version check in the database, so it is never applied twice). See
docs/architecture.md, "Horizontal scale".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from libs.contracts.subjects import LEASE_BUCKET

log = logging.getLogger("baton.intake.lease")

#: The key of intake's consumer lease in ``LEASE_BUCKET``.
INTAKE_LEASE_KEY = "intake"

Hook = Callable[[], Coroutine[Any, Any, None]]


class Lease:
    """Keeps trying to hold ``key`` in ``LEASE_BUCKET``; calls ``on_acquired`` / ``on_lost`` on every change.

    ``held`` is True only while the lease is safely held (a renewal succeeded within ``ttl / 2``).
    """

    def __init__(
        self,
        nc: NATS,
        *,
        key: str = INTAKE_LEASE_KEY,
        ttl: float | None = None,
        on_acquired: Hook,
        on_lost: Hook,
        holder_id: str | None = None,
        bucket: str = LEASE_BUCKET,
    ) -> None:
        self.nc = nc
        self.key = key
        #: Seconds; None = the bucket's ``max_age`` (read in :meth:`start`), so that it cannot disagree with it.
        self.ttl = ttl or 0.0
        self._ttl_given = ttl
        self.on_acquired = on_acquired
        self.on_lost = on_lost
        self.holder_id = holder_id or f"{uuid.uuid4().hex[:12]}"
        self.bucket = bucket
        self.held = False
        #: Times this replica acquired the lease (a measure for tests and logs).
        self.acquisitions = 0
        self._revision: int | None = None
        self._renewed_at = 0.0  # monotonic time the last successful write was *sent*
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._opening: asyncio.Task[None] | None = None

    @property
    def interval(self) -> float:
        return self.ttl / 4

    async def start(self) -> None:
        try:
            self._kv = await self.nc.jetstream(timeout=max(1.0, self.interval)).key_value(self.bucket)
        except (BucketNotFoundError, NotFoundError) as exc:
            raise RuntimeError(f"key-value bucket {self.bucket} does not exist: run `baton provision` first") from exc
        bucket_ttl = float((await self._kv.status()).ttl or 0)
        if not bucket_ttl:
            raise RuntimeError(f"key-value bucket {self.bucket} has no TTL: a dead holder would keep the lease forever")
        self.ttl = self._ttl_given or bucket_ttl
        if self.ttl > bucket_ttl:
            raise RuntimeError(f"lease TTL {self.ttl}s exceeds the bucket's max_age {bucket_ttl}s")
        self._task = asyncio.create_task(self._run(), name=f"lease-{self.key}")

    async def stop(self) -> None:
        """Stop renewing; release the lease (delete the key) so that a standby takes over at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.held:
            await self._lose("stopping")
            if self._kv is not None and self._revision is not None:
                with contextlib.suppress(Exception):
                    await self._kv.delete(self.key, last=self._revision)
                    log.info("released lease %s/%s", self.bucket, self.key)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await asyncio.wait_for(self._step(), timeout=self.interval * 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS unreachable, a timeout: try again next round
                log.debug("lease %s: %s: %s", self.key, type(exc).__name__, exc)
            if self.held and time.monotonic() - self._renewed_at > self.ttl / 2:
                try:
                    await self._lose(f"no renewal for {time.monotonic() - self._renewed_at:.1f}s")
                except Exception:
                    log.exception("lease %s: stopping consumption failed", self.key)
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def _step(self) -> None:
        kv = self._kv
        assert kv is not None
        sent = time.monotonic()
        if self._revision is not None:
            try:
                self._revision = await kv.update(self.key, self.holder_id.encode(), last=self._revision)
                self._renewed_at = sent
                if not self.held:
                    await self._gain("renewed own lease")
                return
            except KeyWrongLastSequenceError:
                self._revision = None  # somebody else wrote it (or it expired): no longer ours
                if self.held:
                    await self._lose("lease taken over or expired")
        try:
            self._revision = await kv.create(self.key, self.holder_id.encode())
        except KeyWrongLastSequenceError:
            return  # held by another replica
        self._renewed_at = sent
        await self._gain("acquired")

    async def _gain(self, how: str) -> None:
        self.held = True
        self.acquisitions += 1
        log.info("lease %s/%s %s by %s", self.bucket, self.key, how, self.holder_id)
        # In its own task: opening may wait for the previous holder's deliveries (``wait_for_handover``),
        # and renewals must go on meanwhile.
        self._opening = asyncio.create_task(self.on_acquired(), name=f"lease-{self.key}-acquired")
        self._opening.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Not consuming although holding the lease: give it up so that a standby (or the next round) retries.
            log.error("lease %s: starting to consume failed", self.key, exc_info=task.exception())
            self._revision = None
            self.held = False

    async def _lose(self, why: str) -> None:
        self.held = False
        log.warning("lease %s/%s lost by %s (%s): not consuming", self.bucket, self.key, self.holder_id, why)
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._opening
        self._opening = None
        await self.on_lost()


async def wait_for_handover(nc: NATS, stream: str, durable: str, *, poll: float = 0.2) -> float:
    """Before a new holder fetches: until no delivery of ``durable`` awaits an ack, at most its ``ack_wait``.

    A holder that stops cleanly settles its batch first (processed and acked, the rest naked), so
    this returns at once. A holder that died leaves its fetched batch unacknowledged until the
    ack wait expires; fetching before then would apply later messages of the stream before those,
    out of order. Once they are due again the server redelivers them before anything newer.
    Returns the seconds waited.
    """
    js = nc.jetstream(timeout=2)
    started = time.monotonic()
    deadline: float | None = None
    failures = 0
    while True:
        try:
            info = await js.consumer_info(stream, durable)
        except Exception as exc:  # NATS unreachable, the consumer between two leaders: ask again
            failures += 1
            if failures % 25 == 1:
                log.warning("handover: no consumer info of %s/%s yet (%r); asking again", stream, durable, exc)
            await asyncio.sleep(poll)
            continue
        if deadline is None:
            deadline = time.monotonic() + float(info.config.ack_wait or 30.0) + 1.0
        if not info.num_ack_pending or time.monotonic() >= deadline:
            break
        await asyncio.sleep(poll)
    waited = time.monotonic() - started
    if waited > poll:
        log.info("waited %.1fs for the previous holder's deliveries to %s/%s to come back", waited, stream, durable)
    return waited


async def current_holder(nc: NATS, key: str = INTAKE_LEASE_KEY, bucket: str = LEASE_BUCKET) -> str | None:
    """The holder id of a lease, or None (for ``/readyz``-style reports and tests)."""
    try:
        kv = await nc.jetstream().key_value(bucket)
        entry = await kv.get(key)
    except (KeyNotFoundError, BucketNotFoundError, NotFoundError, nats.errors.TimeoutError):
        return None
    return entry.value.decode() if entry.value else None
