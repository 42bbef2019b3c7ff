"""The nats-py fetch timeout guard metrics installs (see services/metrics/compat.py)."""

from typing import Any

import nats.errors
import pytest
from nats.js.client import JetStreamContext

from services.metrics.compat import patch_pull_fetch_timeout

pytestmark = pytest.mark.unit


async def test_bare_timeout_becomes_a_nats_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    async def fetch(self: Any, batch: int = 1, timeout: float | None = 5) -> list[Any]:
        calls.append(batch)
        if batch == 2:
            raise TimeoutError  # what nats-py 2.16 _fetch_n raises when the deadline runs out
        if batch == 3:
            raise nats.errors.TimeoutError
        return ["msg"]

    monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", fetch)
    patch_pull_fetch_timeout()
    patch_pull_fetch_timeout()  # idempotent: wrapped once
    sub: Any = object.__new__(JetStreamContext.PullSubscription)

    assert await sub.fetch(batch=1) == ["msg"]
    with pytest.raises(nats.errors.TimeoutError):  # what FastStream's batch loop catches
        await sub.fetch(batch=2)
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(batch=3)
    assert calls == [1, 2, 3]
