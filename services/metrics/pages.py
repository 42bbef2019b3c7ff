"""Server-rendered pages (Jinja2, autoescaped: request titles, reasons and comments are user text)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from .charts import sparkline

TEMPLATES = Path(__file__).parent / "templates"

_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: datetime | None) -> str:
    return value.strftime("%a %d %b %H:%M") if value else "—"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m" if minutes else f"{int(seconds)}s"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _sla_class(value: float | None) -> str:
    if value is None:
        return "none"
    return "good" if value >= 0.9 else "fair" if value >= 0.75 else "poor"


_env.filters["when"] = _when
_env.filters["duration"] = _duration
_env.filters["pct"] = _pct
_env.filters["num"] = _num
_env.filters["sla_class"] = _sla_class
_env.globals["sparkline"] = sparkline


def render(template: str, **context: object) -> str:
    return _env.get_template(template).render(**context)
