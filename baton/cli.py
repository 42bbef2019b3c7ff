"""The ``baton`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import nats
import orjson
import typer
from nats.js.api import ConsumerConfig, DeliverPolicy

from libs.contracts.catalog import parse_duration
from libs.contracts.catalog_file import CatalogError, load_catalog
from libs.contracts.subjects import STREAM_NOTIFY, SubjectError, check_slug, department_consumer, notify_filter

from .supervisor import DEFAULT_HTTP_BASE_PORT, DEFAULT_MONITOR_PORT, DEFAULT_NATS_PORT, Stack, StackConfig

app = typer.Typer(help="Baton: requests handed between departments as events.", no_args_is_help=True)

DEFAULT_URL = f"nats://127.0.0.1:{DEFAULT_NATS_PORT}"
CatalogOpt = Annotated[Path, typer.Option("--catalog", help="Department catalog (YAML).")]


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
    )
    try:
        raise SystemExit(asyncio.run(_up(config, demo, demo_interval)))
    except CatalogError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise SystemExit(2) from exc


async def _up(config: StackConfig, demo: bool, demo_interval: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
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

        demo_task = asyncio.create_task(Demo(stack.nats_url, interval=demo_interval).run())
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
) -> None:
    """Create or update every Baton stream and durable consumer (idempotent)."""
    from .provision import provision

    report = asyncio.run(provision(nats_url, load_catalog(catalog), num_replicas=replicas))
    typer.echo(str(report))


@app.command()
def tail(
    department: Annotated[str, typer.Argument(help="Department slug, e.g. it")],
    nats_url: Annotated[str, typer.Option(help="NATS server URL.")] = DEFAULT_URL,
    since: Annotated[str | None, typer.Option(help="Replay from this long ago, e.g. 2h, 30m, 1d.")] = None,
) -> None:
    """Follow a department's notification stream (resumes where the department's consumer left off)."""
    try:
        check_slug(department)
    except SubjectError as exc:
        raise typer.BadParameter(str(exc)) from exc
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_tail(department, nats_url, since))


COLOURS = {
    "created": typer.colors.CYAN,
    "routed": typer.colors.BLUE,
    "accepted": typer.colors.GREEN,
    "delayed": typer.colors.YELLOW,
    "resolved": typer.colors.BRIGHT_GREEN,
    "rejected": typer.colors.RED,
}


async def _tail(department: str, nats_url: str, since: str | None) -> None:
    nc = await nats.connect(nats_url, name=f"baton-tail-{department}")
    js = nc.jetstream()
    if since:
        start = datetime.now(UTC) - parse_duration(since)
        sub = await js.pull_subscribe(
            notify_filter(department),
            stream=STREAM_NOTIFY,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start),
        )
        ack = False
    else:
        sub = await js.pull_subscribe_bind(department_consumer(department), stream=STREAM_NOTIFY)
        ack = True
    typer.secho(f"following {notify_filter(department)} (Ctrl-C to stop)", dim=True)
    try:
        while True:
            try:
                msgs = await sub.fetch(50, timeout=2)
            except TimeoutError:
                continue
            for msg in msgs:
                note = orjson.loads(msg.data)
                kind = note.get("type", "?")
                when = note.get("created_at") or note.get("rejected_at") or ""
                label = typer.style(f"{kind:>9}", fg=COLOURS.get(kind, typer.colors.WHITE), bold=True)
                text = note.get("text") or f"{note.get('code')}: {note.get('message')}"
                typer.echo(f"{when[:19]} {label} {text}")
                if ack:
                    await msg.ack()
    finally:
        await nc.close()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
