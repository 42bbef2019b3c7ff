"""The Foundation slice end to end: the four services as processes (exactly as `baton up` runs them),
driven only through NATS subjects and HTTP, as a line-of-business system would."""

from __future__ import annotations

import asyncio
import base64
import re
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from baton.cmd_tokens import token_from_file
from baton.supervisor import Stack, StackConfig
from libs.contracts.subjects import STREAM_DLQ, STREAM_NOTIFY

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, catalog_path: Path) -> AsyncIterator[Stack]:
    config = StackConfig(
        data_dir=tmp_path_factory.mktemp("baton-e2e"),
        catalog_path=catalog_path,
        nats_port=0,
        monitor_port=None,
        http_base_port=0,
        extra_env={
            f"BATON_{name.upper()}_FETCH_TIMEOUT": "0.05" for name in ("intake", "routing", "notifier", "metrics")
        },
    )
    running = Stack(config)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def nc(stack: Stack) -> AsyncIterator[NATS]:
    conn = await nats.connect(stack.nats_url, **stack.client_options())  # the operator (admin) login
    yield conn
    await conn.close()


def envelope(event_type: str, rid: str, dept: str, person: str) -> dict[str, Any]:
    return {
        "type": event_type,
        "event_id": f"evt-{uuid.uuid4().hex[:16]}",
        "request_id": rid,
        "occurred_at": datetime.now(UTC).isoformat(),
        "actor": {"department": dept, "person": person},
        "schema_version": 1,
    }


async def publish(nc: NATS, dept: str, event: dict[str, Any]) -> None:
    ack = await nc.jetstream().publish(
        f"baton.in.{dept}.{event['type']}", orjson.dumps(event), headers={"Nats-Msg-Id": event["event_id"]}
    )
    assert ack.stream == "BATON_IN"


async def notifications(nc: NATS, dept: str, rid: str, expect: int, within: float = 20.0) -> list[dict[str, Any]]:
    """A department's notifications about one request, read without disturbing its durable consumer."""
    js = nc.jetstream()
    deadline = asyncio.get_running_loop().time() + within
    while True:
        sub = await js.pull_subscribe(
            f"baton.notify.{dept}.>", stream=STREAM_NOTIFY, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        )
        found: list[dict[str, Any]] = []
        try:
            while True:
                try:
                    msgs = await sub.fetch(200, timeout=0.3)
                except TimeoutError:
                    break
                found += [n for n in (orjson.loads(m.data) for m in msgs) if n.get("request_id") == rid]
        finally:
            await sub.unsubscribe()
        if len(found) >= expect or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.2)


def operator_headers(stack: Stack) -> dict[str, str]:
    """Metrics checks department tokens (baton up writes them): the operator's sees every request."""
    return {"Authorization": f"Bearer {token_from_file(stack.data_dir / 'tokens.txt', None)}"}


async def timeline(stack: Stack, rid: str, expect_events: int, within: float = 20.0) -> dict[str, Any]:
    url = f"{stack.services['metrics'].url}/v1/requests/{rid}/timeline"
    deadline = asyncio.get_running_loop().time() + within
    async with httpx.AsyncClient(timeout=5, headers=operator_headers(stack)) as client:
        while True:
            response = await client.get(url)
            if response.status_code == 200 and len(response.json()["events"]) >= expect_events:
                return dict(response.json())
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timeline not complete: {response.status_code} {response.text[:500]}")
            await asyncio.sleep(0.2)


