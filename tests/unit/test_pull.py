"""The prompt pull loop's decisions (libs/contracts/pull.py), against a scripted fake subscription."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from libs.contracts import pull
from libs.contracts.pull import next_batch, prompt_pull, pull_forever, waiting_after

pytestmark = pytest.mark.unit


@dataclass
class Meta:
    num_pending: int
    num_delivered: int = 1


@dataclass
class Msg:
    n: int
    metadata: Meta


class Script:
    """Answers each ``fetch`` with the next scripted result (a list, or an exception to raise)."""

    def __init__(self, *answers: list[Msg] | BaseException) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[int, float | None]] = []

    async def fetch(self, batch: int = 1, timeout: float | None = 5) -> list[Any]:
        self.calls.append((batch, timeout))
        answer = self.answers.pop(0) if self.answers else TimeoutError()
        if isinstance(answer, BaseException):
            raise answer
        return answer


def msgs(*pending: int) -> list[Msg]:
    return [Msg(i, Meta(p)) for i, p in enumerate(pending)]


async def test_a_lone_message_is_handed_over_alone_without_a_second_fetch() -> None:
    sub = Script(msgs(0))
    assert [m.n for m in await next_batch(sub, 64, idle=1.0)] == [0]
    assert sub.calls == [(1, 1.0)]  # one long poll; nothing reported waiting, so no second request


async def test_the_messages_reported_waiting_are_taken_at_once_up_to_the_batch() -> None:
    sub = Script(msgs(5), msgs(4, 3, 2, 1, 0))
    batch = await next_batch(sub, 64, idle=1.0)
    assert len(batch) == 6
    assert sub.calls == [(1, 1.0), (5, pull.LINGER)]  # asked for exactly the 5 waiting

    capped = Script(msgs(500), msgs(*range(7, 0, -1)))
    await next_batch(capped, 8, idle=1.0)
    assert capped.calls[1] == (7, pull.LINGER)  # never more than the batch size in all


async def test_nothing_within_idle_is_an_empty_batch_and_a_short_second_fetch_keeps_the_first() -> None:
    assert await next_batch(Script(TimeoutError()), 64, idle=0.5) == []
    sub = Script(msgs(3), TimeoutError())  # another replica took the waiting ones first
    assert [m.n for m in await next_batch(sub, 64, idle=0.5)] == [0]
    broken = Script(msgs(3), ConnectionError("connection lost"))  # the first message is still handed over
    assert [m.n for m in await next_batch(broken, 64, idle=0.5)] == [0]


async def test_after_a_redelivery_a_full_batch_is_asked_for_briefly() -> None:
    # Messages waiting for redelivery are not in num_pending: after a redelivered one, ask for a batch anyway.
    sub = Script([Msg(0, Meta(0, num_delivered=3))], msgs(0, 0))
    assert len(await next_batch(sub, 16, idle=1.0)) == 3
    assert sub.calls == [(1, 1.0), (15, pull.REDELIVERY_LINGER)]
    alone = Script([Msg(0, Meta(0, num_delivered=2))], TimeoutError())
    assert len(await next_batch(alone, 16, idle=1.0)) == 1


def test_waiting_after_reads_the_metadata_and_tolerates_its_absence() -> None:
    assert waiting_after(Msg(0, Meta(12))) == 12
    assert waiting_after(object()) == 0
    assert waiting_after(Msg(0, Meta(-1))) == 0


async def test_pull_forever_survives_fetch_errors_and_hands_over_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull, "ERROR_PAUSE", 0.001)
    sub = Script(ConnectionError("nats restarting"), msgs(1), msgs(0), TimeoutError(), msgs(0))
    handed: list[list[int]] = []
    stop = asyncio.Event()

    async def consume(batch: Any) -> None:
        handed.append([m.n for m in batch])
        if len(handed) == 2:
            stop.set()

    await asyncio.wait_for(
        pull_forever(lambda: sub, consume, running=lambda: not stop.is_set(), batch=64, idle=0.1), timeout=10
    )
    assert handed == [[0, 0], [0]]  # the error and the empty turn cost nothing but a pause


class FakeSubscriber:
    def __init__(self, batch: bool) -> None:
        self.pull_sub = type("P", (), {"batch": batch, "batch_size": 16})()
        self.stream = type("S", (), {"name": "S"})()
        self.extra_options = {"durable": "d"}
        self.subscription = None
        self.running = True
        self.original = self._consume_pull

    async def _consume_pull(self) -> None:  # FastStream's own loop
        raise AssertionError("replaced")

    async def consume(self, msgs: Any) -> None:
        pass


def test_prompt_pull_replaces_only_a_batch_subscribers_loop() -> None:
    batch, single = FakeSubscriber(True), FakeSubscriber(False)
    prompt_pull(batch, idle=1.0)
    prompt_pull(single, idle=1.0)
    assert batch._consume_pull != batch.original
    assert single._consume_pull == single.original
