"""NATS identities against a real nats-server started with the config ``baton nats-config`` generates.

For every department of the catalog: publishing as every other department, reading another
department's notifications (its consumer, its raw subjects), creating any consumer, touching a stream,
and reading ``_INBOX.>`` or another inbox are all refused by the server (each attempt must produce
the server's permissions violation for that exact subject, and nothing may change on the server).
Every path a department is meant to use works: publish its own inbound events with a PubAck,
request/reply on its own inbox prefix, read and ack its own notification consumer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeoutError

from baton.cmd_notify import follow
from baton.nats_config import AUTH_CONF, credential_path, write_nats_config
from baton.natsserver import NatsServer
from baton.provision import provision
from libs.contracts import Catalog
from libs.contracts.natsauth import connect_options
from libs.contracts.subjects import (
    CONSUMER_METRICS,
    STREAM_EVENTS,
    STREAM_IN,
    STREAM_NOTIFY,
    department_consumer,
    event_subject,
    notify_filter,
    request_events_filter,
)
from services.metrics.handlers import Outcome
from services.metrics.rebuild import RebuildReport, read_log
from services.notifier.api import FeedSource

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: Longest wait for the server's -ERR about one attempt: it comes before the PONG of the flush that follows
#: the attempt, so it is normally there at once; a refusal that never comes costs this much.
VIOLATION_WAIT = 2.0


@dataclass
class Secured:
    server: NatsServer
    out: Path

    def options(self, kind: Any = "admin", name: str = "admin") -> dict[str, Any]:
        return connect_options(credentials=credential_path(self.out, kind, name))


@pytest.fixture
async def secured(tmp_path: Path, catalog: Catalog) -> AsyncIterator[Secured]:
    out = tmp_path / "nats"
    write_nats_config(out, catalog, server_conf=False)
    admin = connect_options(credentials=credential_path(out, "admin", "admin"))
    server = NatsServer(out, extra_config=f"include {AUTH_CONF}", client_options=admin)
    await server.start_async()
    try:
        await provision(server.url, catalog, connect_options=admin)
        yield Secured(server, out)
    finally:
        await server.stop_async()


@dataclass
class Client:
    """A connection that records the server's permission errors (nats-py reports them to error_cb)."""

    nc: NATS
    errors: list[str] = field(default_factory=list)

    @classmethod
    async def connect(cls, url: str, options: dict[str, Any]) -> Client:
        client = cls.__new__(cls)
        client.errors = []

        async def on_error(exc: Exception) -> None:
            client.errors.append(str(exc).lower())

        client.nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, **options)
        return client

    async def refused(self, kind: str, subject: str) -> bool:
        """Did the server refuse ``kind`` ("publish" / "subscription") to ``subject``?"""
        needle = f'permissions violation for {kind} to "{subject.lower()}"'
        deadline = time.monotonic() + VIOLATION_WAIT
        while True:
            if any(needle in e for e in self.errors):
                return True
            if time.monotonic() > deadline:
                return False
            if self.nc.is_connected:
                await self.nc.flush(timeout=2)
            await asyncio.sleep(0.01)


@dataclass
class Tally:
    tried: int = 0
    denied: int = 0
    allowed: list[str] = field(default_factory=list)  # attempts the server let through

    def record(self, what: str, refused: bool) -> None:
        self.tried += 1
        if refused:
            self.denied += 1
        else:
            self.allowed.append(what)


async def _seed_notifications(admin: NATS, slugs: list[str]) -> None:
    js = admin.jetstream()
    for slug in slugs:
        await js.publish(f"baton.notify.{slug}.routed", orjson.dumps({"type": "routed", "department": slug}))


