"""How every Baton client authenticates to NATS: credential files, TLS, and the settings that name them.

``baton nats-config`` writes one credential file per identity (a department, a service, the
operator): JSON with ``user``, ``password`` and ``inbox_prefix``, mode 0600. The server only knows
the bcrypt hash of each password and the identity's permissions (``baton/nats_config.py``). A
client must use its ``inbox_prefix`` (``_INBOX_<slug>`` for a department): replies, PubAcks and
pull-consumer deliveries arrive there, and it is the only inbox the server lets it read.

No broker imports: services, the CLI and tests turn :func:`connect_options` into nats-py /
FastStream keyword arguments (``user``, ``password``, ``inbox_prefix``, ``tls``). Nothing set =
no authentication and no TLS (a plain development server, as the tests start).
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings


class CredentialError(ValueError):
    """A credential file is missing, unreadable or incomplete."""


@dataclass(frozen=True)
class NatsCredential:
    """One identity's NATS login. ``password`` is the only clear copy of the secret."""

    user: str
    password: str
    inbox_prefix: str

    @classmethod
    def load(cls, path: Path | str) -> NatsCredential:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(str(data["user"]), str(data["password"]), str(data["inbox_prefix"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CredentialError(f"cannot read NATS credential file {path}: {exc}") from exc

    def dump(self, path: Path) -> None:
        """Write the file readable by its owner only (created 0600, never world-readable for a moment)."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = json.dumps({"user": self.user, "password": self.password, "inbox_prefix": self.inbox_prefix}, indent=2)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.chmod(tmp, 0o600)
        tmp.replace(path)


def tls_context(
    ca_file: Path | str | None, cert_file: Path | str | None, key_file: Path | str | None
) -> ssl.SSLContext:
    """A client TLS context: verify the server against ``ca_file`` (else the system CAs); present
    ``cert_file``/``key_file`` when the server asks for client certificates (``verify: true``)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    if cert_file:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


def connect_options(
    *,
    credentials: Path | str | None = None,
    user: str | None = None,
    password: str | None = None,
    inbox_prefix: str | None = None,
    tls_ca: Path | str | None = None,
    tls_cert: Path | str | None = None,
    tls_key: Path | str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` and ``NatsBroker``. Explicit values win over the file's."""
    options: dict[str, Any] = {}
    if credentials:
        cred = NatsCredential.load(credentials)
        options |= {"user": cred.user, "password": cred.password, "inbox_prefix": cred.inbox_prefix}
    if user:
        options["user"] = user
    if password:
        options["password"] = password
    if inbox_prefix:
        options["inbox_prefix"] = inbox_prefix
    if tls_ca or tls_cert:
        options["tls"] = tls_context(tls_ca, tls_cert, tls_key)
    return options


class NatsClientSettings(BaseSettings):
    """The NATS login and TLS fields every service shares (read with the service's own env prefix,
    e.g. ``BATON_INTAKE_NATS_CREDENTIALS``), and the HTTP TLS files its uvicorn serves with."""

    nats_credentials: Path | None = Field(
        default=None,
        description="Credential file written by `baton nats-config` (JSON: user, password, inbox_prefix). "
        "Unset: connect without authentication.",
    )
    nats_user: str | None = Field(default=None, description="NATS user (overrides the credential file's).")
    nats_password: SecretStr | None = Field(default=None, description="NATS password (overrides the file's).")
    nats_inbox_prefix: str | None = Field(
        default=None, description="Inbox prefix the server lets this user read (overrides the file's)."
    )
    nats_tls_ca: Path | None = Field(default=None, description="CA bundle that signed the NATS server certificate.")
    nats_tls_cert: Path | None = Field(default=None, description="Client certificate, when NATS verifies clients.")
    nats_tls_key: Path | None = Field(default=None, description="The client certificate's private key.")
    http_tls_cert: Path | None = Field(default=None, description="Serve HTTPS with this certificate (PEM).")
    http_tls_key: Path | None = Field(default=None, description="The HTTPS certificate's private key (PEM).")

    def nats_options(self) -> dict[str, Any]:
        """``user``/``password``/``inbox_prefix``/``tls`` for nats-py and FastStream (empty: no auth, no TLS)."""
        return connect_options(
            credentials=self.nats_credentials,
            user=self.nats_user,
            password=self.nats_password.get_secret_value() if self.nats_password else None,
            inbox_prefix=self.nats_inbox_prefix,
            tls_ca=self.nats_tls_ca,
            tls_cert=self.nats_tls_cert,
            tls_key=self.nats_tls_key,
        )

    def broker_options(self) -> dict[str, Any]:
        """The same login as FastStream ``NatsBroker`` keywords (``security=``, ``inbox_prefix=``).

        FastStream is imported here, lazily: only services call this, and contracts stay broker-free.
        """
        from faststream.nats.security import NatsSecurity, NatsUserPassword

        options = self.nats_options()
        out: dict[str, Any] = {}
        if "inbox_prefix" in options:
            out["inbox_prefix"] = options["inbox_prefix"]
        tls = options.get("tls")
        if "user" in options:
            out["security"] = NatsUserPassword(options["user"], options.get("password", ""), ssl_context=tls)
        elif tls is not None:
            out["security"] = NatsSecurity(ssl_context=tls)
        return out

    def subscriber_inbox_prefix(self) -> bytes:
        """FastStream pull subscribers take their inbox prefix per subscriber (``inbox_prefix=``), not from
        the connection: ``b"<prefix>."`` so that their fetches are answered on the inbox this user may read."""
        prefix = self.nats_options().get("inbox_prefix") or "_INBOX"
        return f"{prefix}.".encode()

    def uvicorn_tls(self) -> dict[str, Any]:
        """``ssl_certfile``/``ssl_keyfile`` for uvicorn when both are set (else plain HTTP)."""
        if self.http_tls_cert and self.http_tls_key:
            return {"ssl_certfile": str(self.http_tls_cert), "ssl_keyfile": str(self.http_tls_key)}
        return {}