async def test_full_lifecycle_reaches_both_departments_and_the_timeline(stack: Stack, nc: NATS) -> None:
    rid = f"REQ-{uuid.uuid4().hex[:8].upper()}"
    created = envelope("created", rid, "marketing", "Ana") | {
        "title": "Laptop for new hire",
        "category": "laptop",
        "priority": "high",
        "requester": {"department": "marketing", "person": "Ana"},
    }
    await publish(nc, "marketing", created)

    # routing picked IT (it serves 'laptop'); IT hears about new work, marketing hears it was routed
    it_notes = await notifications(nc, "it", rid, 1)
    assert [(n["type"], n["role"]) for n in it_notes] == [("routed", "provider")]
    assert it_notes[0]["event"]["rule"] == "category:laptop"
    assert it_notes[0]["trace_id"]

    eta = datetime.now(UTC) + timedelta(days=1)
    await publish(nc, "it", envelope("accepted", rid, "it", "Sam") | {"assignee": "Sam", "eta": eta.isoformat()})
    await notifications(nc, "it", rid, 2)
    delayed = envelope("delayed", rid, "it", "Sam") | {
        "reason": "supplier backorder",
        "new_eta": (eta + timedelta(days=1)).isoformat(),
        "reason_code": "waiting_on_vendor",
    }
    await publish(nc, "it", delayed)
    await notifications(nc, "it", rid, 3)
    resolved = envelope("resolved", rid, "it", "Sam") | {"resolution": "Delivered to desk 4", "outcome": "done"}
    await publish(nc, "it", resolved)

    marketing = await notifications(nc, "marketing", rid, 5)
    it = await notifications(nc, "it", rid, 4)
    assert [n["type"] for n in marketing] == ["created", "routed", "accepted", "delayed", "resolved"]
    assert {n["role"] for n in marketing} == {"requester"}
    assert [n["type"] for n in it] == ["routed", "accepted", "delayed", "resolved"]
    delay_note = next(n for n in marketing if n["type"] == "delayed")
    assert "supplier backorder" in delay_note["text"]
    assert len({n["notification_id"] for n in marketing + it}) == 9
    assert len({n["trace_id"] for n in marketing + it}) == 1

    line = await timeline(stack, rid, 5)
    assert [(e["type"], e["sequence"]) for e in line["events"]] == [
        ("created", 1),
        ("routed", 2),
        ("accepted", 3),
        ("delayed", 4),
        ("resolved", 5),
    ]
    assert line["complete"] is True
    assert line["holder_department"] == "it"
    assert line["trace_id"] == marketing[0]["trace_id"]


async def test_malformed_event_is_refused_and_good_events_flow_on(stack: Stack, nc: NATS) -> None:
    js = nc.jetstream()
    bad_id = f"bad-{uuid.uuid4().hex[:12]}"
    await js.publish("baton.in.finance.created", b"{not json", headers={"Nats-Msg-Id": bad_id})
    missing = envelope("created", f"REQ-{uuid.uuid4().hex[:8].upper()}", "finance", "Marc") | {"category": "laptop"}
    await publish(nc, "finance", missing)
    await js.publish("baton.in.Finance!.created", b"{}", headers={"Nats-Msg-Id": bad_id + "x"})

    rid = f"REQ-{uuid.uuid4().hex[:8].upper()}"
    good = envelope("created", rid, "finance", "Marc") | {
        "title": "ERP access for the new controller",
        "category": "access",
        "priority": "urgent",
        "requester": {"department": "finance", "person": "Marc"},
    }
    await publish(nc, "finance", good)
    assert [n["type"] for n in await notifications(nc, "it", rid, 1)] == ["routed"]

    sub = await js.pull_subscribe(
        "baton.notify.finance.rejected", stream=STREAM_NOTIFY, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    )
    notices = [orjson.loads(m.data) for m in await sub.fetch(50, timeout=2)]
    codes = {n["code"] for n in notices}
    assert {"malformed_json", "validation_failed"} <= codes
    invalid = next(n for n in notices if n["code"] == "validation_failed")
    assert invalid["event_id"] == missing["event_id"]
    assert {tuple(e["loc"]) for e in invalid["errors"]} >= {("title",), ("priority",), ("requester",)}

    dlq = await js.pull_subscribe(
        "baton.dlq.intake.>", stream=STREAM_DLQ, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    )
    letters = [orjson.loads(m.data) for m in await dlq.fetch(50, timeout=2)]
    subjects = {letter["original_subject"] for letter in letters}
    assert {"baton.in.finance.created", "baton.in.Finance!.created"} <= subjects
    assert any(base64.b64decode(letter["payload"]) == b"{not json" for letter in letters)

    # intake is still up and ready
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{stack.services['intake'].url}/readyz")).status_code == 200


async def test_stack_restarts_with_data_intact(stack: Stack, nc: NATS) -> None:
    """A killed service is restarted by the supervisor and carries on from its durable consumer."""
    rid = f"REQ-{uuid.uuid4().hex[:8].upper()}"
    await stack.kill_service("notifier")
    created = envelope("created", rid, "hr", "Priya") | {
        "title": "Onboarding pack",
        "category": "onboarding",
        "priority": "normal",
        "requester": {"department": "it", "person": "Sam"},
    }
    created["actor"]["department"] = "it"
    await publish(nc, "it", created)
    notes = await notifications(nc, "hr", rid, 1, within=40)
    assert [n["type"] for n in notes] == ["routed"]


