"""Committed JSON Schema snapshots of every contract model.

``python -m libs.contracts.snapshots`` rewrites ``libs/contracts/schemas/``; the test
``tests/unit/test_contract_snapshots.py`` fails when a model changes without its snapshot,
so every contract change is a visible diff in review.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .catalog import Catalog
from .events import EVENT_ADAPTER, EVENT_MODELS
from .notifications import DeadLetter, Notification, Rejection

SCHEMA_DIR = Path(__file__).parent / "schemas"

MODELS: dict[str, type[BaseModel]] = {
    **{f"event.{name}": model for name, model in EVENT_MODELS.items()},
    "notification": Notification,
    "rejection": Rejection,
    "dead_letter": DeadLetter,
    "catalog": Catalog,
}


def all_schemas() -> dict[str, dict[str, Any]]:
    schemas = {f"{name}.v1.json": model.model_json_schema(mode="validation") for name, model in MODELS.items()}
    schemas["event.any.v1.json"] = EVENT_ADAPTER.json_schema(mode="validation")
    return schemas


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, schema in all_schemas().items():
        path = directory / filename
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        sys.stdout.write(f"wrote {path}\n")
