"""NATS identities and permissions, generated from the catalog: one user per department, one per
service, and the operator (``admin``: provisioning, benchmarks, operator tools).

``write_nats_config(out_dir, catalog)`` writes, under ``out_dir`` (``.baton/nats`` for ``baton up``):

- ``auth.conf``: the ``authorization { users = [...] }`` block: bcrypt hashes and permissions, no
  clear password; any nats-server config can ``include`` it;
- ``server.conf``: a complete server config for a standalone nats-server (compose, systemd): port,
  JetStream, ``include auth.conf``, and a ``tls`` block when a certificate is given;
- ``creds/departments/<slug>.json``, ``creds/services/<service>.json``, ``creds/admin.json``:
  each identity's clear password and inbox prefix (mode 0600), handed to that identity only.

Idempotent: existing credential files are kept (``rotate=True`` makes new passwords for all), and
an unchanged password keeps its bcrypt hash (``hashes.json``), so rerunning rewrites identical files.
A department missing from the catalog loses its user on the next run (its file is left in place).

Permissions (every list is an allow-list: anything not listed is refused by the server):

- a department publishes only ``baton.in.<slug>.>`` plus the three JetStream API subjects of its own
  pull consumer (``dept-<slug>`` on ``BATON_NOTIFY``: info, next, ack) and reads only its own inbox
  ``_INBOX_<slug>.>``. No consumer creation, no stream API, no ``_INBOX.>``;
- each service gets its own consumers, the subjects it publishes and, for the notifier's live feed
  and metrics' rebuild, ephemeral ordered consumers on the one stream they read;
- ``admin`` may do everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import bcrypt

from libs.contracts.catalog import Catalog
from libs.contracts.natsauth import NatsCredential, connect_options
from libs.contracts.subjects import (
    CONSUMER_ADVISORIES,
    CONSUMER_INTAKE,
    CONSUMER_METRICS,
    CONSUMER_NOTIFIER,
    CONSUMER_ROUTING,
    CONSUMER_ROUTING_TIMERS,
    DLQ_PREFIX,
    EVENTS_PREFIX,
    INBOUND_PREFIX,
    LEASE_BUCKET,
    NOTIFY_PREFIX,
    SERVICE_PREFIX,
    SERVICES,
    STREAM_ADVISORIES,
    STREAM_EVENTS,
    STREAM_IN,
    STREAM_NOTIFY,
    STREAM_TIMERS,
    TIMER_SCHEDULE_PREFIX,
    check_slug,
    department_consumer,
)

AUTH_CONF = "auth.conf"
SERVER_CONF = "server.conf"
HASHES = "hashes.json"
CREDS_DIR = "creds"
ADMIN_USER = "admin"
#: bcrypt work factor: nats-server checks the hash on every connect (about 50 ms at 10 on one core).
BCRYPT_COST = 10

#: Refused to departments explicitly (already outside their allow-lists; listed for the reader).
DEPARTMENT_PUBLISH_DENY = (
    "$JS.API.CONSUMER.CREATE.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.>",
    "$JS.API.CONSUMER.DELETE.>",
    "$JS.API.STREAM.>",
    "_INBOX.>",
)
DEPARTMENT_SUBSCRIBE_DENY = ("_INBOX.>",)

Kind = Literal["department", "service", "admin"]


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class Identity:
    kind: Kind
    name: str  # department slug, service name, or "admin"
    user: str
    inbox_prefix: str
    permissions: Permissions = field(compare=False)

    @property
    def creds_path(self) -> Path:
        """Relative to the output directory."""
        if self.kind == "department":
            return Path(CREDS_DIR) / "departments" / f"{self.name}.json"
        if self.kind == "service":
            return Path(CREDS_DIR) / "services" / f"{self.name}.json"
        return Path(CREDS_DIR) / "admin.json"


# --- permissions ---------------------------------------------------------------------------------
def pull_consumer_subjects(stream: str, durable: str) -> tuple[str, ...]:
    """What a client publishes to read a provisioned pull consumer: info, next batch, ack/nak/term."""
    return (
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    )


def kv_subjects(bucket: str) -> tuple[str, ...]:
    """What a client publishes to use a provisioned key-value bucket: status, get, put/create/update/delete."""
    return (
        f"$JS.API.STREAM.INFO.KV_{bucket}",
        f"$JS.API.STREAM.MSG.GET.KV_{bucket}",
        f"$JS.API.DIRECT.GET.KV_{bucket}.>",
        f"$KV.{bucket}.>",
    )


def ordered_consumer_subjects(stream: str) -> tuple[str, ...]:
    """What an ephemeral ordered consumer on ``stream`` needs: create, info, delete, flow control."""
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


def department_inbox(slug: str) -> str:
    return f"_INBOX_{check_slug(slug)}"


def service_inbox(service: str) -> str:
    # '_' is not allowed in a slug: no department inbox can collide with a service's.
    return f"_INBOX_svc_{service}"


def department_permissions(slug: str) -> Permissions:
    return Permissions(
        publish=(
            f"{INBOUND_PREFIX}.{check_slug(slug)}.>",
            *pull_consumer_subjects(STREAM_NOTIFY, department_consumer(slug)),
        ),
        subscribe=(f"{department_inbox(slug)}.>",),
        publish_deny=DEPARTMENT_PUBLISH_DENY,
        subscribe_deny=DEPARTMENT_SUBSCRIBE_DENY,
    )


def service_permissions(service: str) -> Permissions:
    common = ("$JS.API.INFO", f"{DLQ_PREFIX}.{service}.>")
    publish: tuple[str, ...]
    if service == "intake":
        publish = (
            *pull_consumer_subjects(STREAM_IN, CONSUMER_INTAKE),
            f"{EVENTS_PREFIX}.>",  # the canonical log
            f"{NOTIFY_PREFIX}.>",  # 'rejected' notices to the publishing department
            # JetStream's give-up advisories of every service consumer become dead letters
            # (services/intake/advisories.py): the advisory consumer, the original message, any
            # service's dead-letter subject.
            *pull_consumer_subjects(STREAM_ADVISORIES, CONSUMER_ADVISORIES),
            *(f"$JS.API.STREAM.MSG.GET.{stream}" for stream in (STREAM_IN, STREAM_EVENTS, STREAM_TIMERS)),
            f"{DLQ_PREFIX}.>",
            # The consumer lease (services/intake/lease.py): one active replica consumes BATON_IN.
            *kv_subjects(LEASE_BUCKET),
        )
    elif service == "routing":
        publish = (
            *pull_consumer_subjects(STREAM_EVENTS, CONSUMER_ROUTING),
            *pull_consumer_subjects(STREAM_TIMERS, CONSUMER_ROUTING_TIMERS),
            f"{SERVICE_PREFIX}.routing.>",
            f"{TIMER_SCHEDULE_PREFIX}.>",
            f"$JS.API.STREAM.MSG.GET.{STREAM_EVENTS}",  # is a later event of a request already logged?
            f"$JS.API.DIRECT.GET.{STREAM_EVENTS}",
            f"$JS.API.DIRECT.GET.{STREAM_EVENTS}.>",
        )
    elif service == "notifier":
        publish = (
            *pull_consumer_subjects(STREAM_EVENTS, CONSUMER_NOTIFIER),
            f"{NOTIFY_PREFIX}.>",
            *ordered_consumer_subjects(STREAM_NOTIFY),  # the SSE live feed
        )
    elif service == "metrics":
        publish = (
            *pull_consumer_subjects(STREAM_EVENTS, CONSUMER_METRICS),
            *ordered_consumer_subjects(STREAM_EVENTS),  # `baton metrics rebuild` replays the log
        )
    else:
        raise ValueError(f"unknown service {service!r}")
    return Permissions(publish=(*common, *publish), subscribe=(f"{service_inbox(service)}.>",))


ADMIN_PERMISSIONS = Permissions(publish=(">",), subscribe=(">",))


def identities(catalog: Catalog) -> list[Identity]:
    """Every identity the catalog implies: its departments, Baton's services, the operator."""
    found = [
        Identity("department", slug, f"dept-{slug}", department_inbox(slug), department_permissions(slug))
        for slug in catalog.slugs
    ]
    found += [Identity("service", s, f"svc-{s}", service_inbox(s), service_permissions(s)) for s in SERVICES]
    found.append(Identity("admin", ADMIN_USER, ADMIN_USER, "_INBOX", ADMIN_PERMISSIONS))
    return found


