"""The notifier as a real process (``python -m services.notifier``), killed with SIGKILL in the middle of a burst
and started again: every department's stream holds each expected notification exactly once (JetStream drops
the republished copies by ``Nats-Msg-Id`` = ``notification_id``), and the webhook worker picks its queue up
where it stopped (every notification delivered, at least once)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import orjson
import pytest

from baton.natsserver import free_port
from libs.contracts.subjects import STREAM_EVENTS, STREAM_NOTIFY
from tests.conftest import ROOT, MakeDatabaseUrl
from tests.integration.test_notifier_webhooks import settle
from tests.notifier_events import EXPECTED, hook_server, lifecycle, subject_and_body, write_tokens

pytestmark = pytest.mark.integration

REQUESTS = 60
EVENTS_PER_REQUEST = 5
PER_REQUEST = sum(len(v) for v in EXPECTED.values())  # 12 notifications per lifecycle


class Notifier:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.url = f"http://127.0.0.1:{env['BATON_NOTIFIER_HTTP_PORT']}"

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.notifier", env=self.env, cwd=ROOT, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=1) as client:
            while True:
                assert self.proc.returncode is None, f"notifier exited: {self.log.read_text()[-2000:]}"
                try:
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"notifier not ready: {self.log.read_text()[-2000:]}"
                await asyncio.sleep(0.1)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no drain, no goodbye
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.fixture
async def notifier(
    provisioned_nats: str, make_database_url: MakeDatabaseUrl, catalog_path: Path, tmp_path: Path
) -> AsyncIterator[tuple[Notifier, dict[str, str]]]:
    tokens = write_tokens(tmp_path / "tokens.yaml", ["it"])
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "BATON_NOTIFIER_NATS_URL": provisioned_nats,
        "BATON_NOTIFIER_DATABASE_URL": make_database_url("notifier"),
        "BATON_NOTIFIER_CATALOG_PATH": str(catalog_path),
        "BATON_NOTIFIER_TOKENS_PATH": str(tmp_path / "tokens.yaml"),
        "BATON_NOTIFIER_HTTP_PORT": str(free_port()),
        "BATON_NOTIFIER_RETRY_DELAY": "0.2",
        "BATON_NOTIFIER_GAP_DELAY": "0.1",
        "BATON_NOTIFIER_GAP_MAX_DELAY": "0.4",
        "BATON_NOTIFIER_WEBHOOK_POLL_INTERVAL": "0.05",
        "BATON_NOTIFIER_WEBHOOK_BACKOFF_BASE": "0.05",
        "BATON_NOTIFIER_WEBHOOK_TIMEOUT": "2",  # an attempt cut by the kill is retried when its lease (7 s) ends
        "BATON_NOTIFIER_LOG_LEVEL": "WARNING",
    }
    proc = Notifier(env, tmp_path / "notifier.log")
    await proc.start()
    try:
        yield proc, tokens
    finally:
        await proc.stop()


async def test_kill_9_mid_burst_then_restart_leaves_each_notification_exactly_once(
    notifier: tuple[Notifier, dict[str, str]], provisioned_nats: str
) -> None:
    proc, tokens = notifier
    nc = await nats.connect(provisioned_nats)
    js, jsm = nc.jetstream(), nc.jsm()
    total = REQUESTS * PER_REQUEST
    with hook_server() as server:
        async with httpx.AsyncClient(base_url=proc.url, headers={"Authorization": f"Bearer {tokens['it']}"}) as api:
            created = await api.post("/v1/departments/it/webhooks", json={"url": server.url + "/it"})
            assert created.status_code == 201

        rids = [f"REQ-{uuid.uuid4().hex[:10].upper()}" for _ in range(REQUESTS)]
        events = [e for rid in rids for e in lifecycle(rid)]
        for event in events:
            subject, body = subject_and_body(event)
            await js.publish(subject, body, stream=STREAM_EVENTS, headers={"Nats-Msg-Id": event.event_id})

        # kill -9 once a part of the burst is out, well before all of it
        while (stored := (await jsm.stream_info(STREAM_NOTIFY)).state.messages) < total // 5:
            await asyncio.sleep(0.005)
        await proc.kill()
        at_kill = (await jsm.stream_info(STREAM_NOTIFY)).state.messages
        assert stored < total, "the burst was over before the kill: make it bigger"
        assert at_kill < total, "the burst was over before the kill: make it bigger"

        started = time.monotonic()
        await proc.start()
        await settle(nc, within=60)
        recovered_in = time.monotonic() - started

        state = (await jsm.stream_info(STREAM_NOTIFY)).state
        ids: Counter[str] = Counter()
        got: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
        for seq in range(state.first_seq, state.last_seq + 1):
            msg = await jsm.get_msg(STREAM_NOTIFY, seq)
            note = orjson.loads(msg.data or b"")
            assert (msg.headers or {})["Nats-Msg-Id"] == note["notification_id"]
            ids[note["notification_id"]] += 1
            got[note["request_id"]][note["department"]].append((note["type"], note["role"]))
        assert state.messages == total, f"{state.messages} notifications, expected {total}"
        assert max(ids.values()) == 1
        assert set(got) == set(rids)
        for rid in rids:
            assert dict(got[rid]) == EXPECTED, rid  # per department, in sequence order

        # the webhook queue survived the kill: every one of IT's notifications arrives (at least once)
        it_ids: set[str] = set()
        for seq in range(state.first_seq, state.last_seq + 1):
            note = orjson.loads((await jsm.get_msg(STREAM_NOTIFY, seq)).data or b"")
            if note["department"] == "it":
                it_ids.add(note["notification_id"])

        def delivered() -> set[str]:
            return {h.headers["Baton-Notification-Id"] for h in server.on("/it") if h.status == 200}

        deadline = time.monotonic() + 30
        while delivered() != it_ids:
            assert time.monotonic() < deadline, f"{len(it_ids - delivered())} webhook deliveries missing"
            await asyncio.sleep(0.05)
        repeats = len(server.on("/it")) - len(it_ids)
        webhooks_done_in = time.monotonic() - started
    await nc.close()
    print(  # the numbers docs/notifications.md quotes
        f"\nkill -9 after {at_kill}/{total} notifications; restart to settled in {recovered_in:.2f}s; "
        f"webhook deliveries complete {webhooks_done_in:.2f}s after the restart, repeats: {repeats}"
    )
