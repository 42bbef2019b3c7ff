"""The committed JSON Schemas must match the models: a contract change is always a visible diff."""

import json

import pytest

from libs.contracts.snapshots import SCHEMA_DIR, all_schemas, render

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("filename", sorted(all_schemas()))
def test_snapshot_matches_model(filename: str) -> None:
    path = SCHEMA_DIR / filename
    assert path.exists(), f"missing snapshot {path}: run `python -m libs.contracts.snapshots`"
    expected = render(all_schemas()[filename])
    assert path.read_text(encoding="utf-8") == expected, (
        f"{filename} is out of date: the model changed. If the change is additive, run "
        "`python -m libs.contracts.snapshots` and commit; a breaking change needs a new version and subject."
    )


def test_no_stale_snapshot_files() -> None:
    on_disk = {p.name for p in SCHEMA_DIR.glob("*.json")}
    assert on_disk == set(all_schemas()), "snapshot files without a model (or the reverse)"


def test_published_fields_never_disappear() -> None:
    """Within v1 only additive changes: every property of the first published snapshot still exists."""
    v1_required = {
        "event.created.v1.json": {
            "event_id",
            "type",
            "request_id",
            "occurred_at",
            "actor",
            "schema_version",
            "title",
            "description",
            "category",
            "priority",
            "requester",
            "provider_department",
            "due_by",
            "watchers",
            "attributes",
        },
        "event.accepted.v1.json": {"assignee", "eta"},
        "event.delayed.v1.json": {"reason", "new_eta", "reason_code", "blocking_department"},
        "event.resolved.v1.json": {"resolution", "outcome"},
        "event.routed.v1.json": {"provider_department", "rule", "accept_by", "resolve_by"},
        "notification.v1.json": {"notification_id", "department", "role", "request_id", "event", "text", "trace_id"},
        "rejection.v1.json": {"event_id", "code", "message", "errors"},
    }
    for filename, fields in v1_required.items():
        props = set(json.loads((SCHEMA_DIR / filename).read_text())["properties"])
        assert fields <= props, f"{filename} lost published fields: {sorted(fields - props)}"
