"""The NATS identity generator (baton/nats_config.py) and the client settings (libs/contracts/natsauth.py)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import bcrypt
import pytest
import yaml
from typer.testing import CliRunner

from baton import nats_config
from baton.cli import app
from baton.nats_config import (
    AUTH_CONF,
    SERVER_CONF,
    TlsFiles,
    credential_path,
    department_permissions,
    identities,
    service_permissions,
    write_nats_config,
)
from libs.contracts import Catalog
from libs.contracts.natsauth import NatsCredential, connect_options
from libs.contracts.subjects import SERVICES, STREAM_NOTIFY, department_consumer
from services.intake.settings import IntakeSettings

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def cheap_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cheapest bcrypt work factor: these tests check what is written, not how slow it is to guess."""
    monkeypatch.setattr(nats_config, "BCRYPT_COST", 4)


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(matches(p, subject) for p in patterns)


def test_one_identity_per_department_and_service_with_distinct_users_and_inboxes(catalog: Catalog) -> None:
    found = identities(catalog)
    assert [i.name for i in found if i.kind == "department"] == catalog.slugs
    assert [i.name for i in found if i.kind == "service"] == list(SERVICES)
    assert [i.name for i in found if i.kind == "admin"] == ["admin"]
    assert len({i.user for i in found}) == len(found)
    assert len({i.inbox_prefix for i in found}) == len(found)
    assert {i.inbox_prefix for i in found if i.kind == "department"} == {f"_INBOX_{s}" for s in catalog.slugs}


def test_a_department_may_publish_only_its_own_inbound_and_read_only_its_own_consumer(catalog: Catalog) -> None:
    for dept in catalog.slugs:
        perms = department_permissions(dept)
        assert allowed(perms.publish, f"baton.in.{dept}.created")
        assert allowed(perms.publish, f"$JS.API.CONSUMER.MSG.NEXT.{STREAM_NOTIFY}.{department_consumer(dept)}")
        assert allowed(perms.publish, f"$JS.ACK.{STREAM_NOTIFY}.{department_consumer(dept)}.1.2.3.4.5")
        assert allowed(perms.subscribe, f"_INBOX_{dept}.abc")
        for other in catalog.slugs:
            if other == dept:
                continue
            assert not allowed(perms.publish, f"baton.in.{other}.created")
            assert not allowed(perms.publish, f"$JS.API.CONSUMER.MSG.NEXT.{STREAM_NOTIFY}.{department_consumer(other)}")
            assert not allowed(perms.subscribe, f"_INBOX_{other}.abc")
        for forbidden in (
            f"$JS.API.CONSUMER.CREATE.{STREAM_NOTIFY}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM_NOTIFY}.x",
            "$JS.API.STREAM.DELETE.BATON_IN",
            "baton.svc.routing.routed",
            "baton.events.REQ-1.created",
            f"baton.notify.{dept}.routed",
        ):
            assert not allowed(perms.publish, forbidden), forbidden
        assert not allowed(perms.subscribe, "_INBOX.abc")
        assert not allowed(perms.subscribe, f"baton.notify.{dept}.routed")  # only through its consumer


def test_services_publish_only_what_they_own() -> None:
    assert allowed(service_permissions("intake").publish, "baton.events.REQ-1.created")
    assert not allowed(service_permissions("routing").publish, "baton.events.REQ-1.created")
    assert allowed(service_permissions("routing").publish, "baton.svc.routing.routed")
    assert allowed(service_permissions("routing").publish, "baton.timers.sched.REQ-1.it.accept.1.breach")
    assert not allowed(service_permissions("notifier").publish, "baton.svc.routing.routed")
    assert allowed(service_permissions("notifier").publish, "baton.notify.it.routed")
    for service in SERVICES:
        perms = service_permissions(service)
        assert allowed(perms.publish, f"baton.dlq.{service}.poison")
        assert not allowed(perms.publish, "baton.in.it.created")
        assert perms.subscribe == (f"_INBOX_svc_{service}.>",)
        # Intake writes the dead letters of every consumer JetStream gave up on (its advisory consumer).
        others = [s for s in SERVICES if s != service] if service != "intake" else []
        assert not any(allowed(perms.publish, f"baton.dlq.{o}.poison") for o in others)


def test_files_hold_hashes_in_the_server_config_and_passwords_only_in_0600_credentials(
    tmp_path: Path, catalog: Catalog
) -> None:
    report = write_nats_config(tmp_path, catalog)
    auth = (tmp_path / AUTH_CONF).read_text()
    assert len(report.created) == len(catalog.slugs) + len(SERVICES) + 1
    for identity in identities(catalog):
        path = tmp_path / identity.creds_path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        cred = NatsCredential.load(path)
        assert (cred.user, cred.inbox_prefix) == (identity.user, identity.inbox_prefix)
        assert cred.password not in auth
        block = auth.split(f'user: "{identity.user}"', 1)[1]
        hashed = block.split('password: "', 1)[1].split('"', 1)[0]
        assert bcrypt.checkpw(cred.password.encode(), hashed.encode())
    assert stat.S_IMODE((tmp_path / AUTH_CONF).stat().st_mode) == 0o600
    assert f"include {AUTH_CONF}" in (tmp_path / SERVER_CONF).read_text()
    assert credential_path(tmp_path, "department", "it") == tmp_path / "creds" / "departments" / "it.json"


