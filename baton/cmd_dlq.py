"""``baton dlq list|show|replay``: the dead-letter queue (stream ``BATON_DLQ``), read and replayed.

An entry's id is its sequence in ``BATON_DLQ`` (``baton dlq list`` shows it); ``show`` also takes a
``dead_letter_id`` (``dlq-<consumer>-<stream seq>``).

Replay re-publishes the original bytes, with the original headers, to the original subject under a new
``Nats-Msg-Id`` (``replay-<dlq seq>-<n>``), then records the replay on ``baton.dlq.replay.<dlq seq>``:
a second replay of the same entry needs ``--force``. Only inbound entries (original subject on
``BATON_IN``: ``baton.in.>`` / ``baton.svc.>``) are replayed: intake re-checks them and dedupes by
``event_id``. A canonical event (``baton.events.>``) is never re-published (that would put a
duplicate in the canonical log), nor is a due timer; see docs/reliability.md for how those recover.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import nats
import typer
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from nats.js.manager import JetStreamManager
from pydantic import ValidationError

from libs.contracts import DeadLetter, dumps
from libs.contracts.dlq import DlqReplay
from libs.contracts.subjects import (
    DLQ_PREFIX,
    DLQ_REPLAY_PREFIX,
    INBOUND_PREFIX,
    SERVICE_PREFIX,
    SERVICES,
    STREAM_DLQ,
    check_event_type,
    check_service,
    dlq_replay_subject,
)

from .nats_config import cli_options
from .supervisor import DEFAULT_NATS_PORT

dlq_app = typer.Typer(help="The dead-letter queue: list, show and replay entries.", no_args_is_help=True)

DEFAULT_URL = f"nats://127.0.0.1:{DEFAULT_NATS_PORT}"
#: Headers JetStream or the first publish set, which a replay must not carry over.
_DROPPED_HEADERS = frozenset({"Nats-Msg-Id", "Nats-Expected-Stream", "Nats-Expected-Last-Sequence"})


class DlqError(RuntimeError):
    """An entry is missing, not replayable, or already replayed (without --force)."""


@dataclass
class Entry:
    sequence: int  # in BATON_DLQ
    stored_at: datetime
    letter: DeadLetter
    replays: list[DlqReplay] = field(default_factory=list)

    @property
    def replayable(self) -> bool:
        return replay_refusal(self.letter) is None

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.sequence,
            "dead_letter_id": self.letter.dead_letter_id,
            "service": self.letter.service,
            "code": self.letter.code,
            "message": self.letter.message,
            "subject": self.letter.original_subject,
            "at": self.letter.dead_lettered_at.isoformat(),
            "replays": len(self.replays),
        }

    def full(self) -> dict[str, Any]:
        raw = _payload(self.letter)
        try:
            payload_text: str | None = raw.decode()
        except UnicodeDecodeError:
            payload_text = None
        return {
            "id": self.sequence,
            "stored_at": self.stored_at.isoformat(),
            **self.letter.model_dump(mode="json", exclude={"payload"}),
            "deliveries": self.letter.details.get("deliveries"),
            "payload_text": payload_text,
            "payload_base64": self.letter.payload,
            "replayable": self.replayable,
            "not_replayable_because": replay_refusal(self.letter),
            "replays": [r.model_dump(mode="json") for r in self.replays],
        }


def replay_refusal(letter: DeadLetter) -> str | None:
    """Why this entry cannot be replayed, or None when it can."""
    subject = letter.original_subject
    if any(c.isspace() for c in subject) or ".." in subject or subject.endswith("."):
        return f"{subject!r} is not a publishable subject"
    if subject.startswith((INBOUND_PREFIX + ".", SERVICE_PREFIX + ".")):
        return None
    if not subject:
        return "the original message is unknown (it was gone from its stream when it was dead-lettered)"
    return (
        f"{subject!r} is not an inbound subject: canonical events and timers are never re-published "
        "(see docs/reliability.md, 'Replay')"
    )


def _payload(letter: DeadLetter) -> bytes:
    try:
        return base64.b64decode(letter.payload, validate=True)
    except (binascii.Error, ValueError):
        return b""


def filter_subject(service: str | None, code: str | None) -> str:
    return f"{DLQ_PREFIX}.{check_service(service) if service else '*'}.{check_event_type(code) if code else '*'}"


async def _replays(jsm: JetStreamManager) -> dict[int, list[DlqReplay]]:
    out: dict[int, list[DlqReplay]] = {}
    async for _seq, _time, subject, data in _scan(jsm, f"{DLQ_REPLAY_PREFIX}.*"):
        try:
            record = DlqReplay.model_validate_json(data)
        except ValidationError:
            continue
        if subject == dlq_replay_subject(record.dlq_sequence):
            out.setdefault(record.dlq_sequence, []).append(record)
    return out


async def _scan(jsm: JetStreamManager, subject: str, start: int = 1) -> Any:
    """Every message of BATON_DLQ on ``subject`` from ``start`` on: (seq, time, subject, data)."""
    seq = start
    while True:
        try:
            msg = await jsm.get_msg(STREAM_DLQ, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return
        assert msg.seq is not None
        yield msg.seq, msg.time or datetime.now(UTC), msg.subject or "", msg.data or b""
        seq = msg.seq + 1


async def list_entries(
    nc: NATS, *, service: str | None = None, code: str | None = None, since: datetime | None = None
) -> list[Entry]:
    jsm = nc.jsm()
    replays = await _replays(jsm)
    entries: list[Entry] = []
    async for seq, stored_at, subject, data in _scan(jsm, filter_subject(service, code)):
        if subject.split(".")[2] not in SERVICES:  # replay records share the stream
            continue
        if since is not None and stored_at < since:
            continue
        try:
            letter = DeadLetter.model_validate_json(data)
        except ValidationError:
            continue
        entries.append(Entry(seq, stored_at, letter, replays.get(seq, [])))
    return entries


async def get_entry(nc: NATS, ident: str) -> Entry:
    jsm = nc.jsm()
    if ident.isdigit():
        try:
            msg = await jsm.get_msg(STREAM_DLQ, seq=int(ident))
        except NotFoundError as exc:
            raise DlqError(f"no dead letter {ident} in {STREAM_DLQ}") from exc
        parts = (msg.subject or "").split(".")
        if len(parts) != 4 or parts[2] not in SERVICES:
            raise DlqError(f"message {ident} of {STREAM_DLQ} is not a dead letter ({msg.subject})")
        letter = DeadLetter.model_validate_json(msg.data or b"")
        replays = (await _replays(jsm)).get(int(ident), [])
        return Entry(int(ident), msg.time or datetime.now(UTC), letter, replays)
    for entry in await list_entries(nc):
        if entry.letter.dead_letter_id == ident:
            return entry
    raise DlqError(f"no dead letter {ident!r} in {STREAM_DLQ}")


async def replay_entry(nc: NATS, entry: Entry, *, force: bool = False, by: str = "") -> DlqReplay:
    """Re-publish an inbound entry to its original subject (new Nats-Msg-Id) and record the replay."""
    if (why := replay_refusal(entry.letter)) is not None:
        raise DlqError(f"dead letter {entry.sequence} cannot be replayed: {why}")
    if entry.replays and not force:
        raise DlqError(
            f"dead letter {entry.sequence} was already replayed {len(entry.replays)} time(s), last at "
            f"{entry.replays[-1].replayed_at.isoformat()}; use --force to replay it again"
        )
    msg_id = f"replay-{entry.sequence}-{len(entry.replays) + 1}"
    headers = {k: v for k, v in entry.letter.original_headers.items() if k not in _DROPPED_HEADERS}
    headers |= {"Nats-Msg-Id": msg_id, "Baton-Replay-Of": entry.letter.dead_letter_id}
    js = nc.jetstream()
    await js.publish(entry.letter.original_subject, _payload(entry.letter), headers=headers)
    record = DlqReplay(
        dead_letter_id=entry.letter.dead_letter_id,
        dlq_sequence=entry.sequence,
        subject=entry.letter.original_subject,
        msg_id=msg_id,
        replayed_at=datetime.now(UTC),
        replayed_by=by[:100],
    )
    await js.publish(
        dlq_replay_subject(entry.sequence), dumps(record), stream=STREAM_DLQ, headers={"Nats-Msg-Id": msg_id}
    )
    entry.replays.append(record)
    return record


# --- the commands ------------------------------------------------------------------------
NatsOpt = Annotated[str, typer.Option("--nats-url", help="NATS server URL(s), comma-separated.")]
ServiceOpt = Annotated[str | None, typer.Option("--service", help="Only this service's entries.")]
CodeOpt = Annotated[str | None, typer.Option("--code", help="Only entries with this code.")]
SinceOpt = Annotated[str | None, typer.Option("--since", help="Only entries newer than this: 2h, 30m, 7d or ISO time.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    if value is None:
        return None
    now = now or datetime.now(UTC)
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].isdigit():
        return now - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is neither a duration (2h, 30m, 7d) nor an ISO time") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


async def _connect(url: str) -> NATS:
    servers = [s.strip() for s in url.split(",") if s.strip()]
    # As the operator: $BATON_NATS_CREDS, else the admin credential `baton up` wrote, else no auth.
    options = cli_options("admin", "admin")
    return await nats.connect(servers, name="baton-dlq", connect_timeout=5, max_reconnect_attempts=3, **options)


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _checked(service: str | None, code: str | None) -> None:
    try:
        filter_subject(service, code)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@dlq_app.command("list")
def list_cmd(
    nats_url: NatsOpt = DEFAULT_URL,
    service: ServiceOpt = None,
    code: CodeOpt = None,
    since: SinceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List dead letters, oldest first."""
    _checked(service, code)
    when = parse_since(since)

    async def run() -> list[Entry]:
        nc = await _connect(nats_url)
        try:
            return await list_entries(nc, service=service, code=code, since=when)
        finally:
            await nc.close()

    entries = asyncio.run(run())
    if as_json:
        typer.echo(json.dumps([e.summary() for e in entries], indent=2))
        return
    for e in entries:
        s = e.summary()
        replayed = f"  replayed x{s['replays']}" if s["replays"] else ""
        typer.echo(f"{s['id']:>6}  {s['at'][:19]}  {s['service']:<8}  {s['code']:<18}  {s['subject'][:60]}{replayed}")
        typer.echo(f"        {s['message'][:150]}")
    typer.echo(f"{len(entries)} dead letter(s)")


