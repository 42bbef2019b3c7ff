"""The prompt pull loop (libs/contracts/pull.py) on a real nats-server, wired as the services wire it.

FastStream's own batch loop waits until its batch is full or its timeout has passed. Here the timeout (the
idle long poll) is 30 s and the batch 64, so the old loop would hold a lone message for 30 s: the prompt
loop must hand it over at once. Messages already waiting go together, in stream order, at most a batch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import pytest
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from nats.js.api import StreamConfig

from baton.natsserver import NatsServer
from libs.contracts.pull import prompt_pull

pytestmark = pytest.mark.integration

IDLE = 30.0  # what FastStream's loop would wait for a batch that never fills


async def test_a_lone_message_is_handed_over_at_once_and_waiting_ones_together(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="PROMPT", subjects=["prompt.>"]))
    for n in range(5):  # waiting before the subscriber starts
        await js.publish(f"prompt.{n}", str(n).encode(), stream="PROMPT")

    broker = NatsBroker([nats_server.url])
    batches: list[list[int]] = []
    handed = asyncio.Condition()

    @broker.subscriber(
        "prompt.>",
        stream=JStream("PROMPT", declare=False),
        durable="prompt",
        pull_sub=PullSub(batch_size=64, timeout=IDLE, batch=True),
    )
    async def on_batch(body: list[Any], msg: NatsMessage) -> None:
        raws: list[Any] = msg.raw_message  # type: ignore[assignment]
        async with handed:
            batches.append([int(raw.data) for raw in raws])
            handed.notify_all()

    for sub in broker.subscribers:
        prompt_pull(sub, idle=IDLE)

    async def wait_for(count: int, within: float) -> float:
        started = time.monotonic()
        async with handed:
            await asyncio.wait_for(handed.wait_for(lambda: len(batches) >= count), within)
        return time.monotonic() - started

    await broker.start()
    try:
        await wait_for(1, 10)
        assert batches[0] == [0, 1, 2, 3, 4], batches  # every waiting message in one batch, in order

        # Wait until the loop is in its idle long poll: the consumer holds its pull request.
        deadline = time.monotonic() + 10
        while not (await js.consumer_info("PROMPT", "prompt")).num_waiting:
            assert time.monotonic() < deadline, "the loop never waited for a message"
            await asyncio.sleep(0.02)
        await js.publish("prompt.5", b"5", stream="PROMPT")
        seconds = await wait_for(2, IDLE / 3)  # well under what the fill-or-timeout loop would wait
        print(f"lone message handed over after {seconds * 1000:.1f} ms (idle long poll {IDLE:.0f} s)")
        assert batches[1] == [5]
    finally:
        await broker.stop()
        await nc.close()
