"""A batch's effects on a real nats-server (libs/contracts/publishing.py: ``jetstream_publish_many``).

Each request's messages are stored in list order with never two of them in flight; messages of different
requests go out together, one PubAck round trip per wave; a failed PubAck stops the next waves and is raised,
so the caller acks nothing and a redelivery publishes the batch again (the ``Nats-Msg-Id`` drops what was
already stored).
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import PubAck, StreamConfig
from nats.js.errors import APIError
from opentelemetry import trace

from baton.natsserver import NatsServer
from libs.contracts.publishing import Outgoing, jetstream_publish_many, sequential_publish_many

pytestmark = pytest.mark.integration


class Recording(JetStreamContext):
    """A real JetStream context that notes, for every publish, which messages were still awaiting their PubAck."""

    def __init__(self, nc: Any) -> None:
        super().__init__(nc)
        self.in_flight: list[tuple[str, list[str]]] = []
        self._waiting: list[str] = []

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> PubAck:
        self.in_flight.append((subject, list(self._waiting)))
        self._waiting.append(subject)
        try:
            return await super().publish(subject, payload, timeout, stream, headers, msg_ttl)
        finally:
            self._waiting.remove(subject)


def item(request: str, n: int, stream: str = "WAVES") -> Outgoing:
    name = f"{request}-{n}"
    return Outgoing(f"waves.{request}.{n}", name.encode(), name, stream, order_key=request)


async def stored(js: JetStreamContext) -> list[str]:
    info = await js.stream_info("WAVES")
    return [((await js.get_msg("WAVES", seq)).data or b"").decode() for seq in range(1, info.state.last_seq + 1)]


async def not_allowed(items: Any) -> None:
    raise AssertionError("the fallback is only for a broker without a nats-py JetStream context")


async def test_requests_go_out_together_and_each_request_in_order(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name="WAVES", subjects=["waves.>"]))
        js = Recording(nc)
        publish_many = jetstream_publish_many(lambda: js, trace.get_tracer("test"), not_allowed)
        items = [item("a", 1), item("b", 1), item("a", 2), item("c", 1), item("a", 3), item("b", 2)]

        await publish_many(items)

        log = await stored(js)
        assert sorted(log) == sorted(i.msg_id for i in items)
        for request in "abc":
            mine = [m for m in log if m.startswith(request)]
            assert mine == sorted(mine), f"{request}'s messages out of order: {log}"
        # Never two messages of one request in flight; the three requests' first messages were.
        for subject, waiting in js.in_flight:
            request = subject.split(".")[1]
            assert not [s for s in waiting if s.split(".")[1] == request], (subject, waiting)
        assert js.in_flight[2] == ("waves.c.1", ["waves.a.1", "waves.b.1"])
        assert len(js.in_flight) == 6
    finally:
        await nc.close()


async def test_a_failed_pub_ack_stops_the_next_waves_and_is_raised(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name="WAVES", subjects=["waves.>"]))
        js = nc.jetstream()
        publish_many = jetstream_publish_many(lambda: js, trace.get_tracer("test"), not_allowed)
        # a-2 names the wrong stream: the server refuses it (an error PubAck), in the second wave.
        items = [item("a", 1), item("b", 1), item("a", 2, stream="ELSEWHERE"), item("b", 2), item("a", 3), item("b", 3)]

        with pytest.raises(APIError, match="expected stream does not match"):
            await asyncio.wait_for(publish_many(items), 5)  # at once, not after the 10 s PubAck timeout

        # The second wave's other message is stored (it was in flight with a-2); the third wave never left.
        assert sorted(await stored(js)) == ["a-1", "b-1", "b-2"]

        # The batch comes again (nothing was acked), fixed: what was stored is dropped as a duplicate.
        items[2] = item("a", 2)
        await publish_many(items)
        log = await stored(js)
        assert sorted(log) == sorted(i.msg_id for i in items)
        assert [m for m in log if m.startswith("a")] == ["a-1", "a-2", "a-3"]
    finally:
        await nc.close()


async def test_without_a_nats_py_context_the_fallback_publishes_one_by_one() -> None:
    sent: list[str] = []

    async def publish(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        sent.append(msg_id)

    publish_many = jetstream_publish_many(lambda: object(), trace.get_tracer("test"), sequential_publish_many(publish))
    await publish_many([item("a", 1), item("b", 1), item("a", 2)])
    assert sent == ["a-1", "b-1", "a-2"]
