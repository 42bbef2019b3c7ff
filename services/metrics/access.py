"""Who sees what: the one rule the JSON API and the dashboard share.

* Every signed-in department sees **every scorecard** and the service map (transparency is the point).
* Request-level views (timelines, request pages, post-mortems, request lists, feedback comments) show
  only requests the department is **party to**: it raised it, holds or held it, or watches it.
* An **operator** token sees everything.
* Without a token file (``BATON_METRICS_TOKENS_PATH`` unset) access is open: everyone is treated as an
  operator, the service logs a warning at start and every page says so. That is for a laptop or a
  test, never for a shared deployment.

Credentials come from ``Authorization: Bearer <token>`` or, for the dashboard, the HttpOnly cookie
that the sign-in form sets. A request the viewer may not see is answered exactly like an unknown one
(404), so request ids cannot be probed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from libs.contracts.tokens import TokenRegistry

COOKIE = "baton_token"


@dataclass(frozen=True)
class Viewer:
    department: str | None
    operator: bool = False
    token_id: str | None = None
    open_access: bool = False

    @property
    def sees_everything(self) -> bool:
        return self.operator or self.open_access

    @property
    def label(self) -> str:
        if self.open_access:
            return "open access (no token file)"
        return "operator" if self.operator else f"{self.department}"


OPEN = Viewer(department=None, operator=False, token_id=None, open_access=True)


class Access:
    """Turns a presented token into a :class:`Viewer` (None: not signed in, or the token is not valid)."""

    def __init__(self, tokens_path: Path | None) -> None:
        self.registry = TokenRegistry(tokens_path) if tokens_path is not None else None

    @property
    def open(self) -> bool:
        return self.registry is None

    def viewer(self, authorization: str | None, cookie: str | None) -> Viewer | None:
        if self.registry is None:
            return OPEN
        token = None
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        elif cookie:
            token = cookie
        principal = self.registry.verify(token)
        if principal is None:
            return None
        return Viewer(department=principal.department, operator=principal.operator, token_id=principal.token_id)


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a local path only (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
