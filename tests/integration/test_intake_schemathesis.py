"""Schemathesis against the OpenAPI document intake serves: no input, valid or not, makes it answer 5xx.

Intake runs for real (uvicorn on a free port, a real nats-server, a real database); schemathesis
generates requests from ``/openapi.json`` for every operation, in positive and negative mode, with a
valid department token, and checks each response with ``not_a_server_error``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from baton.cmd_tokens import issue_token
from baton.natsserver import free_port
from services.intake.app import create_app
from services.intake.settings import IntakeSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: Examples per operation and generation mode (positive + negative = 50 per operation).
EXAMPLES = 25
DEPARTMENT = "marketing"


@pytest.fixture
async def intake_url(
    provisioned_nats: str, make_database_url: Callable[[str], str], tmp_path: Path
) -> AsyncIterator[tuple[str, str]]:
    tokens = tmp_path / "tokens.yaml"
    _entry, token = issue_token(tokens, DEPARTMENT)
    settings_ = IntakeSettings(
        nats_url=provisioned_nats, database_url=make_database_url("intake"), fetch_timeout=0.05, tokens_path=tokens
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings_), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        assert not serving.done(), "intake did not start"
        assert time.monotonic() < deadline, "intake did not start in time"
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", token
    finally:
        server.should_exit = True
        await serving


def _as_token_department(case: Any) -> Any:
    """Positive bodies speak for the token's department about the path's request, so the fuzzing reaches
    the state machine instead of stopping at the identity checks."""
    if isinstance(case.body, dict):
        for key in ("actor", "requester"):
            if isinstance(case.body.get(key), dict):
                case.body[key]["department"] = DEPARTMENT
        if case.path_parameters and "request_id" in case.path_parameters:
            case.body["request_id"] = case.path_parameters["request_id"]
    return case


def fuzz(base_url: str, token: str) -> dict[str, Counter[int]]:
    """Run every operation of the served document; returns the status codes seen per operation."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    seen: dict[str, Counter[int]] = {}
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        statuses = seen.setdefault(operation.label, Counter())
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, base_url, headers, statuses)
            except Unsatisfiable:
                # nothing to break in an operation without inputs (GET /healthz in negative mode)
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
                inputs = [*operation.path_parameters, *operation.query, *operation.body]
                assert not inputs, operation.label
    return seen


def fuzz_operation(
    operation: Any,
    mode: schemathesis.GenerationMode,
    base_url: str,
    headers: dict[str, str],
    statuses: Counter[int],
) -> None:
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is schemathesis.GenerationMode.POSITIVE:
        strategy = strategy.map(_as_token_department)

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=10)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=[not_a_server_error])

    run()


async def test_no_input_makes_intake_answer_5xx(intake_url: tuple[str, str]) -> None:
    base_url, token = intake_url
    seen = await asyncio.to_thread(fuzz, base_url, token)
    assert "POST /v1/requests" in seen
    assert "POST /v1/requests/{request_id}/events" in seen
    assert "GET /v1/requests/{request_id}" in seen
    assert not [(op, code) for op, statuses in seen.items() for code in statuses if code >= 500]
    # the fuzzing got past authentication and validation into the state machine
    assert seen["POST /v1/requests"][201] > 0, seen
