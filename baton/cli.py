"""The ``baton`` command line."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from libs.contracts.catalog_file import CatalogError, load_catalog

from .cmd_bench import bench
from .cmd_dlq import dlq_app
from .cmd_metrics import metrics_app
from .cmd_migrate import migrate_app
from .cmd_nats import nats_config
from .cmd_notify import register as register_notify_commands
from .cmd_route import route
from .cmd_tokens import rejected, tokens_app
from .nats_config import ENV_CREDS, cli_options
from .supervisor import DEFAULT_HTTP_BASE_PORT, DEFAULT_MONITOR_PORT, DEFAULT_NATS_PORT, Stack, StackConfig

app = typer.Typer(help="Baton: requests handed between departments as events.", no_args_is_help=True)
app.add_typer(tokens_app, name="token")
app.add_typer(metrics_app, name="metrics")  # rebuild, export
app.add_typer(migrate_app, name="migrate")  # upgrade to head, status, downgrade, new
app.add_typer(dlq_app, name="dlq")  # list, show, replay dead letters
app.command("rejected")(rejected)
app.command("route")(route)  # where a sample request would go, and why (--explain)
app.command("bench")(bench)  # throughput and latency next to the raw NATS limit
app.command("nats-config")(nats_config)  # NATS users and permissions from the catalog (docs/security.md)
register_notify_commands(app)  # tail, webhooks, digest

DEFAULT_URL = f"nats://127.0.0.1:{DEFAULT_NATS_PORT}"
CatalogOpt = Annotated[Path, typer.Option("--catalog", help="Department catalog (YAML).")]
CredsOpt = Annotated[
    Path | None, typer.Option("--creds", envvar=ENV_CREDS, help="NATS credential file (baton nats-config).")
]
DataDirOpt = Annotated[Path, typer.Option(help="Where `baton up` keeps its data (and NATS credentials).")]


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Where NATS, the databases and the logs live.")] = Path(".baton"),
    catalog: CatalogOpt = Path("deploy/catalog.yaml"),
    nats_port: Annotated[int, typer.Option(help="NATS client port (0 = any free port).")] = DEFAULT_NATS_PORT,
    monitor_port: Annotated[int, typer.Option(help="NATS monitoring port.")] = DEFAULT_MONITOR_PORT,
    http_port: Annotated[int, typer.Option(help="First HTTP port; services use 4 in a row.")] = DEFAULT_HTTP_BASE_PORT,
    nats_url: Annotated[str | None, typer.Option(help="Use a running NATS instead of starting one.")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Also drive realistic traffic between departments.")] = False,
    demo_interval: Annotated[float, typer.Option(help="Seconds between new demo requests.")] = 3.0,
    auth: Annotated[
        bool, typer.Option("--auth/--no-auth", help="NATS users per department and service (docs/security.md).")
    ] = True,
) -> None:
    """Run Baton on the embedded default: nats-server from the wheel, SQLite, all four services."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    config = StackConfig(
        data_dir=data_dir,
        catalog_path=catalog,
        nats_port=nats_port,
        monitor_port=monitor_port,
        http_base_port=http_port,
        nats_url=nats_url,
        auth=auth,
    )
    try:
        raise SystemExit(asyncio.run(_up(config, demo, demo_interval)))
    except CatalogError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise SystemExit(2) from exc


async def _up(config: StackConfig, demo: bool, demo_interval: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: closing the terminal must stop Baton cleanly, not orphan its services.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    stack = Stack(config)
    try:
        await stack.start()
    except BaseException:
        await stack.stop()
        raise
    width = max(len(k) for k, _ in stack.describe())
    typer.secho("Baton is up", fg=typer.colors.GREEN, bold=True)
    for key, value in stack.describe():
        typer.echo(f"  {key:<{width}}  {value}")
    typer.echo("Press Ctrl-C to stop; `baton up` again resumes with the same data.")
    demo_task: asyncio.Task[None] | None = None
    if demo:
        from .demo import Demo

        options = stack.client_options
        driver = Demo(
            stack.nats_url,
            interval=demo_interval,
            # each department publishes as itself; the operator watches the 'routed' notifications
            options=lambda dept: options("department", dept) if dept else options(),
        )
        demo_task = asyncio.create_task(driver.run())
        typer.echo("Demo traffic is flowing; try `baton tail it`.")
    await stop.wait()
    typer.echo("\nStopping Baton ...")
    if demo_task is not None:
        demo_task.cancel()
        await asyncio.wait({demo_task}, timeout=10)
    await stack.stop()
    typer.echo("Stopped cleanly.")
    return 0


@app.command("provision")
def provision_cmd(
    nats_url: Annotated[str, typer.Option(help="NATS server URL(s), comma-separated.")] = DEFAULT_URL,
    catalog: CatalogOpt = Path("deploy/catalog.yaml"),
    replicas: Annotated[int, typer.Option(help="Stream replicas (3 on a cluster).")] = 1,
    creds: CredsOpt = None,
    data_dir: DataDirOpt = Path(".baton"),
) -> None:
    """Create or update every Baton stream and durable consumer (idempotent). Needs the admin credential
    when NATS has users (default: <data-dir>/nats/creds/admin.json)."""
    from .provision import provision

    options = cli_options("admin", "admin", creds=creds, data_dir=data_dir)
    report = asyncio.run(provision(nats_url, load_catalog(catalog), num_replicas=replicas, connect_options=options))
    typer.echo(str(report))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
