"""The live feed (Server-Sent Events over real HTTP) and ``baton tail``, against a real nats-server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import orjson
import pytest
import uvicorn

from baton.cmd_notify import follow, format_line
from baton.natsserver import free_port
from libs.contracts.subjects import STREAM_EVENTS
from services.notifier.app import create_app
from tests.conftest import MakeDatabaseUrl
from tests.integration.test_notifier_webhooks import settings_for, settle
from tests.notifier_events import EXPECTED, lifecycle, subject_and_body, write_tokens

pytestmark = pytest.mark.integration


def new_rid() -> str:
    return f"REQ-{uuid.uuid4().hex[:10].upper()}"


@pytest.fixture
async def served(
    provisioned_nats: str, make_database_url: MakeDatabaseUrl, catalog_path: Path, tmp_path: Path
) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """The notifier on a real HTTP port: (base URL, tokens)."""
    tokens = write_tokens(tmp_path / "tokens.yaml", ["it", "finance", "legal"])
    settings = settings_for(
        provisioned_nats, make_database_url("notifier"), catalog_path, tmp_path / "tokens.yaml", feed_heartbeat=0.2
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", tokens
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def publish_lifecycle(url: str, rid: str) -> None:
    nc = await nats.connect(url)
    try:
        for event in lifecycle(rid):
            subject, body = subject_and_body(event)
            await nc.jetstream().publish(subject, body, stream=STREAM_EVENTS, headers={"Nats-Msg-Id": event.event_id})
    finally:
        await nc.close()


async def read_frames(response: httpx.Response, want: int) -> list[dict[str, str]]:
    """Parse SSE frames until ``want`` events arrived (comments and the retry hint are skipped)."""
    frames: list[dict[str, str]] = []
    current: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in current:
                frames.append(current)
                if len(frames) >= want:
                    return frames
            current = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        current[key] = value
    return frames


async def test_the_feed_streams_a_departments_notifications_live_and_resumes_from_last_event_id(
    served: tuple[str, dict[str, str]], provisioned_nats: str
) -> None:
    base, tokens = served
    rid = new_rid()
    headers = {"Authorization": f"Bearer {tokens['legal']}"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        async with client.stream("GET", "/v1/departments/legal/feed", headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            publisher = asyncio.create_task(publish_lifecycle(provisioned_nats, rid))
            frames = await asyncio.wait_for(read_frames(response, 3), 15)
            await publisher
        assert [f["event"] for f in frames] == [kind for kind, _ in EXPECTED["legal"]]
        notes = [orjson.loads(f["data"]) for f in frames]
        assert {n["department"] for n in notes} == {"legal"}
        assert {n["request_id"] for n in notes} == {rid}

        # resume after the first frame: the next two again, nothing of other departments
        resume = {**headers, "Last-Event-ID": frames[0]["id"]}
        async with client.stream("GET", "/v1/departments/legal/feed", headers=resume) as response:
            again = await asyncio.wait_for(read_frames(response, 2), 15)
        assert [f["id"] for f in again] == [f["id"] for f in frames[1:]]

        # the department's own token only; an operator's reaches any
        assert (await client.get("/v1/departments/legal/feed")).status_code == 401
        it_token = {"Authorization": f"Bearer {tokens['it']}"}
        assert (await client.get("/v1/departments/legal/feed", headers=it_token)).status_code == 403
        operator = {"Authorization": f"Bearer {tokens['operator']}", "Last-Event-ID": "0"}
        async with client.stream("GET", "/v1/departments/it/feed", headers=operator) as response:
            it_frames = await asyncio.wait_for(read_frames(response, 4), 15)
        assert [f["event"] for f in it_frames] == [kind for kind, _ in EXPECTED["it"]]


async def test_tail_resumes_on_the_department_consumer_and_replays_with_since(
    served: tuple[str, dict[str, str]], provisioned_nats: str
) -> None:
    rid = new_rid()
    await publish_lifecycle(provisioned_nats, rid)
    nc = await nats.connect(provisioned_nats)
    try:
        await settle(nc)
    finally:
        await nc.close()

    first: list[bytes] = []
    assert await follow("finance", provisioned_nats, None, first.append, limit=2) == 2
    rest: list[bytes] = []
    assert await follow("finance", provisioned_nats, None, rest.append, idle_exit=1.0) == 3  # resumed after 2
    kinds = [orjson.loads(m)["type"] for m in first + rest]
    assert kinds == [kind for kind, _ in EXPECTED["finance"]]
    replay: list[bytes] = []
    assert await follow("finance", provisioned_nats, "1h", replay.append, idle_exit=1.0) == 5  # durable untouched
    assert replay == first + rest

    line = format_line(rest[1], colour=False)
    assert "delayed" in line
    assert "[requester] IT Operations delayed 'Laptop for new hire'" in line
    assert "\x1b[" in format_line(rest[1], colour=True)


async def test_the_webhooks_and_digest_commands_drive_the_api(served: tuple[str, dict[str, str]]) -> None:
    from typer.testing import CliRunner

    from baton.cli import app as cli

    base, tokens = served
    runner = CliRunner()

    async def baton(*args: str, who: str = "it") -> str:
        env = {"BATON_TOKEN": tokens[who], "BATON_NOTIFIER_URL": base}
        result = await asyncio.to_thread(runner.invoke, cli, list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.output

    added = await baton("webhooks", "add", "it", "https://chat.example/hook", "--type", "delayed", "--format", "slack")
    assert "signing secret" in added
    assert "whsec_" in added
    hook_id = added.split()[1]
    assert "https://chat.example/hook  (delayed)" in await baton("webhooks", "list", "it")
    assert "no failed deliveries" in await baton("webhooks", "failed")
    assert "no failed deliveries" in await baton("webhooks", "failed", who="operator")
    assert f"removed {hook_id}" in await baton("webhooks", "remove", "it", hook_id)
    shown = await baton("digest", "set", "it", "sla_warning=hourly", "commented=daily", "--daily-at", "9")
    assert "daily digest at 09:00" in shown
    assert "sla_warning            hourly" in shown
    denied = await asyncio.to_thread(
        runner.invoke,
        cli,
        ["webhooks", "list", "finance"],
        env={"BATON_TOKEN": tokens["it"], "BATON_NOTIFIER_URL": base},
    )
    assert denied.exit_code == 1
    assert "403" in denied.output
