"""NATS over TLS, configured as docs/security.md says: the server's ``tls`` block from ``baton nats-config``
(``render_tls``), a service's ``BATON_<SVC>_NATS_TLS_CA`` + credential file, FastStream and nats-py."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from faststream.nats import NatsBroker

from baton.nats_config import AUTH_CONF, TlsFiles, credential_path, render_tls, write_nats_config
from baton.natsserver import NatsServer
from baton.provision import provision
from libs.contracts import Catalog
from libs.contracts.natsauth import connect_options
from libs.contracts.subjects import STREAM_DLQ
from services.intake.settings import IntakeSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def make_certificates(where: Path) -> TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl, as an operator would)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=where, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=baton-test-ca")
    run("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (where / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    signed = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-extfile", "ext.cnf"]
    run("x509", "-req", "-in", "server.csr", *signed, "-out", "server.pem")
    return TlsFiles(where / "server.pem", where / "server.key", where / "ca.pem")


@pytest.fixture
async def tls_server(tmp_path: Path, catalog: Catalog) -> AsyncIterator[tuple[NatsServer, TlsFiles, Path]]:
    certs = tmp_path / "certs"
    certs.mkdir()
    tls = make_certificates(certs)
    out = tmp_path / "nats"
    write_nats_config(out, catalog, server_conf=False)
    admin = connect_options(credentials=credential_path(out, "admin", "admin"), tls_ca=tls.ca)
    server = NatsServer(
        out,
        extra_config=f"include {AUTH_CONF}\n" + render_tls(TlsFiles(tls.cert, tls.key)),
        client_options=admin,
    )
    await server.start_async()
    try:
        await provision(server.url, catalog, connect_options=admin)
        yield server, tls, out
    finally:
        await server.stop_async()


async def test_a_service_connects_over_tls_with_its_settings(
    tls_server: tuple[NatsServer, TlsFiles, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, tls, out = tls_server
    monkeypatch.setenv("BATON_INTAKE_NATS_URL", server.url)
    monkeypatch.setenv("BATON_INTAKE_NATS_CREDENTIALS", str(credential_path(out, "service", "intake")))
    monkeypatch.setenv("BATON_INTAKE_NATS_TLS_CA", str(tls.ca))
    settings = IntakeSettings()

    # FastStream, exactly as services/intake/app.py builds its broker
    broker = NatsBroker([settings.nats_url], **settings.broker_options())
    await broker.start()
    try:
        assert await broker.ping(timeout=5)
        ack = await broker.publish(b"{}", "baton.dlq.intake.tls_check", stream=STREAM_DLQ, timeout=5)
        assert ack is not None
        assert broker.connection._server_info.get("tls_required") is True
    finally:
        await broker.stop()

    # nats-py with the same options: a JetStream round trip on the service's own inbox
    nc = await nats.connect(settings.nats_url, **settings.nats_options())
    try:
        ack = await nc.jetstream().publish("baton.dlq.intake.tls_check", b"{}", timeout=5)
        assert ack.stream == STREAM_DLQ
    finally:
        await nc.close()


async def test_a_client_that_does_not_trust_the_server_certificate_is_refused(
    tls_server: tuple[NatsServer, TlsFiles, Path],
) -> None:
    server, _tls, out = tls_server
    # the system CAs do not know the test CA: the handshake fails before any credential is sent
    options = connect_options(credentials=credential_path(out, "department", "it")) | {
        "tls": ssl.create_default_context()
    }
    with pytest.raises(Exception, match=r"(?i)certificate"):
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3, **options)
