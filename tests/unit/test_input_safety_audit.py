"""Static audit of the services' code: SQL only through bound parameters, no subject built from unchecked
input outside libs/contracts/subjects.py, no template output that bypasses Jinja2's autoescape.

Each rule walks the AST (or the template text) of every file; a reviewed exception is listed with its reason.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CODE = sorted([*ROOT.glob("services/**/*.py"), *ROOT.glob("baton/*.py")])
SUBJECT_PREFIXES = ("baton.in", "baton.svc", "baton.events", "baton.notify", "baton.dlq", "baton.timers", "$JS")

#: (file, text inside the statement) -> why interpolation is safe there.
SQL_REVIEWED = {
    ("services/notifier/db.py", "ALTER TABLE"): "table and column DDL compiled from SQLAlchemy metadata, no input",
    ("services/intake/db.py", "pg_advisory_xact_lock"): "a module constant (SCHEMA_LOCK_KEY)",
}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def _interpolated(node: ast.expr) -> bool:
    """An f-string with a placeholder, ``"..." % x``, ``"..." + x`` or ``"...".format(...)``."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and isinstance(node.func.value, ast.Constant)
    )


def _calls(tree: ast.Module) -> Iterator[ast.Call]:
    return (n for n in ast.walk(tree) if isinstance(n, ast.Call))


def sql_findings(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    found = []
    tree = _tree(path)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "sqlalchemy"
            and any(a.name == "text" for a in node.names)
        ):
            found.append(f"{_rel(path)}:{node.lineno}: imports sqlalchemy.text (raw SQL)")
    for call in _calls(tree):
        name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        if name not in {"execute", "exec_driver_sql", "text"} or not call.args or not _interpolated(call.args[0]):
            continue
        statement = ast.get_source_segment(source, call) or ""
        if any(_rel(path) == f and marker in statement for f, marker in SQL_REVIEWED):
            continue
        found.append(f"{_rel(path)}:{call.lineno}: SQL built by string interpolation: {statement[:120]}")
    return found


def subject_findings(path: Path) -> list[str]:
    """f-strings that start like a Baton subject: subjects are built only by libs/contracts/subjects.py."""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            head = str(node.values[0].value)
            if head.startswith(SUBJECT_PREFIXES) and any(isinstance(v, ast.FormattedValue) for v in node.values):
                found.append(f"{_rel(path)}:{node.lineno}: subject built from an f-string ({head!r}...)")
    return found


@pytest.mark.parametrize("path", CODE, ids=_rel)
def test_sql_goes_through_bound_parameters(path: Path) -> None:
    assert sql_findings(path) == []


#: Files allowed to format subjects themselves, with why.
SUBJECTS_REVIEWED = {
    # NATS permission patterns (JetStream API subjects of Baton's own streams and consumers), built from
    # the constants in libs/contracts/subjects.py and catalog slugs passed through check_slug().
    "baton/nats_config.py",
}


@pytest.mark.parametrize("path", CODE, ids=_rel)
def test_no_subject_is_built_outside_the_checked_builders(path: Path) -> None:
    if any(path.as_posix().endswith(reviewed) for reviewed in SUBJECTS_REVIEWED):
        pytest.skip("reviewed: see SUBJECTS_REVIEWED")
    assert subject_findings(path) == []


def test_templates_never_bypass_autoescape() -> None:
    pages = (ROOT / "services/metrics/pages.py").read_text(encoding="utf-8")
    assert "select_autoescape" in pages
    for template in sorted((ROOT / "services/metrics/templates").glob("*.html")):
        text = template.read_text(encoding="utf-8")
        for marker in ("|safe", "| safe", "autoescape false", "autoescape=False"):
            assert marker not in text, f"{template.name} uses {marker!r}"
    for path in ROOT.glob("services/**/*.py"):
        assert "Markup(" not in path.read_text(encoding="utf-8"), f"{_rel(path)} builds Markup"


def test_the_audit_catches_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text(
        "from sqlalchemy import text\n"
        "async def f(session, rid):\n"
        "    await session.execute(f\"SELECT * FROM requests WHERE id = '{rid}'\")\n"
        "    nc = await nats.connect(rid)\n"
        "    return f'baton.events.{rid}.created'\n",
        encoding="utf-8",
    )
    assert len(sql_findings(bad)) == 2
    assert len(subject_findings(bad)) == 1
    assert len(reconnect_findings(bad)) == 1


#: Connections that may give up (a one-shot command or a start-up check), with why.
FINITE_RECONNECT = {
    "services/intake/app.py": "start-up check that the consumer exists",
    "services/routing/app.py": "start-up check that the consumer exists",
    "services/notifier/app.py": "start-up check that the consumer exists",
    "services/metrics/app.py": "start-up check that the consumer exists",
    "services/metrics/rebuild.py": "`baton metrics rebuild`, one-shot",
    "baton/natsserver.py": "readiness probe of the server being started",
    "baton/provision.py": "`baton provision`, one-shot",
    "baton/cmd_dlq.py": "`baton dlq`, one-shot",
    "baton/bench.py": "the benchmark's measuring clients (a reconnect would spoil the numbers)",
}


def reconnect_findings(path: Path) -> list[str]:
    found = []
    for call in _calls(_tree(path)):
        func = call.func
        name = f"{getattr(func.value, 'id', '')}.{func.attr}" if isinstance(func, ast.Attribute) else ""
        is_broker = isinstance(func, ast.Name) and func.id == "NatsBroker"
        if name != "nats.connect" and not is_broker:
            continue
        value = next((k.value for k in call.keywords if k.arg == "max_reconnect_attempts"), None)
        forever = (
            isinstance(value, ast.UnaryOp) and isinstance(value.operand, ast.Constant) and value.operand.value == 1
        )
        if not forever and (is_broker or _rel(path) not in FINITE_RECONNECT):
            found.append(f"{_rel(path)}:{call.lineno}: a long-running NATS connection must reconnect forever (-1)")
    return found


@pytest.mark.parametrize("path", CODE, ids=_rel)
def test_long_running_nats_connections_reconnect_forever(path: Path) -> None:
    assert reconnect_findings(path) == []