def test_rerunning_keeps_credentials_and_rotate_replaces_them(tmp_path: Path, catalog: Catalog) -> None:
    write_nats_config(tmp_path, catalog)
    it = credential_path(tmp_path, "department", "it")
    first_password, first_auth = NatsCredential.load(it).password, (tmp_path / AUTH_CONF).read_text()
    again = write_nats_config(tmp_path, catalog)
    assert again.created == []
    assert NatsCredential.load(it).password == first_password
    assert (tmp_path / AUTH_CONF).read_text() == first_auth  # same hashes: nothing to reload
    rotated = write_nats_config(tmp_path, catalog, rotate=True)
    assert len(rotated.created) == len(identities(catalog))
    assert NatsCredential.load(it).password != first_password
    assert (tmp_path / AUTH_CONF).read_text() != first_auth


def test_a_department_gone_from_the_catalog_loses_its_user(tmp_path: Path, catalog: Catalog) -> None:
    write_nats_config(tmp_path, catalog)
    gone = catalog.departments[-1].slug
    smaller = catalog.model_copy(update={"departments": catalog.departments[:-1]})
    write_nats_config(tmp_path, smaller)
    assert f'user: "dept-{gone}"' not in (tmp_path / AUTH_CONF).read_text()
    assert 'user: "dept-it"' in (tmp_path / AUTH_CONF).read_text()


def test_cli_writes_a_tls_server_config_and_refuses_half_a_tls_pair(tmp_path: Path, catalog_path: Path) -> None:
    runner = CliRunner()
    base = ["nats-config", "--out", str(tmp_path), "--catalog", str(catalog_path)]
    result = runner.invoke(app, [*base, "--tls-cert", "/certs/server.pem"])
    assert result.exit_code == 2
    assert not (tmp_path / AUTH_CONF).exists()
    tls = ["--tls-cert", "/certs/server.pem", "--tls-key", "/certs/server.key", "--tls-ca", "/certs/ca.pem"]
    result = runner.invoke(app, [*base, *tls, "--tls-verify", "--port", "4333"])
    assert result.exit_code == 0, result.output
    server = (tmp_path / SERVER_CONF).read_text()
    assert "port: 4333" in server
    assert 'cert_file: "/certs/server.pem"' in server
    assert 'key_file: "/certs/server.key"' in server
    assert 'ca_file: "/certs/ca.pem"' in server
    assert "verify: true" in server
    assert TlsFiles(Path("a"), Path("b")).verify is False


def test_client_options_from_a_file_and_from_service_settings(
    tmp_path: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_nats_config(tmp_path, catalog)
    path = credential_path(tmp_path, "service", "intake")
    cred = NatsCredential.load(path)
    assert connect_options(credentials=path) == {
        "user": "svc-intake",
        "password": cred.password,
        "inbox_prefix": "_INBOX_svc_intake",
    }
    assert connect_options() == {}
    assert connect_options(credentials=path, user="other")["user"] == "other"

    monkeypatch.setenv("BATON_INTAKE_NATS_CREDENTIALS", str(path))
    settings = IntakeSettings()
    assert settings.nats_options()["user"] == "svc-intake"
    assert settings.subscriber_inbox_prefix() == b"_INBOX_svc_intake."
    security = settings.broker_options()["security"]
    assert (security.username, security.password) == ("svc-intake", cred.password)
    assert settings.broker_options()["inbox_prefix"] == "_INBOX_svc_intake"
    assert settings.uvicorn_tls() == {}
    monkeypatch.setenv("BATON_INTAKE_HTTP_TLS_CERT", "/certs/http.pem")
    monkeypatch.setenv("BATON_INTAKE_HTTP_TLS_KEY", "/certs/http.key")
    assert IntakeSettings().uvicorn_tls() == {"ssl_certfile": "/certs/http.pem", "ssl_keyfile": "/certs/http.key"}

    monkeypatch.delenv("BATON_INTAKE_NATS_CREDENTIALS")
    plain = IntakeSettings()
    assert (plain.nats_options(), plain.broker_options(), plain.subscriber_inbox_prefix()) == ({}, {}, b"_INBOX.")


def test_a_broken_credential_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "it.json"
    path.write_text(json.dumps({"user": "dept-it"}))
    with pytest.raises(ValueError, match=r"it\.json"):
        connect_options(credentials=path)


def test_compose_creates_nats_users_before_nats_and_every_client_uses_its_own() -> None:
    """docker-compose.yml: the nats-users job writes the nats-auth volume, every NATS node includes its
    auth.conf, the provisioning job is the admin and each service reads its own credential file."""
    root = Path(__file__).parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    job = services["nats-users"]
    assert job["command"][:2] == ["baton", "nats-config"]
    out = job["command"][job["command"].index("--out") + 1]
    assert f"nats-auth:{out}" in job["volumes"]
    assert "nats-auth" in compose["volumes"]
    nodes = [s for s in services.values() if str(s.get("image", "")).startswith("nats:")]
    assert len(nodes) == 3
    for node in nodes:
        assert "nats-auth:/etc/nats-auth:ro" in node["volumes"]
        assert node["depends_on"]["nats-users"]["condition"] == "service_completed_successfully"
        conf = root / "deploy" / node["command"][1].removeprefix("/etc/")
        if "${" in node["command"][1]:
            conf = root / "deploy" / "nats" / "standalone.conf"
        assert "include ../nats-auth/auth.conf" in conf.read_text(encoding="utf-8"), conf
    provision = services["provision"]["command"]
    assert provision[provision.index("--creds") + 1] == f"{out}/creds/admin.json"
    for name, svc in services.items():
        command = svc.get("command") or []
        if command[:2] != ["python", "-m"]:
            continue
        service = command[2].removeprefix("services.")
        env = svc["environment"]
        assert env[f"BATON_{service.upper()}_NATS_CREDENTIALS"] == f"{out}/creds/services/{service}.json", name
        assert f"nats-auth:{out}:ro" in svc["volumes"], name
