"""``baton tail``, ``baton webhooks`` and ``baton digest``: a department's notifications from the terminal.

``tail`` reads NATS directly; ``webhooks`` and ``digest`` talk to the notifier's HTTP API with a
department (or operator) token from ``--token`` / ``$BATON_TOKEN``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import nats
import orjson
import typer
from nats.js.api import ConsumerConfig, DeliverPolicy

from libs.contracts.catalog import parse_duration
from libs.contracts.subjects import STREAM_NOTIFY, SubjectError, check_slug, department_consumer, notify_filter

from .nats_config import cli_options
from .supervisor import DEFAULT_HTTP_BASE_PORT, DEFAULT_NATS_PORT

DEFAULT_URL = f"nats://127.0.0.1:{DEFAULT_NATS_PORT}"
DEFAULT_NOTIFIER_URL = f"http://127.0.0.1:{DEFAULT_HTTP_BASE_PORT + 2}"

COLOURS: dict[str, str] = {
    "created": typer.colors.CYAN,
    "routed": typer.colors.BLUE,
    "accepted": typer.colors.GREEN,
    "delayed": typer.colors.YELLOW,
    "resolved": typer.colors.BRIGHT_GREEN,
    "declined": typer.colors.MAGENTA,
    "reassigned": typer.colors.BLUE,
    "reopened": typer.colors.YELLOW,
    "feedback": typer.colors.BRIGHT_CYAN,
    "commented": typer.colors.WHITE,
    "returned": typer.colors.MAGENTA,
    "sla_warning": typer.colors.BRIGHT_YELLOW,
    "escalated": typer.colors.BRIGHT_RED,
    "handoff_loop_detected": typer.colors.RED,
    "digest": typer.colors.BRIGHT_BLUE,
    "rejected": typer.colors.RED,
}
#: Types that deserve bold (something is late or going wrong).
LOUD = frozenset({"delayed", "escalated", "handoff_loop_detected", "rejected", "returned"})


def _slug(department: str) -> str:
    try:
        return check_slug(department)
    except SubjectError as exc:
        raise typer.BadParameter(str(exc)) from exc


# --- tail ------------------------------------------------------------------------------------------


def format_line(data: bytes, *, colour: bool = True) -> str:
    """One notification (or rejection, or digest) as the terminal shows it."""
    try:
        note: dict[str, Any] = orjson.loads(data)
    except orjson.JSONDecodeError:
        return f"(unreadable message: {data[:200]!r})"
    kind = str(note.get("type", "?"))
    stamp = str(note.get("created_at") or note.get("rejected_at") or "")
    try:
        shown = datetime.fromisoformat(stamp).astimezone().strftime("%d %b %H:%M:%S")
    except ValueError:
        shown = stamp[:19]
    label = f"{kind:>21}"
    if colour:
        label = typer.style(label, fg=COLOURS.get(kind, typer.colors.WHITE), bold=kind in LOUD)
    role = f"[{note['role']}] " if note.get("role") else ""
    if kind == "digest":
        lines = [str(note.get("text", ""))]
        for request in note.get("requests", []):
            lines.append(f"    • {request.get('title', '')} ({request.get('request_id', '')})")
            lines.extend(f"        - {item.get('text', '')}" for item in request.get("items", []))
        return f"{shown} {label} " + "\n".join(lines)
    text = note.get("text") or f"{note.get('code')}: {note.get('message')}"
    return f"{shown} {label} {role}{text}"


async def follow(
    department: str,
    nats_url: str,
    since: str | None,
    emit: Callable[[bytes], None],
    *,
    limit: int | None = None,
    idle_exit: float | None = None,
    options: dict[str, Any] | None = None,
) -> int:
    """Print a department's notifications as they come; returns how many were shown.

    Without ``since``: the department's durable consumer ``dept-<slug>`` (provisioned by Baton),
    acking each message once shown, so the next ``tail`` resumes after it. With ``since``: an
    ephemeral consumer replaying from that long ago, which leaves the durable one untouched.
    ``limit`` / ``idle_exit`` (seconds without a message) end the loop (scripts and tests).
    ``options``: nats-py ``connect`` keywords: the department's credential (the operator's for ``since``,
    which creates a consumer: departments may not).
    """
    nc = await nats.connect(nats_url, name=f"baton-tail-{department}", max_reconnect_attempts=-1, **(options or {}))
    shown = 0
    try:
        js = nc.jetstream()
        if since:
            start = datetime.now(UTC) - parse_duration(since)
            sub = await js.pull_subscribe(
                notify_filter(department),
                stream=STREAM_NOTIFY,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start, inactive_threshold=60
                ),
            )
        else:
            sub = await js.pull_subscribe_bind(department_consumer(department), stream=STREAM_NOTIFY)
        idle_since = asyncio.get_running_loop().time()
        while limit is None or shown < limit:
            try:
                msgs = await sub.fetch(min(50, limit - shown) if limit else 50, timeout=1)
            except (TimeoutError, nats.errors.TimeoutError):
                if idle_exit is not None and asyncio.get_running_loop().time() - idle_since > idle_exit:
                    break
                continue
            idle_since = asyncio.get_running_loop().time()
            for msg in msgs:
                emit(msg.data or b"")
                if not since:
                    await msg.ack()
                shown += 1
    finally:
        await nc.close()
    return shown


def tail(
    department: Annotated[str, typer.Argument(help="Department slug, e.g. it")],
    nats_url: Annotated[str, typer.Option(help="NATS server URL.")] = DEFAULT_URL,
    since: Annotated[
        str | None, typer.Option(help="Replay from this long ago (2h, 30m, 1d) without moving the department's place.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One raw JSON notification per line.")] = False,
    count: Annotated[int | None, typer.Option(help="Stop after this many notifications.")] = None,
    creds: Annotated[
        Path | None,
        typer.Option(
            "--creds",
            envvar="BATON_NATS_CREDS",
            help="NATS credential file; default <data-dir>/nats/creds/departments/<dept>.json "
            "(admin.json with --since).",
        ),
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Where `baton up` keeps its data.")] = Path(".baton"),
) -> None:
    """Follow a department's notification stream, in colour; resumes where the department left off."""
    dept = _slug(department)
    colour = sys.stdout.isatty()

    def emit(data: bytes) -> None:
        typer.echo(data.decode(errors="replace") if as_json else format_line(data, colour=colour))

    if not as_json:
        what = f"replaying the last {since} of" if since else "following"
        typer.secho(f"{what} {notify_filter(dept)} (Ctrl-C to stop)", dim=True, err=True)
    with contextlib.suppress(KeyboardInterrupt):
        # The department reads its own durable consumer as itself; a replay (--since) needs a consumer
        # of its own, which only the operator may create.
        if since:
            options = cli_options("admin", "admin", creds=creds, data_dir=data_dir)
        else:
            options = cli_options("department", dept, creds=creds, data_dir=data_dir)
        asyncio.run(follow(dept, nats_url, since, emit, limit=count, options=options))


