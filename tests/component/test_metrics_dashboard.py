"""Metrics' HTTP side, wired as ``create_app`` builds it: the JSON API, the dashboard pages, sign-in and the
rule of who sees what, Prometheus' business series. The scripted scenario is fed through the service's
own processor (the broker path is covered by test_metrics_wiring.py and the integration tests)."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from libs.contracts import dumps
from libs.contracts.subjects import event_subject
from libs.contracts.tokens import TokenEntry, TokenFile, generate_token, hash_token, save_token_file
from services.metrics.access import COOKIE
from services.metrics.app import create_app
from services.metrics.handlers import Inbound
from services.metrics.settings import MetricsSettings
from tests.metrics_scenario import EVENTS, NOW

pytestmark = pytest.mark.component

TOKENS = {name: generate_token(None if name == "operator" else name) for name in ("finance", "hr", "it", "operator")}


def write_tokens(path: Path) -> Path:
    entries = [
        TokenEntry(
            id=f"{name}-1",
            department=None if name == "operator" else name,
            operator=name == "operator",
            sha256=hash_token(token),
        )
        for name, token in TOKENS.items()
    ]
    save_token_file(path, TokenFile(tokens=entries))
    return path


async def feed(app: FastAPI) -> None:
    seq = 0
    for events in EVENTS.values():
        for event in events:
            seq += 1
            msg = Inbound(event_subject(event.request_id, event.type), dumps(event), {}, seq, 1)
            await app.state.processor.process(msg)


async def make_client(
    settings: MetricsSettings, catalog_path: Path | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings, clock=lambda: NOW)
    await app.state.database.start()
    try:
        await feed(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://metrics") as http:
            yield app, http
    finally:
        await app.state.database.close()


@pytest.fixture
async def guarded(make_database_url: Callable[[str], str], tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = MetricsSettings(
        nats_url="nats://127.0.0.1:1",
        database_url=make_database_url("dash"),
        tokens_path=write_tokens(tmp_path / "tokens.yaml"),
        jaeger_url="http://jaeger.example:16686",
    )
    async for _app, http in make_client(settings):
        yield http


@pytest.fixture
async def open_client(make_database_url: Callable[[str], str]) -> AsyncIterator[httpx.AsyncClient]:
    settings = MetricsSettings(nats_url="nats://127.0.0.1:1", database_url=make_database_url("open"))
    async for _app, http in make_client(settings):
        yield http


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


# --- who sees what -----------------------------------------------------------------------------
async def test_a_department_cannot_read_the_timeline_of_a_request_it_is_not_party_to_via_the_api(
    guarded: httpx.AsyncClient,
) -> None:
    r3 = "/v1/requests/REQ-R3-VENDR/timeline"  # hr raised it; it and acme-it held it; finance never touched it
    assert (await guarded.get(r3)).status_code == 401
    assert (await guarded.get(r3, headers={"Authorization": "Bearer bt_finance_forged"})).status_code == 401
    denied = await guarded.get(r3, headers=bearer("finance"))
    assert denied.status_code == 404  # answered like an unknown request: ids cannot be probed
    assert denied.headers["content-type"] == "application/problem+json"
    assert "Vendor" not in denied.text
    assert "VENDR <b>" not in denied.text
    for allowed in ("hr", "it", "operator"):  # requester, past holder, operator
        assert (await guarded.get(r3, headers=bearer(allowed))).status_code == 200
    # party as watcher (R1) and as the provider that declined (R4)
    assert (await guarded.get("/v1/requests/REQ-R1-WKEND/timeline", headers=bearer("finance"))).status_code == 200
    listed = (await guarded.get("/v1/requests", headers=bearer("finance"))).json()
    assert sorted(r["request_id"] for r in listed) == ["REQ-R1-WKEND", "REQ-R4-DECLN"]
    assert (await guarded.get("/v1/requests/REQ-R3-VENDR/postmortem", headers=bearer("finance"))).status_code == 404
    assert (await guarded.get("/v1/requests/REQ-R3-VENDR/postmortem", headers=bearer("hr"))).status_code == 200
    # ... while every department sees every scorecard
    cards = (await guarded.get("/v1/scorecards", headers=bearer("finance"))).json()
    assert {c["department"] for c in cards["departments"]} >= {"it", "acme-it", "hr", "marketing", "finance"}


async def test_a_department_cannot_read_the_timeline_of_a_request_it_is_not_party_to_via_the_ui(
    guarded: httpx.AsyncClient,
) -> None:
    page = "/requests/REQ-R3-VENDR"
    anonymous = await guarded.get(page)
    assert (anonymous.status_code, anonymous.headers["location"]) == (303, "/login?next=/requests/REQ-R3-VENDR")

    wrong = await guarded.post("/login", content=f"token=bt_finance_nope&next={page}")
    assert wrong.status_code == 303
    assert wrong.headers["location"].startswith("/login?failed=1")
    signed = await guarded.post(
        "/login",
        content=f"token={TOKENS['finance']}&next=/requests/REQ-R1-WKEND",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert (signed.status_code, signed.headers["location"]) == (303, "/requests/REQ-R1-WKEND")
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert TOKENS["finance"] in cookie
    guarded.cookies.set(COOKIE, TOKENS["finance"])
    try:
        denied = await guarded.get(page)
        assert denied.status_code == 404
        assert "REQ-R3-VENDR <b>" not in denied.text
        assert "swimlanes" not in denied.text
        assert (await guarded.get(page + "/postmortem")).status_code == 404
        assert (await guarded.get("/v1/requests/REQ-R3-VENDR/timeline")).status_code == 404  # the cookie, on the API
        assert (await guarded.get("/requests/REQ-R1-WKEND")).status_code == 200
        # the department page of IT shows finance the scorecard but not IT's open work for other departments
        it_page = (await guarded.get("/departments/it")).text
        assert "REQ-R5-OPEN1" not in it_page
        assert "REQ-R6-OPEN2" not in it_page
        assert "2 more open request(s) your department is not party to" in it_page
        assert "quick &lt;script&gt;" in it_page  # R1's feedback comment: finance watches R1
    finally:
        guarded.cookies.clear()
    guarded.cookies.set(COOKIE, TOKENS["hr"])
    try:
        assert (await guarded.get(page)).status_code == 200
        it_page = (await guarded.get("/departments/it")).text
        assert "quick" not in it_page
        assert "not party" in it_page
    finally:
        guarded.cookies.clear()


async def test_login_never_redirects_off_site(guarded: httpx.AsyncClient) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil"):
        response = await guarded.post("/login", content=f"token={TOKENS['it']}&next={target}")
        assert response.headers["location"] == "/"


async def test_open_access_without_a_token_file_says_so(open_client: httpx.AsyncClient) -> None:
    who = (await open_client.get("/v1/whoami")).json()
    assert who["open_access"] is True
    page = (await open_client.get("/")).text
    assert "Open access:" in page
    assert (await open_client.get("/v1/requests/REQ-R3-VENDR/timeline")).status_code == 200


# --- the JSON API and exports --------------------------------------------------------------------
async def test_scorecards_api_and_csv_export(guarded: httpx.AsyncClient) -> None:
    cards = (await guarded.get("/v1/scorecards", params={"window": "30d"}, headers=bearer("it"))).json()
    it = next(c for c in cards["departments"] if c["department"] == "it")
    assert (it["provider"]["received"], it["provider"]["sla_accept"]["attainment"]) == (5, 0.75)
    one = (await guarded.get("/v1/departments/acme-it/scorecard", headers=bearer("it"))).json()
    assert (one["kind"], one["provider"]["reopen_rate"]) == ("unknown", 0.5)  # no catalog configured here
    assert (await guarded.get("/v1/departments/nobody/scorecard", headers=bearer("it"))).status_code == 404
    assert (await guarded.get("/v1/scorecards?window=5m", headers=bearer("it"))).status_code == 422
    assert (await guarded.get("/v1/scorecards?window=;drop", headers=bearer("it"))).status_code == 422

    exported = await guarded.get("/v1/scorecards.csv", params={"window": "30d"}, headers=bearer("it"))
    assert exported.headers["content-type"].startswith("text/csv")
    assert "attachment" in exported.headers["content-disposition"]
    rows = {r["department"]: r for r in csv.DictReader(io.StringIO(exported.text))}
    assert (rows["it"]["received"], rows["marketing"]["requests_raised"]) == ("5", "4")

    short = (await guarded.get("/v1/scorecards", params={"window": "7d"}, headers=bearer("it"))).json()
    it7 = next(c for c in short["departments"] if c["department"] == "it")
    assert it7["provider"]["received"] == 3  # since Mon 23 12:00: R3 Tue 24, R5 Thu 26, R6 Mon 30

    smap = (await guarded.get("/v1/service-map", headers=bearer("finance"))).json()
    assert {(e["requester"], e["provider"]) for e in smap["edges"]} == {
        ("marketing", "it"),
        ("marketing", "finance"),
        ("hr", "it"),
        ("hr", "acme-it"),
    }


async def test_postmortems(guarded: httpx.AsyncClient) -> None:
    pm = (await guarded.get("/v1/requests/REQ-R3-VENDR/postmortem", headers=bearer("operator"))).json()
    assert pm["why"] == [
        "it breached its accept SLA (escalated)",
        "acme-it breached its resolve SLA (escalated)",
        "handoff loop detected (quick_reassign)",
    ]
    assert pm["chain"] == ["hr", "it", "acme-it", "acme-it"]
    first = pm["commitments"][1]
    assert (first["department"], first["verdict"]) == (
        "acme-it",
        "delivered 18h 00m after the first ETA, and after the last one",
    )
    r2 = (await guarded.get("/v1/requests/REQ-R2-PAUSE/postmortem", headers=bearer("operator"))).json()
    assert r2["why"] == ["delayed 2 times"]
    assert [(d["reason_code"], d["lasted_seconds"]) for d in r2["delays"]] == [
        ("capacity", 22 * 3600.0),
        ("waiting_on_requester", 26 * 3600.0),
    ]
    assert (await guarded.get("/v1/requests/REQ-R1-WKEND/postmortem", headers=bearer("operator"))).status_code == 404

    md = await guarded.get("/v1/requests/REQ-R3-VENDR/postmortem.md", headers=bearer("hr"))
    assert md.headers["content-type"].startswith("text/markdown")
    assert 'filename="postmortem-REQ-R3-VENDR.md"' in md.headers["content-disposition"]
    assert md.text.startswith("# Post-mortem: REQ-R3-VENDR — Request REQ-R3-VENDR \\<b\\>&amp;\\</b\\>")
    assert "| acme-it (reassigned) |" in md.text
    assert "## Committed versus delivered" in md.text


# --- pages -------------------------------------------------------------------------------------
async def test_pages_render_real_numbers_and_escape_user_text(guarded: httpx.AsyncClient) -> None:
    guarded.cookies.set(COOKIE, TOKENS["operator"])
    try:
        index = (await guarded.get("/")).text
        assert 'id="scorecard-table"' in index
        assert 'data-department="acme-it"' in index
        assert 'data-edge="hr→acme-it"' in index
        assert "h-poor" in index
        assert "<polyline" in index
        assert "&lt;b&gt;&amp;amp;&lt;/b&gt;" in index
        assert "<b>&amp;</b>" not in index

        r3 = (await guarded.get("/requests/REQ-R3-VENDR")).text
        assert '<svg id="swimlanes"' in r3
        assert r3.count('class="marker-breach"') == 2  # it's accept, acme-it's resolve
        assert 'href="http://jaeger.example:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736"' in r3
        assert 'href="/requests/REQ-R3-VENDR/postmortem"' in r3
        r2 = (await guarded.get("/requests/REQ-R2-PAUSE")).text
        assert r2.count('class="marker-delay"') == 2

        r1 = (await guarded.get("/requests/REQ-R1-WKEND")).text
        assert "<script>alert(1)</script>" not in r1
        it_page = (await guarded.get("/departments/it?window=30d")).text
        assert "quick &lt;script&gt;alert(1)&lt;/script&gt;" in it_page  # the operator sees the comment, escaped
        assert 'id="open-work"' in it_page
        assert "REQ-R5-OPEN1" in it_page
        assert (await guarded.get("/requests/REQ-R3-VENDR/postmortem")).status_code == 200
        assert (await guarded.get("/v1/live")).json()["events"] == sum(len(e) for e in EVENTS.values())
    finally:
        guarded.cookies.clear()


async def test_prometheus_business_series(guarded: httpx.AsyncClient) -> None:
    text = (await guarded.get("/metrics/")).text
    assert 'baton_open_requests{department="it"} 2.0' in text
    assert 'baton_time_to_accept_seconds_count{department="it"} 5.0' in text  # R0 R1 R2 R3 R5
    assert 'baton_time_to_resolve_seconds_count{department="acme-it"} 2.0' in text
    assert 'baton_escalations_total{clock="accept",department="it"} 1.0' in text
    assert 'baton_delays_total{department="it",reason="waiting_on_requester"} 1.0' in text