async def test_every_department_is_refused_everything_but_its_own(secured: Secured, catalog: Catalog) -> None:
    slugs = list(catalog.slugs)
    url = secured.server.url
    admin = await nats.connect(url, **secured.options())
    jsm = admin.jsm()
    await _seed_notifications(admin, slugs)  # a read that got through would show as a delivered message
    consumers_before = sorted(c.name for c in await jsm.consumers_info(STREAM_NOTIFY))
    tally = Tally()
    started = time.monotonic()
    try:
        for dept in slugs:
            client = await Client.connect(url, secured.options("department", dept))
            nc = client.nc
            others = [o for o in slugs if o != dept]
            try:
                # 1. publish as every other department (core publish: the server checks before any stream)
                for other in others:
                    subject = f"baton.in.{other}.created"
                    await nc.publish(subject, b"{}", headers={"Nats-Msg-Id": f"forged-{uuid.uuid4().hex}"})
                    tally.record(f"{dept} publish {subject}", await client.refused("publish", subject))
                # ... and through JetStream, as a real client would: no PubAck ever comes
                subject = f"baton.in.{others[0]}.created"
                try:
                    await nc.jetstream().publish(subject, b"{}", timeout=0.5)
                    got_ack = True
                except (NatsTimeoutError, TimeoutError):
                    got_ack = False
                tally.record(f"{dept} js.publish {subject}", not got_ack and await client.refused("publish", subject))

                # 2. consume another department's notifications: its pull consumer, its raw subjects
                for other in others:
                    durable = department_consumer(other)
                    for subject in (
                        f"$JS.API.CONSUMER.MSG.NEXT.{STREAM_NOTIFY}.{durable}",
                        f"$JS.API.CONSUMER.INFO.{STREAM_NOTIFY}.{durable}",
                        f"$JS.ACK.{STREAM_NOTIFY}.{durable}.1.1.1.0.0",
                    ):
                        await nc.publish(subject, b'{"batch":1}', reply=nc.new_inbox())
                        tally.record(f"{dept} publish {subject}", await client.refused("publish", subject))
                    raw = notify_filter(other)
                    await nc.subscribe(raw)
                    tally.record(f"{dept} subscribe {raw}", await client.refused("subscription", raw))

                # 3. create a consumer (any API form, any stream, even on its own notifications), touch streams
                for subject in (
                    f"$JS.API.CONSUMER.CREATE.{STREAM_NOTIFY}",
                    f"$JS.API.CONSUMER.CREATE.{STREAM_NOTIFY}.mine.baton.notify.{dept}.>",
                    f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM_NOTIFY}.mine",
                    f"$JS.API.CONSUMER.CREATE.{STREAM_IN}",
                    f"$JS.API.CONSUMER.CREATE.{STREAM_EVENTS}",
                    f"$JS.API.CONSUMER.DELETE.{STREAM_NOTIFY}.{department_consumer(dept)}",
                    f"$JS.API.STREAM.PURGE.{STREAM_NOTIFY}",
                    f"$JS.API.STREAM.DELETE.{STREAM_IN}",
                    f"$JS.API.STREAM.MSG.GET.{STREAM_NOTIFY}",
                ):
                    await nc.publish(subject, b"{}", reply=nc.new_inbox())
                    tally.record(f"{dept} publish {subject}", await client.refused("publish", subject))
                try:  # nats-py's own call: the request never reaches JetStream
                    await nc.jetstream().add_consumer(STREAM_NOTIFY, durable_name=f"own-{dept}", timeout=0.5)
                    created = True
                except (NatsTimeoutError, TimeoutError):
                    created = False
                create = f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM_NOTIFY}.own-{dept}"
                tally.record(f"{dept} js.add_consumer", not created and await client.refused("publish", create))

                # 4. read replies meant for others: _INBOX.>, every other department's inbox, everything
                for subject in ("_INBOX.>", ">", *(f"_INBOX_{other}.>" for other in others)):
                    await nc.subscribe(subject)
                    tally.record(f"{dept} subscribe {subject}", await client.refused("subscription", subject))
            finally:
                await nc.close()

        # Nothing changed on the server: no forged event stored, no consumer made, no notification read.
        assert (await jsm.stream_info(STREAM_IN)).state.messages == 0
        assert sorted(c.name for c in await jsm.consumers_info(STREAM_NOTIFY)) == consumers_before
        for dept in slugs:
            info = await jsm.consumer_info(STREAM_NOTIFY, department_consumer(dept))
            assert (info.delivered.stream_seq, info.num_pending) == (0, 1), (dept, info)
        assert (await jsm.stream_info(STREAM_NOTIFY)).state.messages == len(slugs)
    finally:
        await admin.close()
    elapsed = time.monotonic() - started
    print(
        f"\nNATS permissions: {tally.denied} denied of {tally.tried} tried ({len(slugs)} departments, {elapsed:.1f}s)"
    )
    assert tally.allowed == []
    assert tally.denied == tally.tried
    # per department: 1 per other (publish) + 1 js.publish + 4 per other (consume) + 9 + 1 (create) + 2 + 1 per other
    n = len(slugs)
    assert tally.tried == n * (6 * (n - 1) + 13)


