"""The FastStream 0.7.8 / nats-py 2.16 fetch-timeout fix (services/routing/natscompat.py)."""

from __future__ import annotations

from typing import Any

import nats.errors
import pytest
from nats.js.client import JetStreamContext

from services.routing.natscompat import install_fetch_timeout_fix

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raised", "expected"),
    [(TimeoutError(), nats.errors.TimeoutError), (nats.errors.TimeoutError(), nats.errors.TimeoutError)],
)
async def test_bare_timeouts_become_nats_timeouts(
    monkeypatch: pytest.MonkeyPatch, raised: BaseException, expected: type[BaseException]
) -> None:
    async def fetch(self: Any, batch: int = 1, timeout: float | None = 5) -> list[Any]:
        raise raised

    monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", fetch)
    install_fetch_timeout_fix()
    install_fetch_timeout_fix()  # idempotent: wrapped once
    patched: Any = JetStreamContext.PullSubscription.fetch
    assert patched.__wrapped__ is fetch
    with pytest.raises(expected):
        await patched(object(), batch=2, timeout=0.05)


async def test_results_and_other_errors_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, float | None]] = []

    async def fetch(self: Any, batch: int = 1, timeout: float | None = 5) -> list[Any]:
        calls.append((batch, timeout))
        if batch == 3:
            raise nats.errors.ConnectionClosedError
        return ["msg"]

    monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", fetch)
    install_fetch_timeout_fix()
    patched: Any = JetStreamContext.PullSubscription.fetch
    assert await patched(object(), batch=2, timeout=0.05) == ["msg"]
    with pytest.raises(nats.errors.ConnectionClosedError):
        await patched(object(), batch=3)
    assert calls == [(2, 0.05), (3, 5)]
