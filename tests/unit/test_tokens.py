"""TokenRegistry: hashed at rest, revocable, expiring, and re-read when the file changes (no restart)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from baton.cmd_tokens import issue_token, revoke_token
from libs.contracts.tokens import TokenRegistry, hash_token, load_token_file

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


class FrozenClock(datetime):
    current = NOW

    @classmethod
    def now(cls, tz: object = None) -> FrozenClock:  # type: ignore[override]
        return cls.current  # type: ignore[return-value]


def test_a_valid_token_names_its_department_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    entry, token = issue_token(path, "it", token_id="it-1")
    registry = TokenRegistry(path)
    principal = registry.verify(token)
    assert principal is not None
    assert (principal.token_id, principal.department, principal.operator) == ("it-1", "it", False)
    text = path.read_text()
    assert token not in text
    assert hash_token(token) in text
    assert entry.sha256 == hash_token(token)
    assert path.stat().st_mode & 0o777 == 0o600


def test_operator_tokens_have_no_department(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    _entry, token = issue_token(path, None)
    principal = TokenRegistry(path).verify(token)
    assert principal is not None
    assert (principal.department, principal.operator) == (None, True)


@pytest.mark.parametrize(
    "candidate",
    [None, "", "bt_it_guessed", "not-a-baton-token", "bt_" + "x" * 300],
)
def test_unknown_or_malformed_tokens_are_refused(tmp_path: Path, candidate: str | None) -> None:
    path = tmp_path / "tokens.yaml"
    issue_token(path, "it")
    assert TokenRegistry(path).verify(candidate) is None


def test_no_token_file_refuses_everything(tmp_path: Path) -> None:
    assert TokenRegistry(None).verify("bt_it_whatever") is None
    assert TokenRegistry(tmp_path / "missing.yaml").verify("bt_it_whatever") is None


def test_revoked_tokens_are_refused_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    entry, token = issue_token(path, "it")
    registry = TokenRegistry(path)
    assert registry.verify(token) is not None
    revoke_token(path, entry.id)
    assert registry.verify(token) is None
    with pytest.raises(KeyError):
        revoke_token(path, "no-such-id")


def test_expired_tokens_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    _entry, token = issue_token(path, "finance", expires_at=NOW + timedelta(days=90), now=NOW)
    FrozenClock.current = NOW + timedelta(days=89)
    registry = TokenRegistry(path, clock=FrozenClock)
    assert registry.verify(token) is not None
    FrozenClock.current = NOW + timedelta(days=90)
    assert registry.verify(token) is None


def test_rotation_by_editing_the_file_without_a_restart(tmp_path: Path) -> None:
    """Add the new token, move the clients, revoke the old one: the running registry follows each step."""
    path = tmp_path / "tokens.yaml"
    old_entry, old = issue_token(path, "marketing", token_id="marketing-old")
    registry = TokenRegistry(path)
    _new_entry, new = issue_token(path, "marketing", token_id="marketing-new")
    assert registry.verify(new) is not None
    assert registry.verify(old) is not None
    revoke_token(path, old_entry.id)
    assert registry.verify(old) is None
    principal = registry.verify(new)
    assert principal is not None
    assert principal.token_id == "marketing-new"
    assert len(registry) == 2


def test_a_hand_edit_is_picked_up_too(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    _entry, token = issue_token(path, "legal", token_id="legal-1")
    registry = TokenRegistry(path)
    path.write_text(path.read_text().replace("revoked: false", "revoked: true"))
    assert registry.verify(token) is None


def test_an_invalid_edit_keeps_the_last_good_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    _entry, token = issue_token(path, "hr")
    registry = TokenRegistry(path)
    good = path.read_text()
    for broken in ("tokens: [ {unclosed", "tokens:\n  - id: x\n    sha256: nothex\n", "version: 1\ntokens: 7\n"):
        path.write_text(broken)
        assert registry.verify(token) is not None, broken
        assert registry.last_error
    path.write_text(good)
    assert registry.verify(token) is not None
    assert registry.last_error is None


def test_ids_are_unique(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    issue_token(path, "it", token_id="same")
    with pytest.raises(ValueError, match="already exists"):
        issue_token(path, "it", token_id="same")
    assert len(load_token_file(path).tokens) == 1
