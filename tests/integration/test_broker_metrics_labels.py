"""FastStream's Prometheus metrics stay bounded however many requests pass (libs/contracts/broker_metrics.py).

Before, every received and published message was labelled with its full subject, which carries the request id:
each request added label sets for good (a memory leak found by the 10-minute ``baton bench``, docs/performance.md).
Intake here receives ``baton.in.<dept>.created`` and publishes ``baton.events.<request_id>.created`` for N
requests; its ``/metrics`` page must name subject families only, the same few for 3 requests as for 12.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import nats
import pytest

from libs.contracts.subjects import inbound_subject
from services.intake.app import create_app
from services.intake.settings import IntakeSettings
from tests.intake_events import created, intake_settled, new_rid, publish

pytestmark = pytest.mark.integration


def destinations(page: str) -> set[str]:
    """The subjects FastStream's metrics name: ``handler`` (received) and ``destination`` (published) labels."""
    return set(re.findall(r'^faststream_\w+\{[^}]*\b(?:handler|destination)="([^"]*)"', page, flags=re.MULTILINE))


async def test_intake_labels_subject_families_not_request_subjects(
    provisioned_nats: str, make_database_url: Callable[[str], str], tmp_path: Path
) -> None:
    settings = IntakeSettings(
        nats_url=provisioned_nats, database_url=make_database_url("intake"), fetch_timeout=0.05, retry_delay=0.2
    )
    app = create_app(settings)
    nc = await nats.connect(provisioned_nats)
    seen: list[set[str]] = []
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://intake") as client:
                for count in (3, 9):
                    for _ in range(count):  # one at a time: each canonical event goes out on its own publish
                        await publish(nc, inbound_subject("marketing", "created"), created(new_rid()))
                        await intake_settled(nc)
                    seen.append(destinations((await client.get("/metrics/")).text))
    finally:
        await nc.close()
    print(f"subjects named in the metrics after 3 and 12 requests: {seen}")
    assert seen[0] == seen[1]  # no new label per request
    assert {"baton.in.>", "baton.events.>"} <= seen[1]
    assert all(not value.count("REQ-") for value in seen[1])