async def test_second_baton_up_resumes_with_the_data_intact(tmp_path: Path, catalog_path: Path) -> None:
    """Stop everything (as Ctrl-C does), start again on the same data directory: nothing is lost."""
    config = StackConfig(
        data_dir=tmp_path / "baton", catalog_path=catalog_path, nats_port=0, monitor_port=None, http_base_port=0
    )
    rid = f"REQ-{uuid.uuid4().hex[:8].upper()}"
    first = Stack(config)
    await first.start()
    try:
        conn = await nats.connect(first.nats_url, **first.client_options())
        created = envelope("created", rid, "legal", "Grace") | {
            "title": "Badge for external counsel",
            "category": "badge",
            "priority": "low",
            "requester": {"department": "legal", "person": "Grace"},
        }
        await publish(conn, "legal", created)
        assert [n["type"] for n in await notifications(conn, "facilities", rid, 1)] == ["routed"]
        await timeline(first, rid, 2)
        await conn.close()
    finally:
        await first.stop()

    config.nats_port = first.nats.port if first.nats else 0  # the same NATS URL, as a fixed port gives
    second = Stack(config)
    await second.start()
    try:
        conn = await nats.connect(second.nats_url, **second.client_options())
        eta = datetime.now(UTC) + timedelta(hours=4)
        accepted = envelope("accepted", rid, "facilities", "Luis") | {"assignee": "Luis", "eta": eta.isoformat()}
        await publish(conn, "facilities", accepted)
        line = await timeline(second, rid, 3)
        assert [e["type"] for e in line["events"]] == ["created", "routed", "accepted"]
        legal = await notifications(conn, "legal", rid, 3)
        assert [n["type"] for n in legal] == ["created", "routed", "accepted"]
        await conn.close()
    finally:
        await second.stop()


async def test_the_contract_doc_example_runs(stack: Stack, nc: NATS, tmp_path: Path) -> None:
    """docs/contract.md promises a copy-paste nats-py example: run it, verbatim but for the URL and the
    credentials directory (each department connects as itself)."""
    doc = (Path(__file__).parents[2] / "docs" / "contract.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'NATS_URL = "nats://127.0.0.1:14222"' in code
    script = tmp_path / "example.py"
    assert 'CREDENTIALS = Path(".baton/nats/creds/departments")' in code
    departments = stack.credentials("department", "it").parent
    script.write_text(
        code.replace("nats://127.0.0.1:14222", stack.nats_url).replace(
            ".baton/nats/creds/departments", str(departments)
        )
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "created stored as BATON_IN" in text
    assert "accepted stored as BATON_IN" in text
    found = re.findall(r"\(?(REQ-[0-9A-F]{8})\)?", text)
    assert found, text
    rid = found[-1]
    line = await timeline(stack, rid, 3)
    assert [e["type"] for e in line["events"]] == ["created", "routed", "accepted"]


async def test_dashboard_pages_render_requests_and_escape_user_text(stack: Stack, nc: NATS) -> None:
    rid = f"REQ-{uuid.uuid4().hex[:8].upper()}"
    title = "<script>alert('x')</script> & new chairs"
    created = envelope("created", rid, "hr", "Priya") | {
        "title": title,
        "category": "desk",
        "priority": "low",
        "requester": {"department": "hr", "person": "Priya"},
    }
    await publish(nc, "hr", created)
    await timeline(stack, rid, 2)
    base = stack.services["metrics"].url
    async with httpx.AsyncClient(timeout=5, headers=operator_headers(stack)) as client:
        index = await client.get(f"{base}/")
        page = await client.get(f"{base}/requests/{rid}")
        missing = await client.get(f"{base}/requests/REQ-NOPE0000")
    assert index.status_code == 200
    assert rid in index.text
    assert page.status_code == 200
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; new chairs" in page.text
    assert "<script>alert" not in page.text
    assert "facilities" in page.text  # routed to the department that serves 'desk'
    assert missing.status_code == 404
