"""Intake's OpenAPI document, committed at ``docs/openapi/intake.json``.

``python -m services.intake.openapi`` (``make openapi``) rewrites it; ``tests/unit/test_intake_openapi.py``
fails when the document the app serves at ``/openapi.json`` differs from the committed one, so every
HTTP API change is a visible diff in review.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .app import create_app
from .settings import IntakeSettings

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "openapi" / "intake.json"


def document() -> dict[str, Any]:
    """The document the app serves (built without connecting to anything)."""
    app = create_app(IntakeSettings(database_url="sqlite+aiosqlite:///:memory:"))
    return app.openapi()


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(path: Path = COMMITTED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(document()), encoding="utf-8")
    return path


if __name__ == "__main__":
    sys.stdout.write(f"wrote {write()}\n")
