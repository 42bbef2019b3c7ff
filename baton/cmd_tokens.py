"""``baton token …`` (department credentials) and ``baton rejected <dept>`` (recent refusals).

Tokens live in a YAML file of hashes (``libs/contracts/tokens.py``); a token's plaintext is shown
once, when it is made. Services re-read the file when it changes, so ``new`` and ``revoke`` take
effect without a restart.
"""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from libs.contracts.catalog import parse_duration
from libs.contracts.envelope import SYSTEM_DEPARTMENT
from libs.contracts.subjects import SubjectError, check_slug
from libs.contracts.tokens import TokenEntry, TokenFile, generate_token, hash_token, load_token_file, save_token_file

tokens_app = typer.Typer(help="Department tokens for the HTTP APIs: hashed at rest, rotatable without a restart.")

DEFAULT_DATA_DIR = Path(".baton")
DEFAULT_TOKENS = DEFAULT_DATA_DIR / "tokens.yaml"
DEFAULT_INTAKE_URL = "http://127.0.0.1:8101"
TokensOpt = Annotated[Path, typer.Option("--tokens", help="Token file (YAML of hashes).")]


# --- the operations (also used by `baton up`) ----------------------------------------------------
def issue_token(
    path: Path,
    department: str | None,
    *,
    token_id: str | None = None,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> tuple[TokenEntry, str]:
    """Add a token for ``department`` (None = operator) to the file; returns the entry and the plaintext."""
    tokens = load_token_file(path)
    now = now or datetime.now(UTC)
    owner = department or "operator"
    entry_id = token_id or f"{owner}-{now:%Y%m%d}-{secrets.token_hex(2)}"
    if any(t.id == entry_id for t in tokens.tokens):
        raise ValueError(f"a token with id {entry_id!r} already exists")
    plaintext = generate_token(department)
    entry = TokenEntry(
        id=entry_id,
        department=department,
        operator=department is None,
        sha256=hash_token(plaintext),
        created_at=now,
        expires_at=expires_at,
    )
    save_token_file(path, TokenFile(version=tokens.version, tokens=[*tokens.tokens, entry]))
    return entry, plaintext


def revoke_token(path: Path, token_id: str) -> TokenEntry:
    tokens = load_token_file(path)
    if not any(t.id == token_id for t in tokens.tokens):
        raise KeyError(token_id)
    updated = [t.model_copy(update={"revoked": True}) if t.id == token_id else t for t in tokens.tokens]
    save_token_file(path, TokenFile(version=tokens.version, tokens=updated))
    return next(t for t in updated if t.id == token_id)


def ensure_stack_tokens(data_dir: Path, departments: list[str]) -> Path | None:
    """First start of a data dir: one token per department plus an operator token.

    Writes the hashes to ``tokens.yaml`` and the plaintexts, once, to ``tokens.txt`` (mode 600).
    Returns the plaintext file when tokens were made, None when the data dir already had a token file.
    """
    path = data_dir / "tokens.yaml"
    if path.exists():
        return None
    lines = ["# Baton tokens, written once by `baton up`: hand each department its own, then delete this file.\n"]
    for department in [*departments, None]:
        entry, plaintext = issue_token(path, department, token_id=f"{department or 'operator'}-initial")
        lines.append(f"{entry.department or 'operator'}\t{plaintext}\n")
    plain = data_dir / "tokens.txt"
    fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.writelines(lines)
    plain.chmod(0o600)
    return plain


def token_from_file(plaintext_file: Path, department: str | None) -> str | None:
    """The token for ``department`` (None = operator) from a ``tokens.txt`` written by ``baton up``."""
    if not plaintext_file.exists():
        return None
    owner = department or "operator"
    for line in plaintext_file.read_text(encoding="utf-8").splitlines():
        name, _, token = line.partition("\t")
        if name == owner and token:
            return token.strip()
    return None


def _status(entry: TokenEntry, now: datetime) -> str:
    if entry.revoked:
        return "revoked"
    if entry.expires_at is not None and entry.expires_at <= now:
        return "expired"
    return "active"


def _slug(department: str) -> str:
    try:
        check_slug(department)
    except SubjectError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if department == SYSTEM_DEPARTMENT:
        raise typer.BadParameter(f"{SYSTEM_DEPARTMENT!r} is reserved for Baton's own services")
    return department


# --- commands ------------------------------------------------------------------------------------
@tokens_app.command("new")
def new(
    department: Annotated[str | None, typer.Argument(help="Department slug, e.g. it (omit with --operator).")] = None,
    tokens: TokensOpt = DEFAULT_TOKENS,
    token_id: Annotated[
        str | None, typer.Option("--id", help="A name for the token (default: <dept>-<date>-<hex>).")
    ] = None,
    expires: Annotated[str | None, typer.Option(help="Lifetime, e.g. 90d; default: no expiry.")] = None,
    operator: Annotated[bool, typer.Option("--operator", help="An operator token: reads everything.")] = False,
) -> None:
    """Make a token; it is printed once and only its hash is stored."""
    if operator == (department is not None):
        raise typer.BadParameter("give a department, or --operator (not both)")
    dept = _slug(department) if department is not None else None
    now = datetime.now(UTC)
    try:
        expires_at = now + parse_duration(expires) if expires else None
        entry, plaintext = issue_token(tokens, dept, token_id=token_id, expires_at=expires_at, now=now)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(plaintext)
    until = f", expires {entry.expires_at:%Y-%m-%d %H:%M} UTC" if entry.expires_at else ""
    typer.secho(
        f"token {entry.id} for {entry.department or 'operator'}{until}: shown once, only its hash is in {tokens}",
        err=True,
        dim=True,
    )


@tokens_app.command("list")
def list_tokens(tokens: TokensOpt = DEFAULT_TOKENS) -> None:
    """Every token in the file: id, owner, created, expiry, status (never the secret)."""
    entries = load_token_file(tokens).tokens
    if not entries:
        typer.echo(f"no tokens in {tokens}")
        return
    now = datetime.now(UTC)
    rows: list[tuple[str, ...]] = [("ID", "OWNER", "CREATED", "EXPIRES", "STATUS")]
    for t in entries:
        created = f"{t.created_at:%Y-%m-%d %H:%M}" if t.created_at else "-"
        expires = f"{t.expires_at:%Y-%m-%d %H:%M}" if t.expires_at else "never"
        rows.append((t.id, t.department or "operator", created, expires, _status(t, now)))
    _table(rows)


@tokens_app.command("revoke")
def revoke(token_id: Annotated[str, typer.Argument(help="The token's id (see `baton token list`).")],
           tokens: TokensOpt = DEFAULT_TOKENS) -> None:  # fmt: skip
    """Revoke a token; services refuse it as soon as they see the file change."""
    try:
        entry = revoke_token(tokens, token_id)
    except KeyError as exc:
        raise typer.BadParameter(f"no token with id {token_id!r} in {tokens}") from exc
    typer.echo(f"revoked {entry.id} ({entry.department or 'operator'})")


def rejected(
    department: Annotated[str, typer.Argument(help="Department slug, e.g. marketing")],
    intake_url: Annotated[str, typer.Option(help="Intake's HTTP address.")] = DEFAULT_INTAKE_URL,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="BATON_TOKEN",
            help="The department's (or an operator) token; default: from <data-dir>/tokens.txt of `baton up`.",
        ),
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Where `baton up` keeps its data.")] = DEFAULT_DATA_DIR,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
) -> None:
    """Recent refusals of a department's events, over NATS and HTTP, newest first."""
    dept = _slug(department)
    token = token or token_from_file(data_dir / "tokens.txt", None) or token_from_file(data_dir / "tokens.txt", dept)
    if not token:
        raise typer.BadParameter("no token: pass --token (or BATON_TOKEN)")
    try:
        response = httpx.get(
            f"{intake_url.rstrip('/')}/v1/rejections",
            params={"department": dept, "limit": limit},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        typer.secho(f"intake at {intake_url} did not answer: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    if response.status_code != 200:
        body: dict[str, Any] = response.json() if response.content else {}
        typer.secho(f"{response.status_code}: {body.get('detail', response.text)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    items: list[dict[str, Any]] = response.json()
    if not items:
        typer.echo(f"no refusals for {dept}")
        return
    rows: list[tuple[str, ...]] = [("WHEN (UTC)", "VIA", "TYPE", "REQUEST", "EVENT", "CODE", "WHY")]
    for r in items:
        rows.append(
            (
                str(r["rejected_at"])[:19].replace("T", " "),
                r["channel"],
                r.get("event_type") or "-",
                r.get("request_id") or "-",
                r.get("event_id") or "-",
                r["code"],
                _clip(r["message"], 90),
            )
        )
    _table(rows)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        typer.secho(line, bold=index == 0)
