"""Load the department catalog (YAML) with errors a person can act on: file, line, field path, problem.

The catalog file format is part of the public contract; the CLI and every service that reads
the catalog load it through this one function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .catalog import Catalog


@dataclass(frozen=True)
class Problem:
    path: str  # e.g. "departments[3].timezone", or "(catalog)" for whole-file rules
    line: int | None
    message: str


class CatalogError(ValueError):
    """The catalog file cannot be read, is not YAML, or does not validate. ``problems`` lists each one."""

    def __init__(self, file: Path, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        lines = [f"{file}{f':{p.line}' if p.line else ''}: {p.path}: {p.message}" for p in problems]
        noun = "error" if len(problems) == 1 else "errors"
        super().__init__(f"invalid department catalog {file} ({len(problems)} {noun}):\n  " + "\n  ".join(lines))


def _format_path(loc: tuple[int | str, ...], data: Any) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    if (
        len(loc) >= 3
        and loc[0] == "departments"
        and loc[2] != "slug"
        and isinstance(loc[1], int)
        and isinstance(data, dict)
    ):
        departments = data.get("departments")
        if isinstance(departments, list) and loc[1] < len(departments) and isinstance(departments[loc[1]], dict):
            slug = departments[loc[1]].get("slug")
            if isinstance(slug, str):
                out += f" (department {slug!r})"
    return out or "(catalog)"


def _line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest YAML node on the path ``loc`` (None when the document is empty)."""
    node = root
    if node is None:
        return None
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node = child
    return int(node.start_mark.line) + 1


def _message(err: Any) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    if (
        err["type"] not in {"missing", "extra_forbidden"}
        and isinstance(value, str | int | float)
        and repr(value) not in msg
    ):
        msg += f" (got {value!r})"
    return msg


def load_catalog(path: str | Path) -> Catalog:
    """Read, parse (``yaml.safe_load``) and validate a catalog file; raise :class:`CatalogError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(path, [Problem("(file)", None, f"cannot read: {exc.strerror or exc}")]) from exc
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise CatalogError(path, [Problem("(yaml)", line, f"not valid YAML: {exc}")]) from exc
    if data is None:
        raise CatalogError(path, [Problem("(catalog)", None, "the file is empty")])
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        problems = [
            Problem(_format_path(tuple(err["loc"]), data), _line_of(root, tuple(err["loc"])), _message(err))
            for err in exc.errors(include_url=False)
        ]
        raise CatalogError(path, problems) from exc
