"""``baton nats-config``: NATS users and permissions from the catalog (see ``baton/nats_config.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from libs.contracts.catalog_file import CatalogError, load_catalog

from .nats_config import TlsFiles, write_nats_config


def nats_config(
    out: Annotated[Path, typer.Option(help="Where server.conf, auth.conf and creds/ are written.")] = Path(
        ".baton/nats"
    ),
    catalog: Annotated[Path, typer.Option("--catalog", help="Department catalog (YAML).")] = Path(
        "deploy/catalog.yaml"
    ),
    rotate: Annotated[bool, typer.Option("--rotate", help="New passwords for every identity.")] = False,
    port: Annotated[int, typer.Option(help="Client port in server.conf.")] = 4222,
    store_dir: Annotated[str, typer.Option(help="JetStream store_dir in server.conf.")] = "/data/jetstream",
    monitor_port: Annotated[int, typer.Option(help="Monitoring port in server.conf (0 = none).")] = 8222,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM): server.conf requires TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The server certificate's private key (PEM).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA for client certificates (with --tls-verify).")] = None,
    tls_verify: Annotated[bool, typer.Option(help="Require client certificates signed by --tls-ca.")] = False,
) -> None:
    """Write nats-server users (one per department, one per service, admin) and their credential files.

    Rerunning keeps existing passwords (unless --rotate) and drops users of departments no longer in
    the catalog. `baton up` runs this itself into <data-dir>/nats; run it for a standalone server.
    """
    if (tls_cert is None) != (tls_key is None):
        typer.secho("--tls-cert and --tls-key go together", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if tls_verify and tls_ca is None:
        typer.secho("--tls-verify needs --tls-ca", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        loaded = load_catalog(catalog)
    except CatalogError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    tls = TlsFiles(tls_cert, tls_key, tls_ca, tls_verify) if tls_cert and tls_key else None
    report = write_nats_config(
        out, loaded, rotate=rotate, port=port, store_dir=store_dir, monitor_port=monitor_port or None, tls=tls
    )
    typer.echo(str(report))
