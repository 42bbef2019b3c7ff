"""The department catalog, re-read when its file changes, without a restart.

The catalog is loaded (and validated) at start: an invalid file stops routing there, with the
loader's file/line/field errors. Afterwards :meth:`CatalogWatcher.check` (called every few
seconds) reloads it when the file's contents changed. An edit that does not validate keeps the
last good catalog; ``status()`` says why (``GET /v1/catalog`` and ``/readyz`` show it) until a
good version is saved.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from libs.contracts import Catalog
from libs.contracts.catalog_file import CatalogError, load_catalog

log = logging.getLogger("baton.routing.catalog")


@dataclass(frozen=True)
class _Seen:
    mtime_ns: int
    size: int
    inode: int


class CatalogWatcher:
    """Holds the current catalog; ``path`` None means a fixed catalog (tests, embedding)."""

    def __init__(
        self,
        path: Path | None,
        catalog: Catalog | None = None,
        *,
        on_change: Callable[[Catalog], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.path = path
        self._clock = clock
        self.on_change = on_change
        self._seen: _Seen | None = None
        self.sha256: str | None = None
        if catalog is None:
            if path is None:
                raise ValueError("a catalog or a catalog path is needed")
            catalog = self._load()  # CatalogError at start: fail fast
        self.current: Catalog = catalog
        self.loaded_at: datetime = clock()
        self.reloads = 0
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None

    def _stat(self) -> _Seen | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return _Seen(st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> Catalog:
        assert self.path is not None
        seen = self._stat()
        data = self.path.read_bytes() if seen is not None else b""
        catalog = load_catalog(self.path)
        self._seen = seen
        self.sha256 = hashlib.sha256(data).hexdigest()
        return catalog

    def check(self) -> bool:
        """Reload when the file changed; True when a new catalog is now current."""
        if self.path is None:
            return False
        seen = self._stat()
        if seen is not None and seen == self._seen:
            return False
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            return self._failed(f"cannot read {self.path}: {exc.strerror or exc}", seen)
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.sha256 and self.last_error is None:
            self._seen = seen  # touched, not changed
            return False
        try:
            catalog = load_catalog(self.path)
        except CatalogError as exc:
            return self._failed(str(exc), seen)
        self._seen, self.sha256 = seen, digest
        self.current = catalog
        self.loaded_at = self._clock()
        self.reloads += 1
        self.last_error = self.last_error_at = None
        log.info(
            "catalog %s reloaded: %d departments, %d rules", self.path, len(catalog.departments), len(catalog.rules)
        )
        if self.on_change is not None:
            self.on_change(catalog)
        return True

    def _failed(self, message: str, seen: _Seen | None) -> bool:
        self._seen = seen  # do not re-read the same broken file every poll
        if message != self.last_error:
            log.error("catalog edit refused, keeping the last good catalog (loaded %s): %s", self.loaded_at, message)
        self.last_error = message
        self.last_error_at = self._clock()
        return False

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path is not None else None,
            "sha256": self.sha256,
            "loaded_at": self.loaded_at.isoformat(),
            "reloads": self.reloads,
            "ok": self.last_error is None,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at.isoformat() if self.last_error_at else None,
        }
