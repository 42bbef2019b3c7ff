"""``baton bench``: the command line of :mod:`baton.bench`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from .bench import Bench, BenchConfig, table


def bench(
    duration: Annotated[
        float, typer.Option(help="Seconds of measurement in all (start-up and drains come on top).")
    ] = 60.0,
    rate: Annotated[float, typer.Option(help="Offered inbound events/s in the fixed-rate phase.")] = 500.0,
    publishers: Annotated[int, typer.Option(help="Publisher processes (each owns its own departments).")] = 2,
    window: Annotated[int, typer.Option(help="Lifecycles in flight per publisher at saturation.")] = 25,
    nats_url: Annotated[str | None, typer.Option(help="Target a running stack's NATS instead of starting one.")] = None,
    metrics_url: Annotated[str | None, typer.Option(help="The running stack's metrics service URL.")] = None,
    catalog: Annotated[Path, typer.Option(help="Department catalog (YAML).")] = Path("deploy/catalog.yaml"),
    out: Annotated[Path, typer.Option(help="Directory of the JSON results.")] = Path("bench-results"),
    drain_timeout: Annotated[float, typer.Option(help="Longest wait for the pipeline to drain after a phase.")] = 60.0,
    profile: Annotated[
        str, typer.Option(help="Comma-separated services to run under cProfile (embedded stack; slows them).")
    ] = "",
    keep_logs: Annotated[
        Path | None, typer.Option(help="Embedded stack: copy the services' logs into this directory at the end.")
    ] = None,
    creds: Annotated[
        Path | None,
        typer.Option("--creds", envvar="BATON_NATS_CREDS", help="Admin NATS credential file of a running stack."),
    ] = None,
) -> None:
    """Measure Baton's end-to-end throughput and latency next to the raw NATS limit (same run, same broker)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    config = BenchConfig(
        duration=duration,
        rate=rate,
        publishers=publishers,
        window=window,
        nats_url=nats_url,
        metrics_url=metrics_url,
        catalog_path=catalog,
        out_dir=out,
        drain_timeout=drain_timeout,
        profile=tuple(p for p in profile.split(",") if p),
        keep_logs=keep_logs,
        creds=creds,
    )
    result, path = asyncio.run(Bench(config, echo=typer.echo).run())
    typer.echo("")
    typer.echo(table(result))
    typer.echo(f"\nresults: {path}")
