"""The OpenAPI document intake serves must equal the committed one: an HTTP API change is a visible diff."""

import json

import httpx
import pytest

from services.intake.app import create_app
from services.intake.openapi import COMMITTED, render
from services.intake.settings import IntakeSettings

pytestmark = pytest.mark.unit


async def test_served_openapi_matches_the_committed_document() -> None:
    app = create_app(IntakeSettings(database_url="sqlite+aiosqlite:///:memory:"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://intake") as client:
        served = (await client.get("/openapi.json")).json()
    assert COMMITTED.exists(), f"missing {COMMITTED}: run `make openapi`"
    assert render(served) == COMMITTED.read_text(encoding="utf-8"), (
        f"{COMMITTED} is out of date: intake's HTTP API changed. Run `make openapi` and commit the diff."
    )


def test_request_bodies_and_problems_are_the_contract_models() -> None:
    doc = json.loads(COMMITTED.read_text(encoding="utf-8"))
    create = doc["paths"]["/v1/requests"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Created"}
    add = doc["paths"]["/v1/requests/{request_id}/events"]["post"]
    inbound = doc["components"]["schemas"]["InboundEvent"]
    assert sorted(inbound["discriminator"]["mapping"]) == sorted(
        ["accepted", "delayed", "resolved", "declined", "reassigned", "reopened", "feedback", "commented"]
    )
    assert add["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/InboundEvent"}
    for status in ("400", "401", "403", "404", "409", "413", "422"):
        assert add["responses"][status]["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
    assert doc["components"]["securitySchemes"]["departmentToken"]["scheme"] == "bearer"
