"""Load the department catalog (YAML) for routing, with errors that name the file and the field.

A deliberately small loader: services cannot import the ``baton`` CLI package, and routing
only needs "which file, which field, what is wrong" to fail fast at startup.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from libs.contracts.catalog import Catalog


class CatalogError(ValueError):
    """The catalog file cannot be read, is not YAML, or does not validate."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"invalid department catalog {path}:\n  " + "\n  ".join(problems))


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(catalog)"


def load_catalog(path: str | Path) -> Catalog:
    """Read, parse (``yaml.safe_load``) and validate ``path``; raise :class:`CatalogError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(path, [f"(file): cannot read: {exc.strerror or exc}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(path, [f"(yaml): not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise CatalogError(path, ["(catalog): must be a mapping with fallback_department and departments"])
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{_field(tuple(err['loc']))}: {str(err['msg']).removeprefix('Value error, ')}"
            for err in exc.errors(include_url=False)
        ]
        raise CatalogError(path, problems) from exc
