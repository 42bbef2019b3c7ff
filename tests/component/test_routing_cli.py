"""``baton route``: the decision for a sample request, read from the catalog file (no services)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from baton.cli import app

pytestmark = pytest.mark.component

runner = CliRunner()


def test_explain_shows_every_step_and_the_business_deadlines(catalog_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "route",
            "--catalog",
            str(catalog_path),
            "--category",
            "laptop",
            "--title",
            "Laptop screen cracked",
            "--priority",
            "high",
            "--requester",
            "marketing",
            "--at",
            "2026-11-27T17:00:00+01:00",
            "--explain",
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "1. explicit-provider" in out
    assert "no provider_department was requested" in out
    assert "rule:repairs-to-vendor   CHOSEN" in out
    assert "title has 'cracked'" in out
    assert "rule:building-access     not reached" in out
    assert "=> acme-it (ACME IT Services (hardware vendor), vendor) by rule:repairs-to-vendor" in out
    # acme-it (Asia/Kolkata, Mon-Sat 09:00-18:00) gets it Friday 21:30 its time: 4 h of its business time -> Sat 13:00.
    assert "accept_by  Sat 28 Nov 2026 13:00 IST (2026-11-28T07:30:00+00:00)" in out


def test_without_explain_only_the_decision(catalog_path: Path) -> None:
    result = runner.invoke(app, ["route", "--catalog", str(catalog_path), "--category", "catering"])
    assert result.exit_code == 0, result.output
    assert "=> service-desk" in result.output
    assert "by fallback" in result.output
    assert "1. explicit-provider" not in result.output


def test_json_output(catalog_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "route",
            "--catalog",
            str(catalog_path),
            "--category",
            "question",
            "--title",
            "Coffee machine?",
            "--attr",
            "confidential=yes",
            "--at",
            "2026-11-24T10:00:00+01:00",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.output)
    assert (doc["provider_department"], doc["rule"]) == ("hr", "rule:confidential-to-hr")
    assert doc["request"]["attributes"] == {"confidential": "yes"}
    assert [s["outcome"] for s in doc["steps"]].count("chosen") == 1
    assert doc["accept_by"] == "2026-11-25T09:00:00+00:00"  # HR normal 1d: one working day later, 10:00 Paris


def test_an_invalid_catalog_names_file_line_and_field(tmp_path: Path, catalog_path: Path) -> None:
    broken = tmp_path / "catalog.yaml"
    broken.write_text(catalog_path.read_text().replace("route_to: legal", "route_to: lawyers"))
    result = runner.invoke(app, ["route", "--catalog", str(broken), "--category", "laptop"])
    assert result.exit_code == 2
    assert f"{broken}:" in result.output
    assert "route_to 'lawyers' is not a department in the catalog" in result.output


def test_bad_options(catalog_path: Path) -> None:
    result = runner.invoke(app, ["route", "--catalog", str(catalog_path), "--category", "x", "--attr", "nokey"])
    assert result.exit_code != 0
    assert "key=value" in result.output
    result = runner.invoke(
        app, ["route", "--catalog", str(catalog_path), "--category", "x", "--at", "2026-11-24T10:00"]
    )
    assert result.exit_code != 0
    assert "no UTC offset" in result.output