@dlq_app.command("show")
def show_cmd(
    entry_id: Annotated[str, typer.Argument(help="The entry's id (see `baton dlq list`) or its dead_letter_id.")],
    nats_url: NatsOpt = DEFAULT_URL,
) -> None:
    """One dead letter in full: original subject, headers, payload, reason, deliveries, time, replays."""

    async def run() -> Entry:
        nc = await _connect(nats_url)
        try:
            return await get_entry(nc, entry_id)
        finally:
            await nc.close()

    try:
        entry = asyncio.run(run())
    except DlqError as exc:
        _fail(str(exc))
        return
    typer.echo(json.dumps(entry.full(), indent=2, ensure_ascii=False))


@dlq_app.command("replay")
def replay_cmd(
    entry_id: Annotated[str | None, typer.Argument(help="The entry's id (see `baton dlq list`).")] = None,
    all_matching: Annotated[
        bool, typer.Option("--all-matching", help="Replay every replayable entry the filters select.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replay even if it was replayed before.")] = False,
    nats_url: NatsOpt = DEFAULT_URL,
    service: ServiceOpt = None,
    code: CodeOpt = None,
    since: SinceOpt = None,
) -> None:
    """Re-publish inbound dead letters to their original subject (intake checks them again)."""
    if (entry_id is None) == (not all_matching):
        raise typer.BadParameter("give an entry id or --all-matching (with --service/--code/--since), not both")
    _checked(service, code)
    when = parse_since(since)
    by = f"baton dlq replay ({sys.argv[0].rsplit('/', 1)[-1]})"

    async def run() -> tuple[list[DlqReplay], list[str]]:
        nc = await _connect(nats_url)
        done: list[DlqReplay] = []
        skipped: list[str] = []
        try:
            if entry_id is not None:
                done.append(await replay_entry(nc, await get_entry(nc, entry_id), force=force, by=by))
                return done, skipped
            for entry in await list_entries(nc, service=service, code=code, since=when):
                if not entry.replayable or (entry.replays and not force):
                    skipped.append(f"{entry.sequence}: {replay_refusal(entry.letter) or 'already replayed'}")
                    continue
                done.append(await replay_entry(nc, entry, force=force, by=by))
            return done, skipped
        finally:
            await nc.close()

    try:
        done, skipped = asyncio.run(run())
    except DlqError as exc:
        _fail(str(exc))
        return
    for record in done:
        typer.echo(f"replayed {record.dlq_sequence} -> {record.subject} (Nats-Msg-Id {record.msg_id})")
    for line in skipped:
        typer.echo(f"skipped {line}")
    typer.echo(f"{len(done)} replayed, {len(skipped)} skipped")
