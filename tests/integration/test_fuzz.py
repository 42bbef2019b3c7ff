"""Hostile input at intake's entry points: NATS ``baton.in.<dept>.<type>`` and the HTTP API.

Hypothesis (derandomized, no example database) builds inputs that are each invalid *by construction*
(malformed JSON, oversize fields, wrong types, subject-injection strings in ids, slugs and event types,
unknown or intake-stamped fields), optionally dressed with harmless unicode (control characters, RTL
marks, emoji) in free-text fields. Against a real intake (in-process), a real nats-server and a real
database we assert: no exception and no 5xx; nothing changed (requests and events in intake's
database, messages on BATON_EVENTS); every refusal explained: problem+json with a code, a message and
field errors (HTTP), a Rejection on ``baton.notify.<dept>.rejected`` and a dead letter (NATS).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import nats
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from sqlalchemy import func, select

from baton.cmd_tokens import issue_token
from libs.contracts.subjects import STREAM_DLQ, STREAM_EVENTS, STREAM_NOTIFY
from services.intake import db
from services.intake.app import create_app
from services.intake.settings import IntakeSettings
from tests.intake_events import created, env, intake_settled, new_rid, publish

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    # The examples run in a worker thread while intake runs on the event loop; the loop's own use of `random`
    # (client jitter) trips Hypothesis' "random inside strategies" check. The strategies use none.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

EXAMPLES = 150
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
T = TypeVar("T")

# --- strategies -----------------------------------------------------------------------------
#: Strings that must never reach a subject or pass as an id/slug/type.
INJECTIONS = st.sampled_from(
    [
        "",
        ".",
        "a.b",
        "*",
        ">",
        "it.>",
        "it *",
        " it",
        "it\n",
        "it\r\nPUB x 1",
        "it\x00",
        "IT",
        "it_",
        "$JS",
        "REQ-1234\u202e5678",
        "REQ-12345678/../x",
        "x" * 65,
        "é" * 10,
        "💥" * 9,
    ]
)
UNICODE = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "M", "N", "P", "S", "Z", "Cc", "Cf")), max_size=60
)
WRONG_TYPES = st.one_of(
    st.integers(), st.booleans(), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.none())
)
#: (field path, size just past the contract's limit)
OVERSIZE = [
    (("title",), 201),
    (("description",), 10_001),
    (("actor", "person"), 201),
    (("requester", "person"), 201),
    (("event_id",), 65),
    (("request_id",), 65),
    (("category",), 100),
    (("comment",), 10_001),
]
ID_FIELDS: list[tuple[str, ...]] = [
    ("event_id",),
    ("request_id",),
    ("actor", "department"),
    ("requester", "department"),
    ("type",),
]
REQUIRED: list[tuple[str, ...]] = [
    ("title",),
    ("category",),
    ("priority",),
    ("requester",),
    ("actor",),
    ("event_id",),
    ("comment",),
]
MISSING = ["title", "event_id", "request_id", "actor", "occurred_at", "comment"]


def _present(doc: dict[str, Any], paths: list[T]) -> st.SearchStrategy[T]:
    """The paths whose top-level field the document has (a path, a (path, size) pair or a plain key)."""

    def key(p: object) -> object:
        while isinstance(p, tuple):
            p = p[0]
        return p

    return st.sampled_from([p for p in paths if key(p) in doc])


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


@st.composite
def poisoned(draw: st.DrawFn, base: Callable[[], dict[str, Any]]) -> bytes:
    """A document that intake must refuse, whatever else it carries."""
    doc = base()
    if draw(st.booleans()):  # harmless dressing: unicode free text
        text = draw(UNICODE)
        if "title" in doc and text.strip():
            doc["title"] = text
        elif "comment" in doc:
            doc["comment"] = text + " ok"
    kind = draw(st.sampled_from(["malformed", "wrong_type", "oversize", "injection", "unknown", "stamped", "missing"]))
    if kind == "malformed":
        raw = draw(
            st.one_of(
                st.binary(max_size=200),
                st.sampled_from([b"", b"{", b"[]", b"null", b"1", b'"x"', b"{'a': 1}", b"\xff\xfe{}", b"{}" * 3]),
            )
        )
        try:
            if isinstance(orjson.loads(raw), dict):
                raw = b"[" + raw  # a JSON object might be a valid event by chance: break it
        except orjson.JSONDecodeError:
            pass
        return raw
    if kind == "wrong_type":
        _set(doc, draw(_present(doc, REQUIRED)), draw(WRONG_TYPES))
    elif kind == "oversize":
        path, size = draw(_present(doc, OVERSIZE))
        _set(doc, path, "a" * size)
    elif kind == "injection":
        _set(doc, draw(_present(doc, ID_FIELDS)), draw(INJECTIONS))
    elif kind == "unknown":
        doc[draw(st.sampled_from(["__proto__", "extra", "Title", "tïtle"]))] = draw(UNICODE)
    elif kind == "stamped":
        doc[draw(st.sampled_from(["sequence", "recorded_at", "trace_id"]))] = 1
    else:
        del doc[draw(_present(doc, MISSING))]
    return json.dumps(doc, ensure_ascii=False).encode()  # stdlib: also takes integers past 64 bits


def fresh_created() -> dict[str, Any]:
    return created(new_rid())


# --- harness --------------------------------------------------------------------------------
def run_examples(loop: asyncio.AbstractEventLoop, test: Callable[[], None]) -> Coroutine[Any, Any, None]:
    """Hypothesis drives a sync test; it runs in a worker thread and hands coroutines to the event loop."""
    return asyncio.to_thread(test)


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    future: Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
    return future.result(timeout=60)


@pytest.fixture
def token_path(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "tokens.yaml"
    return path, issue_token(path, "marketing")[1]


@pytest.fixture
async def intake(
    provisioned_nats: str, make_database_url: Callable[[str], str], token_path: tuple[Path, str]
) -> AsyncIterator[Any]:
    settings_ = IntakeSettings(
        nats_url=provisioned_nats,
        database_url=make_database_url("intake"),
        fetch_timeout=0.05,
        retry_delay=0.2,
        tokens_path=token_path[0],
    )
    app = create_app(settings_)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def nc(provisioned_nats: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(provisioned_nats)
    yield conn
    await conn.close()


async def state(app: Any, nc: NATS) -> tuple[int, int, int]:
    database: db.Database = app.state.database
    async with database.transaction() as session:
        requests = (await session.execute(select(func.count()).select_from(db.RequestRow))).scalar_one()
        events = (await session.execute(select(func.count()).select_from(db.EventRow))).scalar_one()
    stream = (await nc.jsm().stream_info(STREAM_EVENTS)).state.messages
    return int(requests), int(events), int(stream)


async def seeded(app: Any, nc: NATS, token: str) -> str:
    """One real request (so that the events endpoint has something to refuse against)."""
    rid = new_rid()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://intake") as client:
        response = await client.post(
            "/v1/requests", content=orjson.dumps(created(rid)), headers={"Authorization": f"Bearer {token}"}
        )
    assert response.status_code == 201, response.text
    return rid


def assert_explained(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    problem = response.json()
    assert isinstance(problem.get("code"), str)
    assert problem["code"]
    assert isinstance(problem.get("detail"), str)
    assert problem["detail"]
    assert isinstance(problem.get("errors"), list)
    if response.status_code == 422:
        assert problem["errors"], problem
        for error in problem["errors"]:
            assert {"loc", "code", "message"} <= set(error), error


# --- HTTP -----------------------------------------------------------------------------------
async def test_http_entry_points_refuse_hostile_input_without_a_state_change(
    intake: Any, nc: NATS, token_path: tuple[Path, str]
) -> None:
    token = token_path[1]
    rid = await seeded(intake, nc, token)
    before = await state(intake, nc)
    loop = asyncio.get_running_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=intake), base_url="http://intake")
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    statuses: dict[int, int] = {}

    def comment() -> dict[str, Any]:
        return env("commented", rid, "marketing", 5) | {"comment": "any news?"}

    @FUZZ
    @given(body=poisoned(fresh_created))
    def create(body: bytes) -> None:
        response = on_loop(loop, client.post("/v1/requests", content=body, headers=auth))
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert_explained(response)

    @FUZZ
    @given(body=poisoned(comment), bad_path=st.one_of(st.none(), INJECTIONS))
    def add_event(body: bytes, bad_path: str | None) -> None:
        url = f"/v1/requests/{rid if bad_path is None else quote(bad_path, safe='')}/events"
        response = on_loop(loop, client.post(url, content=body, headers=auth))
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert_explained(response)

    try:
        await run_examples(loop, create)
        await run_examples(loop, add_event)
    finally:
        await client.aclose()
    print(f"HTTP refusals by status: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 2 * EXAMPLES
    assert await state(intake, nc) == before


# --- NATS -----------------------------------------------------------------------------------
#: NATS carries no whitespace in a subject (the client's connection breaks, nothing is stored), but it does
#: store a publish to a literal "*" or ">" token: intake must refuse those like any bad token.
SUBJECT_TOKENS = st.sampled_from(
    ["marketing", "MARKETING", "mark_eting", "x", "a" * 40, "ünï", "it-", "1it", "baton", "*", "$JS"]
)
TYPE_TOKENS = st.sampled_from(["created", "Created", "create", "sequence", "commented", "a" * 40, "ünï", "*", ">"])


async def test_nats_entry_point_refuses_hostile_input_explains_and_dead_letters_each(intake: Any, nc: NATS) -> None:
    before = await state(intake, nc)
    loop = asyncio.get_running_loop()
    published: list[str] = []

    @FUZZ
    @given(
        body=poisoned(fresh_created),
        dept=SUBJECT_TOKENS,
        event_type=TYPE_TOKENS,
        extra=st.sampled_from(["", ".x", ".a.b", ".>"]),
    )
    def inbound(body: bytes, dept: str, event_type: str, extra: str) -> None:
        subject = f"baton.in.{dept}.{event_type}{extra}"
        on_loop(loop, publish(nc, subject, body))
        published.append(subject)

    await run_examples(loop, inbound)
    await intake_settled(nc, within=60)

    assert await state(intake, nc) == before
    dead = await _all(nc, STREAM_DLQ, "baton.dlq.intake.*")
    print(f"NATS: {len(published)} published, {len(dead)} dead letters")
    assert len(dead) == len(published)
    assert all(d["code"] and d["message"] and d["original_subject"] in published for d in dead)
    # Every refusal on a subject naming a real department is explained to that department.
    tellable = [s for s in published if s.startswith("baton.in.marketing.")]
    notices = await _all(nc, STREAM_NOTIFY, "baton.notify.marketing.rejected")
    assert len(notices) == len(tellable)
    for notice in notices:
        assert notice["code"]
        assert notice["message"]
        if notice["code"] == "validation_failed":
            assert notice["errors"], notice


async def _all(nc: NATS, stream: str, subject: str) -> list[dict[str, Any]]:
    jsm = nc.jsm()
    out: list[dict[str, Any]] = []
    seq = 1
    while True:
        try:
            msg = await jsm.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return out
        out.append(orjson.loads(msg.data or b"{}"))
        assert msg.seq is not None
        seq = msg.seq + 1
