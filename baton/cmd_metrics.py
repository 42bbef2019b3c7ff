"""``baton metrics``: rebuild the metrics projection from the canonical log; export scorecards.

Both read the metrics service's settings (``BATON_METRICS_*``) for their defaults, so on the
embedded stack they work with no options from the project directory.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

metrics_app = typer.Typer(help="Metrics: rebuild the projection from the log, export scorecards.", no_args_is_help=True)


@metrics_app.command("rebuild")
def rebuild_cmd(
    nats_url: Annotated[str | None, typer.Option(help="NATS URL(s); default BATON_METRICS_NATS_URL.")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="The live metrics database; default BATON_METRICS_DATABASE_URL.")
    ] = None,
    scratch_url: Annotated[
        str | None, typer.Option(help="Where to rebuild (default: a temporary SQLite file, deleted afterwards).")
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Swap the rebuilt projection in.")] = False,
) -> None:
    """Re-read BATON_EVENTS from the start (ephemeral ordered consumer) into a fresh projection and compare it
    with the live one. Exit 0 when identical (or replaced), 1 when they differ."""
    from services.metrics.rebuild import rebuild
    from services.metrics.settings import MetricsSettings

    from .nats_config import cli_options

    settings = MetricsSettings()
    report = asyncio.run(
        rebuild(
            nats_url or settings.nats_url,
            database_url or settings.database_url,
            scratch_url=scratch_url,
            replace=replace,
            # BATON_METRICS_NATS_* when set, else the metrics credential `baton up` wrote (if any)
            options=settings.nats_options() or cli_options("service", "metrics"),
        )
    )
    for line in report.lines():
        typer.echo(line)
    raise SystemExit(0 if report.identical or report.replaced else 1)


@metrics_app.command("export")
def export_cmd(
    window: Annotated[str, typer.Option(help="Window length, e.g. 7d, 30d, 90d.")] = "30d",
    fmt: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    output: Annotated[Path | None, typer.Option(help="File to write (default: standard output).")] = None,
    at: Annotated[
        datetime | None, typer.Option(help="End of the window (ISO 8601, UTC if no offset); default now.")
    ] = None,
    database_url: Annotated[str | None, typer.Option(help="Default BATON_METRICS_DATABASE_URL.")] = None,
    catalog: Annotated[Path | None, typer.Option(help="Department catalog for names and kinds.")] = None,
) -> None:
    """Scorecards of every department over a window, as CSV or JSON (for the monthly review)."""
    from services.metrics.export import export
    from services.metrics.settings import MetricsSettings

    if fmt not in {"csv", "json"}:
        raise typer.BadParameter("--format must be csv or json")
    settings = MetricsSettings()
    end = (at if at is None or at.tzinfo else at.replace(tzinfo=UTC)) or datetime.now(UTC)
    text = asyncio.run(
        export(
            database_url or settings.database_url,
            window=window,
            end=end,
            fmt=fmt,
            catalog_path=catalog or settings.catalog_path or _default_catalog(),
        )
    )
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {output}", err=True)


def _default_catalog() -> Path | None:
    path = Path("deploy/catalog.yaml")
    return path if path.exists() else None