async def test_every_department_can_use_its_own_paths(secured: Secured, catalog: Catalog) -> None:
    slugs = list(catalog.slugs)
    url = secured.server.url
    admin = await nats.connect(url, **secured.options())
    await _seed_notifications(admin, slugs)
    ok: list[str] = []
    try:
        for dept in slugs:
            client = await Client.connect(url, secured.options("department", dept))
            nc = client.nc
            try:
                js = nc.jetstream()
                # its replies come to its own inbox prefix, the only inbox it may read
                assert nc.new_inbox().startswith(f"_INBOX_{dept}.")
                event_id = f"evt-{uuid.uuid4().hex[:16]}"
                ack = await js.publish(f"baton.in.{dept}.created", b"{}", headers={"Nats-Msg-Id": event_id}, timeout=5)
                assert (ack.stream, ack.duplicate) == (STREAM_IN, None)
                ok.append(f"{dept}: publish baton.in.{dept}.created + PubAck")

                reply = await nc.request(f"baton.in.{dept}.commented", b"{}", timeout=5)
                assert reply.subject.startswith(f"_INBOX_{dept}.")
                assert orjson.loads(reply.data)["stream"] == STREAM_IN
                ok.append(f"{dept}: request/reply on _INBOX_{dept}")

                info = await js.consumer_info(STREAM_NOTIFY, department_consumer(dept))
                assert info.num_pending == 1
                sub = await js.pull_subscribe_bind(department_consumer(dept), stream=STREAM_NOTIFY)
                msgs = await sub.fetch(1, timeout=5)
                assert [orjson.loads(m.data)["department"] for m in msgs] == [dept]
                await msgs[0].ack_sync(timeout=5)
                ok.append(f"{dept}: fetch + ack from {department_consumer(dept)}")

                # the contract example's call: pull_subscribe with the durable looks the consumer up first
                again = await js.pull_subscribe(
                    notify_filter(dept), durable=department_consumer(dept), stream=STREAM_NOTIFY
                )
                with pytest.raises((NatsTimeoutError, TimeoutError)):
                    await again.fetch(1, timeout=0.3)  # read and acked: nothing left
                ok.append(f"{dept}: pull_subscribe(durable=...)")
                assert client.errors == [], client.errors
            finally:
                await nc.close()
        jsm = admin.jsm()
        assert (await jsm.stream_info(STREAM_IN)).state.messages == 2 * len(slugs)
        for dept in slugs:
            info = await jsm.consumer_info(STREAM_NOTIFY, department_consumer(dept))
            assert (info.ack_floor.stream_seq > 0, info.num_pending, info.num_ack_pending) == (True, 0, 0)
    finally:
        await admin.close()
    print(f"\nNATS allowed paths: {len(ok)} ok of {4 * len(slugs)} ({len(slugs)} departments)")
    assert len(ok) == 4 * len(slugs)


async def test_services_have_what_they_need_and_no_more(secured: Secured, catalog: Catalog) -> None:
    """The paths outside the four services' durable consumers (covered end to end by tests/e2e): the notifier's
    live feed, metrics' rebuild and routing's look-up of the canonical log; and a few refusals."""
    url = secured.server.url
    admin = await nats.connect(url, **secured.options())
    try:
        ajs = admin.jetstream()
        rid = "REQ-PERM0001"
        await ajs.publish(event_subject(rid, "created"), b'{"type":"created"}')
        await ajs.publish("baton.notify.it.routed", b'{"type":"routed"}')

        # notifier: the SSE feed is an ordered consumer on BATON_NOTIFY
        feed = FeedSource([url], secured.options("service", "notifier"))
        await feed.start()
        try:
            sub = await feed.subscribe("it", after=0)
            msg = await sub.next_msg(timeout=5)
            assert msg.subject == "baton.notify.it.routed"
            await sub.unsubscribe()
        finally:
            await feed.close()

        # routing: "is a later event of this request in the log?" (a direct stream read)
        routing = await Client.connect(url, secured.options("service", "routing"))
        try:
            got = await routing.nc.jsm().get_msg(STREAM_EVENTS, seq=1, subject=request_events_filter(rid), next=True)
            assert got.subject == event_subject(rid, "created")
            await routing.nc.publish("baton.in.it.created", b"{}")  # routing speaks as itself only
            assert await routing.refused("publish", "baton.in.it.created")
        finally:
            await routing.nc.close()

        # metrics: the rebuild replays BATON_EVENTS with an ordered consumer; its durable one is there
        class Count:
            seen = 0

            async def process(self, _inbound: Any) -> Any:
                self.seen += 1
                return Outcome.PROJECTED

        counter = Count()
        report = RebuildReport(through_stream_sequence=0)
        await read_log(url, counter, report, idle_timeout=5, options=secured.options("service", "metrics"))  # type: ignore[arg-type]
        assert counter.seen == 1
        metrics = await Client.connect(url, secured.options("service", "metrics"))
        try:
            assert (
                await metrics.nc.jetstream().consumer_info(STREAM_EVENTS, CONSUMER_METRICS)
            ).name == CONSUMER_METRICS
            await metrics.nc.publish(event_subject(rid, "resolved"), b"{}")  # only intake writes the log
            assert await metrics.refused("publish", event_subject(rid, "resolved"))
        finally:
            await metrics.nc.close()

        # without credentials nobody gets in
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    finally:
        await admin.close()


async def test_baton_tail_reads_as_the_department_and_replays_as_the_operator(secured: Secured) -> None:
    url = secured.server.url
    admin = await nats.connect(url, **secured.options())
    try:
        await _seed_notifications(admin, ["it"])
    finally:
        await admin.close()
    shown: list[bytes] = []
    it = secured.options("department", "it")
    assert await follow("it", url, None, shown.append, limit=1, idle_exit=5, options=it) == 1
    assert orjson.loads(shown[0])["department"] == "it"
    # a replay needs a consumer of its own: refused to the department, done by the operator
    with pytest.raises((NatsTimeoutError, TimeoutError)):
        await asyncio.wait_for(follow("it", url, "1h", shown.append, limit=1, idle_exit=2, options=it), 30)
    assert await follow("it", url, "1h", shown.append, limit=1, idle_exit=5, options=secured.options()) == 1
    assert len(shown) == 2
