"""The dashboard's live push: a real uvicorn server streams ``projected`` over SSE when events land."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import nats
import pytest
import uvicorn

from baton.natsserver import free_port
from libs.contracts.tokens import TokenEntry, TokenFile, generate_token, hash_token, save_token_file
from services.metrics.app import create_app
from services.metrics.live import LiveFeed
from services.metrics.settings import MetricsSettings
from tests.metrics_events import lifecycle, subject_and_body

pytestmark = pytest.mark.integration


async def test_live_feed_wakes_waiters_and_times_out() -> None:
    feed = LiveFeed()
    assert await feed.wait_newer(0, 0.05) == 0
    waiter = asyncio.create_task(feed.wait_newer(0, 5))
    await asyncio.sleep(0.01)
    await feed.bump()
    assert await asyncio.wait_for(waiter, 1) == 1


@pytest.fixture
async def server(
    provisioned_nats: str, make_database_url: Callable[[str], str], tmp_path: Path
) -> AsyncIterator[tuple[str, str, uvicorn.Server]]:
    token = generate_token("finance")
    tokens = tmp_path / "tokens.yaml"
    save_token_file(tokens, TokenFile(tokens=[TokenEntry(id="fin", department="finance", sha256=hash_token(token))]))
    settings = MetricsSettings(
        nats_url=provisioned_nats,
        database_url=make_database_url("metrics_live"),
        fetch_timeout=0.05,
        tokens_path=tokens,
        graceful_timeout=2,
    )
    app = create_app(settings)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    app.state.server = srv
    task = asyncio.create_task(srv.serve())
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    break
            await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", token, srv
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_projected_is_pushed_and_carries_no_request_data(
    server: tuple[str, str, uvicorn.Server], provisioned_nats: str
) -> None:
    base, token, _srv = server
    frames: list[str] = []
    async with httpx.AsyncClient(timeout=10) as client:
        unauthenticated = await client.get(f"{base}/v1/live/stream")
        assert unauthenticated.status_code == 401
        async with client.stream(
            "GET", f"{base}/v1/live/stream", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            while "event: hello" not in frames:
                frames.append(await asyncio.wait_for(anext(lines), 5))
            nc = await nats.connect(provisioned_nats)
            created = lifecycle("REQ-LIVEPUSH")[0]
            subject, body = subject_and_body(created)
            await nc.jetstream().publish(subject, body, headers={"Nats-Msg-Id": created.event_id})
            await nc.close()
            while "event: projected" not in frames:
                frames.append(await asyncio.wait_for(anext(lines), 10))
            frames.append(await asyncio.wait_for(anext(lines), 5))
    assert frames[-1].startswith("data: ")
    assert frames[-1].removeprefix("data: ").isdigit()  # a version, nothing about the request
    assert not any("REQ-LIVEPUSH" in frame for frame in frames)


async def test_the_stream_ends_when_the_server_shuts_down(server: tuple[str, str, uvicorn.Server]) -> None:
    base, token, srv = server
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("GET", f"{base}/v1/live/stream", headers={"Authorization": f"Bearer {token}"}) as response,
    ):
        lines = response.aiter_lines()
        await asyncio.wait_for(anext(lines), 5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        srv.should_exit = True
        with contextlib.suppress(StopAsyncIteration, httpx.HTTPError):
            while True:
                await asyncio.wait_for(anext(lines), 5)
        assert loop.time() - started < 4, "an open dashboard must not hold up shutdown"