# --- the notifier's HTTP API -------------------------------------------------------------------------

TokenOpt = Annotated[
    str, typer.Option("--token", envvar="BATON_TOKEN", help="Department or operator token.", show_default=False)
]
NotifierOpt = Annotated[str, typer.Option("--notifier-url", envvar="BATON_NOTIFIER_URL", help="The notifier service.")]


def _call(method: str, url: str, token: str, **kwargs: Any) -> Any:
    try:
        response = httpx.request(method, url, headers={"Authorization": f"Bearer {token}"}, timeout=10, **kwargs)
    except httpx.HTTPError as exc:
        typer.secho(f"cannot reach the notifier at {url}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        typer.secho(f"{response.status_code}: {detail}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    return response.json() if response.content else None


webhooks_app = typer.Typer(help="Departments' webhooks: add, list, remove, and the deliveries that failed.")


@webhooks_app.command("add")
def webhooks_add(
    department: str,
    url: str,
    token: TokenOpt,
    types: Annotated[list[str] | None, typer.Option("--type", help="Only these event types (repeat).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="baton (the notification JSON) or slack ({'text'}).")] = "baton",
    description: Annotated[str, typer.Option(help="What it is for.")] = "",
    notifier_url: NotifierOpt = DEFAULT_NOTIFIER_URL,
) -> None:
    """Register an endpoint; prints its signing secret (shown only this once)."""
    body = {"url": url, "event_types": types or [], "format": fmt, "description": description}
    hook = _call("POST", f"{notifier_url}/v1/departments/{_slug(department)}/webhooks", token, json=body)
    typer.echo(f"webhook {hook['id']} -> {hook['url']} ({', '.join(hook['event_types']) or 'every type'})")
    typer.secho(f"signing secret (store it now, it is not shown again): {hook['secret']}", bold=True)


@webhooks_app.command("list")
def webhooks_list(department: str, token: TokenOpt, notifier_url: NotifierOpt = DEFAULT_NOTIFIER_URL) -> None:
    """A department's webhooks."""
    for hook in _call("GET", f"{notifier_url}/v1/departments/{_slug(department)}/webhooks", token):
        kinds = ", ".join(hook["event_types"]) or "every type"
        typer.echo(f"{hook['id']}  {hook['format']:<6} {hook['url']}  ({kinds})  {hook['description']}")


@webhooks_app.command("remove")
def webhooks_remove(
    department: str, webhook_id: str, token: TokenOpt, notifier_url: NotifierOpt = DEFAULT_NOTIFIER_URL
) -> None:
    """Remove a webhook (and the deliveries still queued for it)."""
    _call("DELETE", f"{notifier_url}/v1/departments/{_slug(department)}/webhooks/{webhook_id}", token)
    typer.echo(f"removed {webhook_id}")


@webhooks_app.command("failed")
def webhooks_failed(
    token: TokenOpt,
    department: Annotated[str | None, typer.Option("--department", "-d", help="Only this department.")] = None,
    notifier_url: NotifierOpt = DEFAULT_NOTIFIER_URL,
) -> None:
    """Deliveries that kept failing for the whole retry window (dead-lettered), newest first."""
    params = {"department": _slug(department)} if department else {}
    rows = _call("GET", f"{notifier_url}/v1/webhooks/failed", token, params=params)
    if not rows:
        typer.echo("no failed deliveries")
    for row in rows:
        typer.echo(
            f"{row['dead_at'][:19]}  {row['id']}  {row['department']:<12} {row['type']:<12} "
            f"{row['request_id'] or '-':<14} {row['attempts']} attempts  {row['last_error'] or ''}"
        )


@webhooks_app.command("retry")
def webhooks_retry(delivery_id: str, token: TokenOpt, notifier_url: NotifierOpt = DEFAULT_NOTIFIER_URL) -> None:
    """Queue a failed delivery again (a fresh retry window starts now)."""
    _call("POST", f"{notifier_url}/v1/webhooks/deliveries/{delivery_id}/retry", token)
    typer.echo(f"{delivery_id} queued again")


digest_app = typer.Typer(help="Per event type: immediate notifications, or an hourly / daily digest.")


@digest_app.command("show")
def digest_show(department: str, token: TokenOpt, notifier_url: NotifierOpt = DEFAULT_NOTIFIER_URL) -> None:
    prefs = _call("GET", f"{notifier_url}/v1/departments/{_slug(department)}/preferences", token)
    typer.echo(f"daily digest at {prefs['daily_at']:02d}:00 ({department}'s time zone)")
    for kind, mode in sorted(prefs["digest"].items()):
        typer.echo(f"  {kind:<22} {mode}")
    if not prefs["digest"]:
        typer.echo("  every type: immediate")


@digest_app.command("set")
def digest_set(
    department: str,
    choices: Annotated[list[str], typer.Argument(help="type=immediate|hourly|daily, e.g. sla_warning=hourly")],
    token: TokenOpt,
    daily_at: Annotated[int | None, typer.Option(help="Hour of the daily digest (0-23).")] = None,
    notifier_url: NotifierOpt = DEFAULT_NOTIFIER_URL,
) -> None:
    """Change some types' delivery; the others keep theirs."""
    url = f"{notifier_url}/v1/departments/{_slug(department)}/preferences"
    prefs = _call("GET", url, token)
    for choice in choices:
        kind, sep, mode = choice.partition("=")
        if not sep:
            raise typer.BadParameter(f"{choice!r}: expected type=immediate|hourly|daily")
        prefs["digest"][kind] = mode
    body = {"digest": prefs["digest"], "daily_at": prefs["daily_at"] if daily_at is None else daily_at}
    _call("PUT", url, token, json=body)
    digest_show(department, token, notifier_url)


def register(app: typer.Typer) -> None:
    """Add these commands to the ``baton`` CLI."""
    app.command()(tail)
    app.add_typer(webhooks_app, name="webhooks")
    app.add_typer(digest_app, name="digest")