# --- rendering -----------------------------------------------------------------------------------
def _list(values: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def render_user(identity: Identity, password_hash: str) -> str:
    p = identity.permissions
    publish = f"allow: {_list(p.publish)}" + (f", deny: {_list(p.publish_deny)}" if p.publish_deny else "")
    subscribe = f"allow: {_list(p.subscribe)}" + (f", deny: {_list(p.subscribe_deny)}" if p.subscribe_deny else "")
    return (
        f"    # {identity.kind} {identity.name}; inbox {identity.inbox_prefix}\n"
        f"    {{\n"
        f"      user: {json.dumps(identity.user)}\n"
        f"      password: {json.dumps(password_hash)}\n"
        f"      permissions: {{\n"
        f"        publish: {{ {publish} }}\n"
        f"        subscribe: {{ {subscribe} }}\n"
        f"      }}\n"
        f"    }}"
    )


def render_authorization(users: list[tuple[Identity, str]]) -> str:
    body = "\n".join(render_user(identity, hashed) for identity, hashed in users)
    return (
        "# Written by `baton nats-config` from the catalog: bcrypt hashes only (clear passwords are in creds/).\n"
        "authorization {\n  users = [\n" + body + "\n  ]\n}\n"
    )


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None = None  # with verify: clients must present a certificate signed by it
    verify: bool = False


def render_tls(tls: TlsFiles) -> str:
    lines = [
        "tls {",
        f"  cert_file: {json.dumps(str(tls.cert))}",
        f"  key_file: {json.dumps(str(tls.key))}",
    ]
    if tls.ca:
        lines.append(f"  ca_file: {json.dumps(str(tls.ca))}")
    if tls.verify:
        lines.append("  verify: true")
    return "\n".join([*lines, "}"]) + "\n"


def render_server(
    *,
    port: int = 4222,
    store_dir: str = "/data/jetstream",
    monitor_port: int | None = 8222,
    tls: TlsFiles | None = None,
) -> str:
    """A complete nats-server config for a standalone server; ``auth.conf`` must sit beside it."""
    lines = [
        "# Written by `baton nats-config`. Start with: nats-server -c server.conf (auth.conf beside it).",
        "server_name: baton",
        f"port: {port}",
    ]
    if monitor_port:
        lines.append(f"http_port: {monitor_port}")
    lines += ["jetstream {", f"  store_dir: {json.dumps(store_dir)}", "}", f"include {AUTH_CONF}"]
    text = "\n".join(lines) + "\n"
    return text + (render_tls(tls) if tls else "")


# --- writing -------------------------------------------------------------------------------------
def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def _fingerprint(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


@dataclass
class NatsConfigReport:
    out_dir: Path
    created: list[str] = field(default_factory=list)  # users given a new password
    kept: list[str] = field(default_factory=list)

    @property
    def auth_conf(self) -> Path:
        return self.out_dir / AUTH_CONF

    @property
    def server_conf(self) -> Path:
        return self.out_dir / SERVER_CONF

    def __str__(self) -> str:
        return "\n".join(
            [
                f"server config: {self.server_conf} (includes {self.auth_conf.name})",
                f"credentials:   {self.out_dir / CREDS_DIR} (mode 0600; give each identity only its own file)",
                f"{len(self.created)} new, {len(self.kept)} kept"
                + (f": new {', '.join(self.created)}" if self.created else ""),
            ]
        )


def write_nats_config(
    out_dir: Path,
    catalog: Catalog,
    *,
    rotate: bool = False,
    port: int = 4222,
    store_dir: str = "/data/jetstream",
    monitor_port: int | None = 8222,
    tls: TlsFiles | None = None,
    server_conf: bool = True,
) -> NatsConfigReport:
    """Write ``auth.conf``, ``server.conf`` (unless ``server_conf=False``: ``baton up`` writes its own
    and includes ``auth.conf``) and the credential files (see the module docstring)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = NatsConfigReport(out_dir)
    hashes_path = out_dir / HASHES
    try:
        cached: dict[str, dict[str, str]] = json.loads(hashes_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    users: list[tuple[Identity, str]] = []
    new_cache: dict[str, dict[str, str]] = {}
    for identity in identities(catalog):
        path = out_dir / identity.creds_path
        cred: NatsCredential | None = None
        if path.exists() and not rotate:
            cred = NatsCredential.load(path)
            if cred.user != identity.user or cred.inbox_prefix != identity.inbox_prefix:
                cred = NatsCredential(identity.user, cred.password, identity.inbox_prefix)
                cred.dump(path)
            report.kept.append(identity.user)
        else:
            cred = NatsCredential(identity.user, secrets.token_urlsafe(32), identity.inbox_prefix)
            cred.dump(path)
            report.created.append(identity.user)
        fingerprint = _fingerprint(cred.password)
        entry = cached.get(identity.user)
        if entry and entry.get("sha256") == fingerprint:
            hashed = entry["bcrypt"]
        else:
            hashed = bcrypt.hashpw(cred.password.encode(), bcrypt.gensalt(BCRYPT_COST)).decode()
        new_cache[identity.user] = {"sha256": fingerprint, "bcrypt": hashed}
        users.append((identity, hashed))
    _write_private(hashes_path, json.dumps(new_cache, indent=2, sort_keys=True) + "\n")
    _write_private(report.auth_conf, render_authorization(users))
    if server_conf:
        _write_private(
            report.server_conf, render_server(port=port, store_dir=store_dir, monitor_port=monitor_port, tls=tls)
        )
    return report


def credential_path(out_dir: Path, kind: Kind, name: str) -> Path:
    """Where ``write_nats_config`` puts an identity's credential file."""
    if kind == "department":
        return out_dir / CREDS_DIR / "departments" / f"{check_slug(name)}.json"
    if kind == "service":
        return out_dir / CREDS_DIR / "services" / f"{name}.json"
    return out_dir / CREDS_DIR / "admin.json"


#: Environment variables the CLI reads for its NATS connection (the services use their own settings).
ENV_CREDS = "BATON_NATS_CREDS"
ENV_TLS_CA = "BATON_NATS_TLS_CA"
ENV_TLS_CERT = "BATON_NATS_TLS_CERT"
ENV_TLS_KEY = "BATON_NATS_TLS_KEY"


def cli_options(kind: Kind, name: str, *, creds: Path | None = None, data_dir: Path = Path(".baton")) -> dict[str, Any]:
    """``nats.connect`` keywords for a CLI command acting as an identity: ``creds`` (``--creds`` or
    ``BATON_NATS_CREDS``), else the file ``baton up`` wrote under ``data_dir`` when there is one, else
    no authentication. TLS from ``BATON_NATS_TLS_CA`` / ``_CERT`` / ``_KEY``."""
    explicit = creds or (Path(os.environ[ENV_CREDS]) if os.environ.get(ENV_CREDS) else None)
    path = explicit or credential_path(data_dir / "nats", kind, name)
    return connect_options(
        credentials=path if explicit or path.exists() else None,
        tls_ca=os.environ.get(ENV_TLS_CA) or None,
        tls_cert=os.environ.get(ENV_TLS_CERT) or None,
        tls_key=os.environ.get(ENV_TLS_KEY) or None,
    )
