"""Load the department catalog (YAML) for the notifier: display names and time zones.

A tiny copy of what the CLI does (services do not import ``baton``): ``yaml.safe_load``,
then :class:`libs.contracts.catalog.Catalog`; every problem names the file and the field.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from libs.contracts.catalog import Catalog


class CatalogError(ValueError):
    """The catalog file cannot be read, is not YAML, or does not validate."""


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(catalog)"


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate ``path``; raise :class:`CatalogError` naming the file and each bad field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"department catalog {path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise CatalogError(f"department catalog {path}: not valid YAML: {exc}") from exc
    if data is None:
        raise CatalogError(f"department catalog {path}: the file is empty")
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{_where(tuple(err['loc']))}: {str(err['msg']).removeprefix('Value error, ')}"
            for err in exc.errors(include_url=False)
        ]
        raise CatalogError(f"invalid department catalog {path}:\n  " + "\n  ".join(problems)) from exc
