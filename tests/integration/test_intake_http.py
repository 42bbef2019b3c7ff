"""Intake's HTTP API against the running service: a real nats-server, a real database, department tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from baton.cmd_tokens import issue_token, revoke_token
from libs.contracts.subjects import STREAM_EVENTS, STREAM_NOTIFY, inbound_subject, service_subject
from services.intake.app import create_app
from services.intake.domain import MAX_PAYLOAD_BYTES
from services.intake.settings import IntakeSettings
from tests.intake_events import T0, created, env, intake_settled, new_rid, publish, read_stream, routed

pytestmark = pytest.mark.integration

DEPARTMENTS = ("marketing", "it", "legal", "finance", "facilities")
PROBLEM_FIELDS = {"type", "title", "status", "detail", "instance", "code", "errors"}


def accepted(rid: str, dept: str = "it", days: int = 1) -> dict[str, Any]:
    return env("accepted", rid, dept, 2) | {"assignee": "Sam", "eta": (T0 + timedelta(days=days)).isoformat()}


class Tokens:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.plain: dict[str, str] = {}
        self.ids: dict[str, str] = {}
        for dept in (*DEPARTMENTS, None):
            entry, token = issue_token(path, dept)
            self.plain[dept or "operator"] = token
            self.ids[dept or "operator"] = entry.id

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.plain[who]}"}


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return Tokens(tmp_path / "tokens.yaml")


@pytest.fixture
async def intake(provisioned_nats: str, make_database_url: Callable[[str], str], tokens: Tokens) -> AsyncIterator[Any]:
    settings = IntakeSettings(
        nats_url=provisioned_nats,
        database_url=make_database_url("intake"),
        fetch_timeout=0.05,
        retry_delay=0.2,
        tokens_path=tokens.path,
        outbox_interval=0.2,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def http(intake: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=intake), base_url="http://intake") as client:
        yield client


@pytest.fixture
async def nc(provisioned_nats: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(provisioned_nats)
    yield conn
    await conn.close()


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert set(problem) == PROBLEM_FIELDS
    assert (problem["status"], problem["code"], problem["type"]) == (status, code, f"urn:baton:problem:{code}")
    assert problem["title"]
    assert problem["detail"]
    assert problem["instance"].startswith("urn:uuid:")
    return problem


async def create_and_route(http: httpx.AsyncClient, nc: NATS, tokens: Tokens, rid: str, **over: Any) -> None:
    assert (
        await http.post("/v1/requests", json=created(rid, **over), headers=tokens.auth("marketing"))
    ).status_code == 201
    await publish(nc, service_subject("routing", "routed"), routed(rid))
    await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.routed", 1)


# --- the happy path ------------------------------------------------------------------------------
async def test_create_accept_delay_resolve_over_http_lands_in_the_canonical_log(
    http: httpx.AsyncClient, nc: NATS, tokens: Tokens
) -> None:
    rid = new_rid()
    response = await http.post("/v1/requests", json=created(rid), headers=tokens.auth("marketing"))
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/v1/requests/{rid}"
    first = response.json()
    assert first["sequence"] == 1
    assert first["recorded_at"]
    assert len(first["trace_id"]) == 32
    await publish(nc, service_subject("routing", "routed"), routed(rid))
    await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.routed", 1)

    delayed = env("delayed", rid, "it", 3) | {"reason": "backorder", "new_eta": (T0 + timedelta(days=2)).isoformat()}
    resolved = env("resolved", rid, "it", 4) | {"resolution": "delivered", "outcome": "done"}
    sequences = []
    for body in (accepted(rid), delayed, resolved):
        answer = await http.post(f"/v1/requests/{rid}/events", json=body, headers=tokens.auth("it"))
        assert answer.status_code == 201, answer.text
        sequences.append(answer.json()["sequence"])
        assert answer.json()["event_id"] == body["event_id"]
    assert sequences == [3, 4, 5]

    log = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 5)
    assert [(e["type"], e["sequence"]) for e in log] == [
        ("created", 1),
        ("routed", 2),
        ("accepted", 3),
        ("delayed", 4),
        ("resolved", 5),
    ]
    assert {e["trace_id"] for e in log} == {first["trace_id"]}
    assert log[0] == first  # the response is the canonical event, byte for byte the same document

    state = (await http.get(f"/v1/requests/{rid}", headers=tokens.auth("marketing"))).json()
    assert (state["state"], state["holder_department"], state["sequence"], state["delay_count"]) == (
        "resolved",
        "it",
        5,
        1,
    )
    assert [e["sequence"] for e in state["events"]] == [1, 2, 3, 4, 5]


# --- idempotency ---------------------------------------------------------------------------------
async def test_the_same_event_twice_is_one_canonical_event_and_the_retry_answers_200(
    http: httpx.AsyncClient, nc: NATS, tokens: Tokens
) -> None:
    rid = new_rid()
    body = created(rid)
    first = await http.post("/v1/requests", json=body, headers=tokens.auth("marketing"))
    retry = await http.post("/v1/requests", json=body, headers=tokens.auth("marketing"))
    assert (first.status_code, retry.status_code) == (201, 200)
    assert retry.content == first.content
    assert await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 2, within=1.0) == [first.json()]


async def test_nats_and_http_submissions_of_one_event_id_are_idempotent_with_each_other(
    http: httpx.AsyncClient, nc: NATS, tokens: Tokens
) -> None:
    rid = new_rid()
    body = created(rid)
    await publish(nc, inbound_subject("marketing", "created"), body)  # NATS first ...
    [canonical] = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 1)
    again = await http.post("/v1/requests", json=body, headers=tokens.auth("marketing"))  # ... then HTTP
    assert again.status_code == 200
    assert again.json() == canonical

    await publish(nc, service_subject("routing", "routed"), routed(rid))
    await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.routed", 1)
    accept = accepted(rid)
    over_http = await http.post(f"/v1/requests/{rid}/events", json=accept, headers=tokens.auth("it"))  # HTTP first ...
    assert over_http.status_code == 201
    # ... then the same event over NATS, with another Nats-Msg-Id so JetStream's window can't hide it: intake must.
    await nc.jetstream().publish(
        inbound_subject("it", "accepted"), orjson.dumps(accept), headers={"Nats-Msg-Id": "again-" + accept["event_id"]}
    )
    conflicting = accept | {"assignee": "Someone else"}
    conflict = await http.post(f"/v1/requests/{rid}/events", json=conflicting, headers=tokens.auth("it"))
    assert assert_problem(conflict, 409, "id_conflict")["errors"][0]["loc"] == ["event_id"]

    await intake_settled(nc)  # the NATS copy has been processed (it would have landed as sequence 4)
    log = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 3)
    assert [(e["type"], e["sequence"]) for e in log] == [("created", 1), ("routed", 2), ("accepted", 3)]
    notices = await read_stream(nc, STREAM_NOTIFY, "baton.notify.it.rejected", 0, within=0.3)
    assert [n for n in notices if n.get("request_id") == rid] == []


# --- every error class -----------------------------------------------------------------------------
async def test_400_malformed_json_and_not_an_object(http: httpx.AsyncClient, tokens: Tokens) -> None:
    bad = await http.post("/v1/requests", content=b"{this is not json", headers=tokens.auth("marketing"))
    assert "not valid JSON" in assert_problem(bad, 400, "malformed_json")["detail"]
    array = await http.post("/v1/requests", content=b"[1, 2]", headers=tokens.auth("marketing"))
    assert assert_problem(array, 400, "malformed_json")["detail"] == "payload must be a JSON object"


async def test_401_missing_unknown_and_revoked_tokens(http: httpx.AsyncClient, tokens: Tokens) -> None:
    rid = new_rid()
    for headers in ({}, {"Authorization": "Bearer bt_it_not-a-real-token"}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        for response in (
            await http.post("/v1/requests", json=created(rid), headers=headers),
            await http.get(f"/v1/requests/{rid}", headers=headers),
            await http.get("/v1/rejections", headers=headers),
        ):
            assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")
    revoke_token(tokens.path, tokens.ids["marketing"])
    revoked = await http.post("/v1/requests", json=created(rid), headers=tokens.auth("marketing"))
    assert_problem(revoked, 401, "unauthorized")


async def test_403_a_token_for_it_cannot_create_as_marketing(http: httpx.AsyncClient, tokens: Tokens) -> None:
    rid = new_rid()
    as_marketing = await http.post("/v1/requests", json=created(rid, "marketing"), headers=tokens.auth("it"))
    problem = assert_problem(as_marketing, 403, "not_allowed")
    assert {"loc": ["actor", "department"], "code": "not_allowed", "message": "must be 'it'"} in problem["errors"]
    # the actor is the token's department, but the requester is someone else's
    on_behalf = created(rid, "it") | {"requester": {"department": "marketing", "person": "Ana"}}
    problem = assert_problem(
        await http.post("/v1/requests", json=on_behalf, headers=tokens.auth("it")), 403, "not_allowed"
    )
    assert problem["errors"][0]["loc"] == ["requester", "department"]
    # an operator reads everything but does not act as a department
    operator = await http.post("/v1/requests", json=created(rid), headers=tokens.auth("operator"))
    assert_problem(operator, 403, "not_allowed")
    # nothing was created
    assert_problem(await http.get(f"/v1/requests/{rid}", headers=tokens.auth("operator")), 404, "unknown_request")


async def test_403_holder_only_events_and_reading_as_a_stranger(
    http: httpx.AsyncClient, nc: NATS, tokens: Tokens
) -> None:
    rid = new_rid()
    await create_and_route(http, nc, tokens, rid, watchers=["finance"])
    wrong = await http.post(f"/v1/requests/{rid}/events", json=accepted(rid, "legal"), headers=tokens.auth("legal"))
    assert "only the department holding the request (it)" in assert_problem(wrong, 403, "not_allowed")["detail"]
    routed_by_a_department = routed(rid) | {"actor": {"department": "it", "person": "x"}}
    sneaky = await http.post(f"/v1/requests/{rid}/events", json=routed_by_a_department, headers=tokens.auth("it"))
    assert_problem(sneaky, 403, "not_allowed")

    # parties read: requester, holder, watcher, operator; a past holder after a reassignment; nobody else
    reassign = env("reassigned", rid, "it", 3) | {"reason": "facilities owns desks", "to_department": "facilities"}
    assert (await http.post(f"/v1/requests/{rid}/events", json=reassign, headers=tokens.auth("it"))).status_code == 201
    for who in ("marketing", "facilities", "finance", "it", "operator"):
        view = await http.get(f"/v1/requests/{rid}", headers=tokens.auth(who))
        assert view.status_code == 200, (who, view.text)
    assert view.json()["past_holders"] == ["it"]
    assert view.json()["watchers"] == ["finance"]
    assert_problem(await http.get(f"/v1/requests/{rid}", headers=tokens.auth("legal")), 403, "not_allowed")


async def test_404_unknown_request_and_unknown_route(http: httpx.AsyncClient, tokens: Tokens) -> None:
    rid = new_rid()
    response = await http.post(f"/v1/requests/{rid}/events", json=accepted(rid), headers=tokens.auth("it"))
    assert_problem(response, 404, "unknown_request")
    assert_problem(await http.get(f"/v1/requests/{rid}", headers=tokens.auth("it")), 404, "unknown_request")
    assert_problem(await http.get("/v1/nothing-here", headers=tokens.auth("it")), 404, "not_found")


async def test_409_illegal_transition_duplicate_request_and_id_conflict(
    http: httpx.AsyncClient, nc: NATS, tokens: Tokens
) -> None:
    rid = new_rid()
    await create_and_route(http, nc, tokens, rid)
    resolve_first = env("resolved", rid, "it", 3) | {"resolution": "done", "outcome": "done"}
    response = await http.post(f"/v1/requests/{rid}/events", json=resolve_first, headers=tokens.auth("it"))
    assert "accept it first" in assert_problem(response, 409, "illegal_transition")["detail"]

    again = await http.post("/v1/requests", json=created(rid), headers=tokens.auth("marketing"))
    assert_problem(again, 409, "duplicate_request")

    accept = accepted(rid)
    assert (await http.post(f"/v1/requests/{rid}/events", json=accept, headers=tokens.auth("it"))).status_code == 201
    reused = accept | {"eta": (T0 + timedelta(days=9)).isoformat()}
    response = await http.post(f"/v1/requests/{rid}/events", json=reused, headers=tokens.auth("it"))
    assert_problem(response, 409, "id_conflict")
    earlier_eta = env("delayed", rid, "it", 3) | {"reason": "r", "new_eta": (T0 + timedelta(hours=1)).isoformat()}
    response = await http.post(f"/v1/requests/{rid}/events", json=earlier_eta, headers=tokens.auth("it"))
    assert assert_problem(response, 409, "illegal_transition")["errors"][0]["loc"] == ["new_eta"]
    log = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 3)
    assert [e["type"] for e in log] == ["created", "routed", "accepted"]


async def test_413_too_large_declared_or_streamed(http: httpx.AsyncClient, tokens: Tokens) -> None:
    big = created(new_rid(), description="x" * MAX_PAYLOAD_BYTES)  # the size is refused before anything else
    declared = await http.post("/v1/requests", json=big, headers=tokens.auth("marketing"))
    assert assert_problem(declared, 413, "too_large")["detail"].endswith(f"the limit is {MAX_PAYLOAD_BYTES}")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(100):
            yield b" " * 1024

    streamed = await http.post("/v1/requests", content=chunks(), headers=tokens.auth("marketing"))
    assert "content-length" not in streamed.request.headers
    assert_problem(streamed, 413, "too_large")


async def test_422_validation_with_field_errors(http: httpx.AsyncClient, tokens: Tokens) -> None:
    rid = new_rid()
    missing = created(rid)
    del missing["title"]
    problem = assert_problem(
        await http.post("/v1/requests", json=missing, headers=tokens.auth("marketing")), 422, "validation_failed"
    )
    assert {"loc": ["title"], "code": "missing", "message": "Field required"} in problem["errors"]

    stamped = created(rid) | {"sequence": 7}
    problem = assert_problem(
        await http.post("/v1/requests", json=stamped, headers=tokens.auth("marketing")), 422, "stamped_field"
    )
    assert problem["errors"] == [{"loc": ["sequence"], "code": "stamped_field", "message": "set by intake; omit it"}]

    other_path = await http.post(f"/v1/requests/{new_rid()}/events", json=accepted(rid), headers=tokens.auth("it"))
    assert assert_problem(other_path, 422, "validation_failed")["errors"][0]["code"] == "path_mismatch"

    wrong_endpoint = await http.post("/v1/requests", json=accepted(rid), headers=tokens.auth("it"))
    assert assert_problem(wrong_endpoint, 422, "validation_failed")["errors"][0]["loc"] == ["type"]
    no_type = {k: v for k, v in accepted(rid).items() if k != "type"}
    assert_problem(
        await http.post(f"/v1/requests/{rid}/events", json=no_type, headers=tokens.auth("it")), 422, "validation_failed"
    )

    bad_id = await http.post("/v1/requests/bad%20id!/events", json=accepted(rid), headers=tokens.auth("it"))
    assert assert_problem(bad_id, 422, "validation_failed")["errors"][0]["loc"] == ["path", "request_id"]
    bad_query = await http.get("/v1/rejections", params={"limit": 0}, headers=tokens.auth("operator"))
    assert_problem(bad_query, 422, "validation_failed")


# --- refusals are visible beside the NATS ones, with the same code and message -----------------------
async def test_http_refusals_are_recorded_with_the_same_code_and_message_as_over_nats(
    http: httpx.AsyncClient, nc: NATS, tokens: Tokens
) -> None:
    rid = new_rid()
    body = created(rid, priority="asap")
    del body["title"]
    await publish(nc, inbound_subject("marketing", "created"), body)
    [notice] = [
        n for n in await read_stream(nc, STREAM_NOTIFY, "baton.notify.marketing.rejected", 1) if n["request_id"] == rid
    ]
    over_http = assert_problem(
        await http.post("/v1/requests", json=body | {"event_id": "evt-http-twin-1"}, headers=tokens.auth("marketing")),
        422,
        "validation_failed",
    )
    assert (over_http["code"], over_http["detail"], over_http["errors"]) == (
        notice["code"],
        notice["message"],
        notice["errors"],
    )

    listing = await http.get("/v1/rejections", headers=tokens.auth("marketing"))
    assert listing.status_code == 200
    mine = [r for r in listing.json() if r["request_id"] == rid]
    assert sorted(r["channel"] for r in mine) == ["http", "nats"]
    http_row = next(r for r in mine if r["channel"] == "http")
    assert http_row["source"] == "http:" + over_http["instance"].removeprefix("urn:uuid:")
    assert (http_row["department"], http_row["code"], http_row["message"]) == (
        "marketing",
        notice["code"],
        notice["message"],
    )

    # a department sees its own refusals only; operators see everyone's
    assert [
        r for r in (await http.get("/v1/rejections", headers=tokens.auth("it"))).json() if r["request_id"] == rid
    ] == []
    assert_problem(
        await http.get("/v1/rejections", params={"department": "marketing"}, headers=tokens.auth("it")),
        403,
        "not_allowed",
    )
    everyone = await http.get("/v1/rejections", params={"department": "marketing"}, headers=tokens.auth("operator"))
    assert {r["channel"] for r in everyone.json() if r["request_id"] == rid} == {"http", "nats"}


# --- identity: rotation without a restart ------------------------------------------------------------
async def test_tokens_rotate_without_a_restart(http: httpx.AsyncClient, tokens: Tokens) -> None:
    old = tokens.auth("marketing")
    _entry, new_token = issue_token(tokens.path, "marketing", token_id="marketing-rotated")
    new = {"Authorization": f"Bearer {new_token}"}
    assert (await http.post("/v1/requests", json=created(new_rid()), headers=new)).status_code == 201
    assert (await http.post("/v1/requests", json=created(new_rid()), headers=old)).status_code == 201
    revoke_token(tokens.path, tokens.ids["marketing"])
    assert_problem(await http.post("/v1/requests", json=created(new_rid()), headers=old), 401, "unauthorized")
    assert (await http.post("/v1/requests", json=created(new_rid()), headers=new)).status_code == 201


# --- a lost PubAck after the commit: the outbox publishes it ---------------------------------------
async def test_a_commit_whose_publish_failed_is_published_by_the_outbox(
    intake: Any, http: httpx.AsyncClient, nc: NATS, tokens: Tokens
) -> None:
    processor = intake.state.processor
    real_publish = processor.publish
    failed: list[str] = []

    async def flaky(subject: str, body: bytes, *, msg_id: str, stream: str) -> None:
        if stream == STREAM_EVENTS and not failed:
            failed.append(subject)
            raise TimeoutError("simulated lost PubAck")
        await real_publish(subject, body, msg_id=msg_id, stream=stream)

    processor.publish = flaky
    rid = new_rid()
    body = created(rid)
    response = await http.post("/v1/requests", json=body, headers=tokens.auth("marketing"))
    assert_problem(response, 503, "unavailable")
    assert response.headers["retry-after"]
    assert failed == [f"baton.events.{rid}.created"]
    [published] = await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 1)  # the outbox did it
    retry = await http.post("/v1/requests", json=body, headers=tokens.auth("marketing"))
    assert (retry.status_code, retry.json()) == (200, published)
    assert len(await read_stream(nc, STREAM_EVENTS, f"baton.events.{rid}.*", 2, within=0.5)) == 1
