"""`baton token new|list|revoke`, the tokens `baton up` makes on a data dir's first start, and
the party rule intake applies to reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from baton.cli import app
from baton.cmd_tokens import ensure_stack_tokens, token_from_file
from libs.contracts.tokens import TokenRegistry, load_token_file
from services.intake.api import watchers_and_holders

pytestmark = pytest.mark.unit

runner = CliRunner()


def test_new_prints_the_token_once_and_stores_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    result = runner.invoke(app, ["token", "new", "it", "--tokens", str(path), "--id", "it-rotated", "--expires", "90d"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token.startswith("bt_it_")
    principal = TokenRegistry(path).verify(token)
    assert principal is not None
    assert principal.department == "it"
    [entry] = load_token_file(path).tokens
    assert (entry.id, entry.expires_at is not None) == ("it-rotated", True)
    assert token not in path.read_text()


def test_operator_list_and_revoke(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    operator = runner.invoke(app, ["token", "new", "--operator", "--tokens", str(path), "--id", "ops"])
    assert operator.exit_code == 0, operator.output
    assert runner.invoke(app, ["token", "new", "finance", "--tokens", str(path), "--id", "fin"]).exit_code == 0
    listing = runner.invoke(app, ["token", "list", "--tokens", str(path)])
    assert listing.exit_code == 0
    assert "ops" in listing.stdout
    assert "operator" in listing.stdout
    assert "fin" in listing.stdout
    assert "bt_" not in listing.stdout
    assert runner.invoke(app, ["token", "revoke", "fin", "--tokens", str(path)]).exit_code == 0
    assert "revoked" in runner.invoke(app, ["token", "list", "--tokens", str(path)]).stdout
    assert runner.invoke(app, ["token", "revoke", "nope", "--tokens", str(path)]).exit_code != 0


@pytest.mark.parametrize("args", [["IT"], ["baton"], ["it", "--operator"], [], ["it", "--expires", "soon"]])
def test_new_refuses_bad_input(tmp_path: Path, args: list[str]) -> None:
    result = runner.invoke(app, ["token", "new", *args, "--tokens", str(tmp_path / "t.yaml")])
    assert result.exit_code != 0
    assert not (tmp_path / "t.yaml").exists()


def test_first_start_makes_one_token_per_department_and_an_operator_token(tmp_path: Path) -> None:
    plain = ensure_stack_tokens(tmp_path, ["it", "marketing"])
    assert plain == tmp_path / "tokens.txt"
    assert plain.stat().st_mode & 0o777 == 0o600
    registry = TokenRegistry(tmp_path / "tokens.yaml")
    for owner in ("it", "marketing"):
        principal = registry.verify(token_from_file(plain, owner))
        assert principal is not None
        assert principal.department == owner
    operator = registry.verify(token_from_file(plain, None))
    assert operator is not None
    assert operator.operator
    # a second start changes nothing and writes no plaintext again
    plain.unlink()
    assert ensure_stack_tokens(tmp_path, ["it", "marketing", "legal"]) is None
    assert not plain.exists()
    assert len(load_token_file(tmp_path / "tokens.yaml").tokens) == 3


def test_parties_include_watchers_and_past_holders() -> None:
    events: list[dict[str, Any]] = [
        {"type": "created", "watchers": ["finance"]},
        {"type": "routed", "provider_department": "service-desk"},
        {"type": "reassigned", "to_department": "it"},
        {"type": "reassigned", "to_department": "facilities"},
        {"type": "commented"},
    ]
    assert watchers_and_holders(events, "facilities") == (["finance"], ["service-desk", "it"])
