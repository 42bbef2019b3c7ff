"""The dashboard in real headless Chromium, on a running stack with demo traffic.

Chromium is Debian's ``chromium`` package (``scripts/bootstrap.sh`` installs it; ``make setup`` runs
that), driven by Playwright through ``executable_path``: Playwright's own browser download is never
used. Screenshots go to ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright

from baton.cmd_tokens import token_from_file
from baton.demo import Demo
from baton.supervisor import Stack, StackConfig

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SERVICES = ("intake", "routing", "notifier", "metrics")


@dataclass
class Running:
    stack: Stack
    url: str
    operator: str
    token: dict[str, str]


async def wait_for(probe: Any, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s")
        await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory, catalog_path: Path) -> AsyncIterator[Running]:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run `make setup` (scripts/bootstrap.sh installs it)")
    config = StackConfig(
        data_dir=tmp_path_factory.mktemp("baton-browser"),
        catalog_path=catalog_path,
        nats_port=0,
        monitor_port=None,
        http_base_port=0,
        extra_env={
            **{f"BATON_{name.upper()}_FETCH_TIMEOUT": "0.05" for name in SERVICES},
            "BATON_METRICS_LIVE_POLL_SECONDS": "1",
        },
    )
    stack = Stack(config)
    demo_task: asyncio.Task[None] | None = None
    try:
        await stack.start()
        operator = token_from_file(stack.data_dir / "tokens.txt", None)
        assert operator, "baton up writes an operator token to <data_dir>/tokens.txt"
        url = stack.services["metrics"].url
        demo = Demo(
            stack.nats_url,
            interval=0.3,
            speed=8.0,
            seed=3,
            options=lambda dept: stack.client_options("department", dept) if dept else stack.client_options(),
        )
        demo_task = asyncio.create_task(demo.run(requests=14))

        async def enough() -> bool:
            async with httpx.AsyncClient(timeout=5) as client:
                r = await client.get(f"{url}/v1/scorecards", headers={"Authorization": f"Bearer {operator}"})
            if r.status_code != 200:
                return False
            resolved = sum(c["provider"]["resolved"] for c in r.json()["departments"])
            return bool(resolved >= 6)

        await wait_for(enough, 120, "six resolved demo requests in the scorecards")
        tokens = {d: token_from_file(stack.data_dir / "tokens.txt", d) or "" for d in ("it", "legal")}
        yield Running(stack, url, operator, tokens)
    finally:
        if demo_task is not None:
            demo_task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(demo_task, 10)
        await stack.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


async def sign_in(browser: Browser, running: Running, token: str, start: str = "/") -> Page:
    context = await browser.new_context(viewport={"width": 1366, "height": 900})
    page = await context.new_page()
    await page.goto(running.url + start)
    assert "/login" in page.url  # not signed in yet
    await page.fill("input[name=token]", token)
    await page.click("button[type=submit]")
    await page.wait_for_load_state("domcontentloaded")
    return page


def shot(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


async def test_scorecards_and_service_map_render_with_real_data(browser: Browser, running: Running) -> None:
    page = await sign_in(browser, running, running.operator)
    await page.wait_for_selector("#scorecard-table tbody tr")
    rows = await page.locator("#scorecard-table tbody tr").count()
    assert rows >= 8  # every department of the catalog, the vendor included
    assert await page.locator('#scorecard-table tr[data-department="acme-it"] .badge').inner_text() == "vendor"
    received = [int(t) for t in await page.locator("#scorecard-table tbody tr td:nth-child(2)").all_inner_texts()]
    assert sum(received) >= 6
    assert await page.locator("#scorecard-table polyline").count() > 0  # sparklines drawn
    edges = page.locator("#service-map-table td[data-edge]")
    assert await edges.count() >= 3
    assert await page.locator("#recent-table tbody tr").count() >= 6
    # The page listens to the server's push stream (SSE) and says so once connected.
    await wait_for(lambda: _text(page, "#live"), 10, "the live-update stream to connect")
    await wait_for(lambda: _text(page, "#live", "updated"), 20, "a pushed update from the demo traffic")
    await page.screenshot(path=str(shot("dashboard.png")), full_page=True)

    await page.locator("#scorecard-table a", has_text="IT Operations").click()
    await page.wait_for_selector("#provider-kpis")
    assert "As requester" in await page.content()
    await page.screenshot(path=str(shot("department-it.png")), full_page=True)
    await page.context.close()


async def _text(page: Page, selector: str, word: str = "") -> bool:
    text = await page.locator(selector).inner_text()
    return "live (push)" in text and word in text


async def test_a_request_timeline_draws_swimlanes(browser: Browser, running: Running) -> None:
    page = await sign_in(browser, running, running.operator)
    # A finished request: resolved, or already closed by the requester's feedback.
    resolved = page.locator("#recent-table tbody tr", has=page.locator(".state-resolved, .state-closed"))
    await resolved.first.locator("a").first.click()
    await page.wait_for_selector("#swimlanes")
    lanes = await page.locator("#swimlanes text[data-lane]").all_inner_texts()
    assert len(lanes) >= 2  # the requester and at least one provider
    bars = await page.locator("#swimlanes rect.working, #swimlanes rect.waiting").count()
    assert bars >= 2
    assert await page.locator("#events tbody tr").count() >= 4  # created, routed, accepted, resolved
    await page.screenshot(path=str(shot("request-timeline.png")), full_page=True)
    await page.context.close()


async def test_a_department_cannot_open_a_request_it_is_not_party_to(browser: Browser, running: Running) -> None:
    legal = running.token["legal"]
    async with httpx.AsyncClient(timeout=5, base_url=running.url) as client:
        everything = await client.get(
            "/v1/requests", params={"limit": 200}, headers={"Authorization": f"Bearer {running.operator}"}
        )
        own = await client.get("/v1/requests", params={"limit": 200}, headers={"Authorization": f"Bearer {legal}"})
    theirs = {r["request_id"] for r in own.json()}
    foreign = next(r["request_id"] for r in everything.json() if r["request_id"] not in theirs)
    async with httpx.AsyncClient(timeout=5, base_url=running.url) as client:
        api = await client.get(f"/v1/requests/{foreign}/timeline", headers={"Authorization": f"Bearer {legal}"})
    assert api.status_code == 404
    page = await sign_in(browser, running, legal, start=f"/requests/{foreign}")
    assert "Not found" in await page.content()
    assert await page.locator("#swimlanes").count() == 0
    await page.screenshot(path=str(shot("not-party.png")))
    await page.context.close()
