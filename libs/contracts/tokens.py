"""Department credentials: the token file format, shared by every service that authenticates.

A token is ``bt_<dept>_<secret>``; only its SHA-256 is stored (tokens are 256-bit random, so a
plain hash is the right tool: nothing to brute-force). A department may have several active
tokens, which is how rotation works without a restart: add the new one, move the clients, revoke
the old one. ``TokenRegistry`` re-reads the file when it changes.

The department always comes from the credential, never from a request body.

File (YAML)::

    version: 1
    tokens:
      - id: it-2026-11            # a name for humans and logs, never secret
        department: it            # or `operator: true` for the operator role (sees everything)
        sha256: 9f86d08...        # hex digest of the token
        created_at: 2026-11-22T10:00:00Z
        expires_at: null          # optional
        revoked: false
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, StringConstraints, ValidationError, model_validator

from .envelope import Slug, StrictModel, Timestamp

TOKEN_PREFIX = "bt_"  # noqa: S105 - a public prefix, not a secret
MAX_TOKEN_LENGTH = 200


class TokenEntry(StrictModel):
    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    department: Slug | None = None
    operator: bool = False
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    created_at: Timestamp | None = None
    expires_at: Timestamp | None = None
    revoked: bool = False

    @model_validator(mode="after")
    def _one_role(self) -> TokenEntry:
        if (self.department is None) == (not self.operator):
            raise ValueError("a token belongs to exactly one department, or is an operator token")
        return self


class TokenFile(StrictModel):
    version: int = 1
    tokens: list[TokenEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> TokenFile:
        ids = [t.id for t in self.tokens]
        if len(ids) != len(set(ids)):
            raise ValueError("token ids must be unique")
        return self


class Principal(StrictModel):
    """Who a valid token speaks for."""

    token_id: str
    department: Slug | None
    operator: bool = False


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def generate_token(department: str | None) -> str:
    """A new random token (shown once; store only :func:`hash_token` of it)."""
    owner = department if department is not None else "operator"
    return f"{TOKEN_PREFIX}{owner}_{secrets.token_urlsafe(32)}"


def load_token_file(path: Path) -> TokenFile:
    if not path.exists():
        return TokenFile()
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        return TokenFile.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"invalid token file {path}: {exc}") from exc


def save_token_file(path: Path, tokens: TokenFile) -> None:
    """Write atomically (rename), readable only by the owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(tokens.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(path)


class TokenRegistry:
    """Verifies bearer tokens against a token file, re-reading it whenever it changes on disk.

    An invalid edit keeps the last good registry (and ``last_error`` says why), so a typo never
    locks every department out.
    """

    def __init__(self, path: Path | None, clock: type[datetime] = datetime) -> None:
        self.path = path
        self._clock = clock
        self._by_hash: dict[str, TokenEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.refresh()

    def refresh(self) -> None:
        if self.path is None:
            return
        try:
            stat = self.path.stat()
            # The inode too: save_token_file replaces the file, which may keep its mtime tick and size.
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp == self._stamp:
            return
        with self._lock:
            try:
                tokens = load_token_file(self.path)
            except (ValueError, OSError, yaml.YAMLError) as exc:
                self.last_error = str(exc)
                return
            self._by_hash = {t.sha256: t for t in tokens.tokens}
            self._stamp = stamp
            self.last_error = None

    def verify(self, token: str | None) -> Principal | None:
        """The principal of a valid, unrevoked, unexpired token; None otherwise."""
        if not token or len(token) > MAX_TOKEN_LENGTH or not token.startswith(TOKEN_PREFIX):
            return None
        self.refresh()
        digest = hash_token(token)
        entry = self._by_hash.get(digest)
        if entry is None or not hmac.compare_digest(entry.sha256, digest) or entry.revoked:
            return None
        if entry.expires_at is not None and entry.expires_at <= self._clock.now(UTC):
            return None
        return Principal(token_id=entry.id, department=entry.department, operator=entry.operator)

    def __len__(self) -> int:
        return len(self._by_hash)
