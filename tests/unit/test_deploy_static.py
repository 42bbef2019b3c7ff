"""The deployment files, checked statically (no Docker engine or Kubernetes runs on the build machines).

- ``docker-compose.yml`` is validated against the Compose Specification JSON Schema that
  ``check-jsonschema`` vendors (offline), then cross-checked for both stacks: the minimal one (no env
  file) and ``--env-file deploy/compose/full.env`` (profile ``full``), with compose's ``${VAR:-default}``
  interpolation applied the way ``docker compose`` does.
- The Kubernetes manifests (``deploy/k8s``, kustomize) get structural checks: no Kubernetes JSON Schema
  ships offline in a small package, so each object's shape is checked here for what Baton relies on.

Both are checked against the services' real settings models: every ``BATON_<SERVICE>_*`` variable must be
a field of that service's settings, and its value must validate.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from libs.contracts.tokens import TokenFile

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
FULL_ENV = ROOT / "deploy" / "compose" / "full.env"
K8S = ROOT / "deploy" / "k8s"
SERVICES = ("intake", "routing", "notifier", "metrics")
#: Variables a service may get besides its own ``BATON_<SERVICE>_*`` settings (read by the OTel SDK).
OTEL_VARS = frozenset(
    {"OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_RESOURCE_ATTRIBUTES"}
)
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
POSTGRES_INIT = ROOT / "deploy" / "postgres-init.sql"


# --------------------------------------------------------------------------- helpers


def settings_class(service: str) -> type[BaseSettings]:
    module = importlib.import_module(f"services.{service}.settings")
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, BaseSettings) and obj is not BaseSettings
    ]
    assert len(found) == 1, f"services.{service}.settings should define one settings class"
    return found[0]


def check_service_env(service: str, env: dict[str, str], where: str) -> BaseSettings:
    """Every variable is a real setting of ``service`` (or a standard OTEL_ one), and the values validate."""
    cls = settings_class(service)
    prefix = str(cls.model_config.get("env_prefix", ""))
    assert prefix == f"BATON_{service.upper()}_"
    values: dict[str, str] = {}
    for name, value in env.items():
        if name in OTEL_VARS:
            continue
        assert name.startswith(prefix), f"{where}: {name} is not a {prefix}* setting of {service}"
        field = name.removeprefix(prefix).lower()
        assert field in cls.model_fields, f"{where}: {name} is not a field of {cls.__name__}"
        values[field] = value
    return cls.model_validate(values)  # raises when a value does not validate


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        assert name in env, f"${{{name}}} has no value and no default"
        return env[name]

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}", sub, value)


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


STACKS = {"minimal": dict[str, str](), "full": read_env_file(FULL_ENV)}


def stack(name: str) -> dict[str, dict[str, Any]]:
    """The services compose runs for one stack, interpolated, with inactive profiles left out."""
    env = STACKS[name]
    profiles = {p for p in env.get("COMPOSE_PROFILES", "").split(",") if p}
    services: dict[str, dict[str, Any]] = interpolate(load_compose()["services"], env)
    return {n: s for n, s in services.items() if not s.get("profiles") or set(s["profiles"]) & profiles}


def baton_service(svc: dict[str, Any]) -> str | None:
    """``intake`` for a container running ``python -m services.intake``."""
    cmd = svc.get("command") or []
    if len(cmd) == 3 and cmd[:2] == ["python", "-m"] and cmd[2].startswith("services."):
        return str(cmd[2].removeprefix("services."))
    return None


def host_mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of every bind mount (``./…:/target[:ro]``)."""
    mounts: dict[str, Path] = {}
    for vol in svc.get("volumes", []):
        source, target = vol.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return mounts


def host_path(svc: dict[str, Any], container_path: str) -> Path:
    """The host file a container path of ``svc`` is bind-mounted from."""
    for target, source in host_mounts(svc).items():
        if container_path == target:
            return source
        if container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target.rstrip("/")) + 1 :]
    raise AssertionError(f"{container_path} is not under any bind mount")


def nats_hosts(url: str) -> set[str]:
    return {u.removeprefix("nats://") for u in url.split(",")}


def image_pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


# --------------------------------------------------------------------------- compose


def test_compose_matches_the_compose_specification_schema() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", list(STACKS))
def test_compose_images_come_from_the_dockerfile_or_are_pinned(name: str) -> None:
    for sname, svc in stack(name).items():
        if "build" in svc:
            assert svc["build"] == ".", sname
            assert (ROOT / "Dockerfile").is_file()
            assert svc["image"] == "baton:latest", sname
        else:
            assert image_pinned(svc["image"]), f"{sname}: {svc['image']} is not pinned to a tag"


@pytest.mark.parametrize("name", list(STACKS))
def test_compose_runs_two_replicas_of_every_service_with_their_own_settings(name: str) -> None:
    services = stack(name)
    replicas: dict[str, list[str]] = {s: [] for s in SERVICES}
    host_ports: list[str] = []
    for sname, svc in services.items():
        host_ports += [p.split(":")[0] for p in svc.get("ports", [])]
        service = baton_service(svc)
        if service is None:
            continue
        replicas[service].append(sname)
        env = {k: str(v) for k, v in svc["environment"].items()}
        settings: Any = check_service_env(service, env, f"compose {name} {sname}")
        # the HTTP port is the one published and probed, on all interfaces
        assert settings.http_host == "0.0.0.0"
        assert [p.split(":")[1] for p in svc["ports"]] == [str(settings.http_port)]
        probe = " ".join(svc["healthcheck"]["test"])
        assert probe.startswith("CMD python -c import urllib.request")
        assert f"http://127.0.0.1:{settings.http_port}/readyz" in probe
        # own database on the compose PostgreSQL, created by the init script
        assert settings.database_url.startswith("postgresql+asyncpg://")
        db = settings.database_url.rsplit("/", 1)[1]
        assert db == f"baton_{service}"
        assert f"CREATE DATABASE {db} " in POSTGRES_INIT.read_text(encoding="utf-8")
        assert "@postgres:5432/" in settings.database_url
        # NATS: every URL is a NATS node of this stack
        for host in nats_hosts(settings.nats_url):
            node, _, port = host.partition(":")
            assert node in services, f"{sname}: {host}"
            assert port == "4222", f"{sname}: {host}"
        # mounted files exist on the host
        for field in ("catalog_path", "tokens_path"):
            path = getattr(settings, field, None)
            if path is not None:
                assert host_path(svc, str(path)).is_file(), f"{sname}: {field} {path}"
        # starts only after provisioning, migrations and PostgreSQL; does not migrate itself
        assert svc["depends_on"]["provision"]["condition"] == "service_completed_successfully"
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert settings.migrate_on_start is False
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert env["OTEL_SERVICE_NAME"] == f"baton-{service}"
    assert {s: len(r) for s, r in replicas.items()} == dict.fromkeys(SERVICES, 2)
    assert len(host_ports) == len(set(host_ports)), "two containers publish the same host port"
    for svc in services.values():
        for source in host_mounts(svc).values():
            assert source.exists(), f"mounted {source} is missing"


def test_compose_token_file_is_a_valid_token_file() -> None:
    svc = stack("minimal")["intake-1"]
    path = host_path(svc, svc["environment"]["BATON_INTAKE_TOKENS_PATH"])
    TokenFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


def nats_conf(path: Path) -> dict[str, Any]:
    """The few things of a nats-server config file that matter here."""
    text = path.read_text(encoding="utf-8")
    name = re.search(r"^server_name:\s*(\S+)", text, re.M)
    routes = re.search(r"routes:\s*\[(.*?)\]", text, re.S)
    return {
        "server_name": name.group(1) if name else None,
        "jetstream": bool(re.search(r"^jetstream\s*\{", text, re.M)),
        "cluster": bool(re.search(r"^cluster\s*\{", text, re.M)),
        "routes": set(routes.group(1).split()) if routes else set(),
    }


@pytest.mark.parametrize(("name", "nodes", "replicas"), [("minimal", 1, 1), ("full", 3, 3)])
def test_compose_nats_and_provisioning(name: str, nodes: int, replicas: int) -> None:
    services = stack(name)
    nats = {n: s for n, s in services.items() if s.get("image", "").startswith("nats:")}
    assert len(nats) == nodes
    confs = {}
    for sname, svc in nats.items():
        major, minor = (int(x) for x in svc["image"].split(":")[1].split("-")[0].split(".")[:2])
        assert (major, minor) >= (2, 12)
        cmd = svc["command"]
        assert cmd[0] == "-c"
        conf = host_path(svc, cmd[1])
        assert conf.is_file(), conf
        confs[sname] = nats_conf(conf)
        assert confs[sname]["jetstream"], conf
    if nodes > 1:
        expected_routes = {f"nats://{n}:6222" for n in nats}
        assert len({c["server_name"] for c in confs.values()}) == nodes, "server names must be unique"
        for sname, node_conf in confs.items():
            assert node_conf["cluster"], sname
            assert node_conf["routes"] == expected_routes, sname
    else:
        assert not any(c["cluster"] for c in confs.values())

    prov = services["provision"]
    cmd = prov["command"]
    assert cmd[:2] == ["baton", "provision"]
    opts = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    assert int(opts["--replicas"]) == replicas <= nodes
    assert nats_hosts(opts["--nats-url"]) == {f"{n}:4222" for n in nats}
    assert host_path(prov, opts["--catalog"]).is_file()
    assert prov["restart"] == "on-failure"
    # services use the same NATS nodes as the provisioning job
    for svc in services.values():
        if (service := baton_service(svc)) is not None:
            assert svc["environment"][f"BATON_{service.upper()}_NATS_URL"] == opts["--nats-url"]


@pytest.mark.parametrize("name", list(STACKS))
def test_compose_migration_job_migrates_the_databases_the_replicas_use(name: str) -> None:
    services = stack(name)
    job = services["migrate"]
    assert job["command"] == ["baton", "migrate"]
    assert job["image"] == "baton:latest"
    assert job["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert job["restart"] == "on-failure"
    env = {k: str(v) for k, v in job["environment"].items()}
    for service in SERVICES:
        prefix = f"BATON_{service.upper()}_"
        own = {k: v for k, v in env.items() if k.startswith(prefix)}
        settings: Any = check_service_env(service, own, f"compose {name} migrate")
        for svc in services.values():
            if baton_service(svc) == service:
                assert svc["environment"][f"{prefix}DATABASE_URL"] == settings.database_url
    assert set(env) == {f"BATON_{s.upper()}_DATABASE_URL" for s in SERVICES}


def test_compose_postgres_has_one_database_per_service() -> None:
    pg = stack("minimal")["postgres"]
    assert host_mounts(pg)["/docker-entrypoint-initdb.d/10-baton.sql"] == POSTGRES_INIT
    created = set(re.findall(r"CREATE DATABASE (\w+)", POSTGRES_INIT.read_text(encoding="utf-8")))
    assert created == {f"baton_{s}" for s in SERVICES}


def test_compose_profiles_minimal_and_full() -> None:
    observability = {"jaeger", "prometheus", "grafana"}
    assert not observability & set(stack("minimal"))
    full = stack("full")
    assert observability <= set(full)
    minimal = stack("minimal")
    for svc in minimal.values():
        if (service := baton_service(svc)) is not None:
            assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "", "no exporter without Jaeger"
    jaeger = full["jaeger"]
    assert {"16686:16686", "4318:4318"} <= set(jaeger["ports"])
    for svc in full.values():
        if (service := baton_service(svc)) is not None:
            assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
            if service == "metrics":
                assert svc["environment"]["BATON_METRICS_JAEGER_URL"] == "http://127.0.0.1:16686"


def test_every_variable_of_the_full_env_file_is_used() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    for key in STACKS["full"]:
        if key != "COMPOSE_PROFILES":
            assert "${" + key + ":-" in text, f"{key} in {FULL_ENV.name} is not used by {COMPOSE.name}"
    assert STACKS["full"]["COMPOSE_PROFILES"] == "full"


def test_prometheus_scrapes_every_replica_of_every_service() -> None:
    full = stack("full")
    assert host_mounts(full["prometheus"])["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    targets: set[str] = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sc in job["static_configs"]:
            targets |= set(sc["targets"])
    expected = set()
    for sname, svc in full.items():
        if (service := baton_service(svc)) is not None:
            expected.add(f"{sname}:{svc['environment'][f'BATON_{service.upper()}_HTTP_PORT']}")
    assert targets == expected


def test_grafana_is_provisioned_with_the_prometheus_datasource_and_batons_dashboard() -> None:
    grafana = stack("full")["grafana"]
    mounts = host_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    assert "9090:9090" in stack("full")["prometheus"]["ports"]
    providers = yaml.safe_load((provisioning / "dashboards" / "baton.yml").read_text(encoding="utf-8"))
    (provider,) = providers["providers"]
    dashboard_dir = provider["options"]["path"]
    dashboards = {t: s for t, s in mounts.items() if t.startswith(dashboard_dir.rstrip("/") + "/")}
    assert dashboards == {f"{dashboard_dir}/baton.json": GRAFANA / "baton.json"}
    assert json.loads((GRAFANA / "baton.json").read_text(encoding="utf-8"))["uid"] == "baton-overview"


def test_dockerfile_serves_the_port_the_deployments_use() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^EXPOSE 8080$", dockerfile, re.M)
    assert "COPY deploy/catalog.yaml" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert "deploy" not in ignored


# --------------------------------------------------------------------------- kubernetes


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for d in docs:
        assert isinstance(d, dict), path
    return docs


def kustomizations() -> Iterator[Path]:
    yield from sorted(K8S.rglob("kustomization.yaml"))


def kustomize_objects(directory: Path) -> list[dict[str, Any]]:
    """The plain objects a kustomization's resources hold (recursing into directory resources)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    objects: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        objects += kustomize_objects(path) if path.is_dir() else yaml_docs(path)
    return objects


def generated_configmaps(directory: Path) -> dict[str, set[str]]:
    """ConfigMap name -> keys, from the configMapGenerators of a kustomization and its bases."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    maps: dict[str, set[str]] = {}
    for res in kust.get("resources", []):
        if (directory / res).is_dir():
            for name, keys in generated_configmaps((directory / res).resolve()).items():
                maps.setdefault(name, set()).update(keys)
    for gen in kust.get("configMapGenerator", []):
        keys = {f.split("=")[0] if "=" in f else Path(f).name for f in gen.get("files", [])}
        keys |= {lit.split("=")[0] for lit in gen.get("literals", [])}
        maps.setdefault(gen["name"], set()).update(keys)
    return maps


BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"


def example_secrets() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["stringData"] for d in yaml_docs(K8S / "secrets.example.yaml")}


@pytest.mark.parametrize("kustomization", list(kustomizations()), ids=lambda p: str(p.parent.relative_to(K8S)))
def test_every_file_a_kustomization_names_exists_and_parses(kustomization: Path) -> None:
    directory = kustomization.parent
    kust = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kust["kind"] == "Kustomization"
    named = list(kust.get("resources", []))
    named += [p["path"] for p in kust.get("patches", []) if "path" in p]
    for gen in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
        named += [f.split("=", 1)[-1] for f in gen.get("files", [])]
    assert named
    for res in named:
        path = (directory / res).resolve()
        assert path.exists(), f"{kustomization}: {res} does not exist"
        assert path.is_relative_to(directory) or (path / "kustomization.yaml").is_file(), (
            f"{res}: kustomize only loads files inside {directory} (or other kustomizations)"
        )
        if path.is_file() and res in kust.get("resources", []):
            for doc in yaml_docs(path):
                assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{res}: not a Kubernetes object"
                assert doc["metadata"]["name"]


def test_k8s_catalog_is_a_copy_of_the_deploy_catalog() -> None:
    copy = (BASE / "catalog.yaml").read_bytes()
    assert copy == (ROOT / "deploy" / "catalog.yaml").read_bytes(), (
        "cp deploy/catalog.yaml deploy/k8s/base/catalog.yaml (kustomize cannot read outside its directory)"
    )


def pod_env(container: dict[str, Any], secrets: dict[str, dict[str, str]], where: str) -> dict[str, str]:
    """A container's env with secretKeyRef resolved from the example secrets (each must be defined there)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        assert ref["name"] in secrets, f"{where}: secret {ref['name']} is not defined"
        assert ref["key"] in secrets[ref["name"]], f"{where}: key {ref['key']} of {ref['name']} is not defined"
        env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def check_volumes(pod: dict[str, Any], container: dict[str, Any], where: str) -> dict[str, set[str]]:
    """Every mount has a volume whose ConfigMap/Secret is defined; returns mount path -> file names."""
    configmaps = generated_configmaps(BASE)
    secrets = example_secrets()
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files: dict[str, set[str]] = {}
    for mount in container.get("volumeMounts", []):
        vol = volumes[mount["name"]]
        if "configMap" in vol:
            assert vol["configMap"]["name"] in configmaps, f"{where}: configmap {vol['configMap']['name']}"
            files[mount["mountPath"]] = configmaps[vol["configMap"]["name"]]
        else:
            assert vol["secret"]["secretName"] in secrets, f"{where}: secret {vol['secret']['secretName']}"
            files[mount["mountPath"]] = set(secrets[vol["secret"]["secretName"]])
    for env_from in container.get("envFrom", []):
        assert env_from["configMapRef"]["name"] in configmaps, f"{where}: envFrom {env_from}"
    return files


def test_k8s_deployments_for_every_service() -> None:
    objects = kustomize_objects(BASE)
    by_kind: dict[tuple[str, str], dict[str, Any]] = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    secrets = example_secrets()
    configmaps = generated_configmaps(BASE)
    images = {i["name"] for i in yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))["images"]}
    for service in SERVICES:
        name = f"baton-{service}"
        dep = by_kind[("Deployment", name)]
        assert dep["apiVersion"] == "apps/v1"
        assert dep["spec"]["replicas"] == 2
        pod = dep["spec"]["template"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        (container,) = pod["spec"]["containers"]
        assert container["command"] == ["python", "-m", f"services.{service}"]
        assert container["image"] in images, "the image comes from the kustomization's images (the Dockerfile's)"
        env = pod_env(container, secrets, name)
        for env_from in container.get("envFrom", []):
            env.update(dict.fromkeys(configmaps[env_from["configMapRef"]["name"]], ""))
        settings: Any = check_service_env(service, env, f"k8s {name}")
        assert settings.http_host == "0.0.0.0"
        assert settings.database_url.startswith("postgresql+asyncpg://")
        assert settings.migrate_on_start is False, "the baton-migrate Job migrates, replicas only check"
        assert env["OTEL_SERVICE_NAME"] == name
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": settings.http_port}
        # probes
        for probe, probe_path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = container[probe]["httpGet"]
            assert get["path"] == probe_path
            assert get["port"] in ("http", settings.http_port)
        # resources
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][kind].keys(), f"{name}: resources.{kind}"
        # graceful shutdown: preStop drain, then GRACEFUL_TIMEOUT, all inside the grace period
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod["spec"]["terminationGracePeriodSeconds"] > int(pre_stop[1]) + settings.graceful_timeout
        # mounted files the settings point at
        files = check_volumes(pod["spec"], container, name)
        for field in ("catalog_path", "tokens_path"):
            path = getattr(settings, field, None)
            if path is not None:
                directory, _, file = str(path).rpartition("/")
                assert file in files.get(directory, set()), f"{name}: {field} {path} is not mounted"
        # the Service in front of it
        svc = by_kind[("Service", name)]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert [p["targetPort"] for p in svc["spec"]["ports"]] in (["http"], [settings.http_port])
        pdb = by_kind[("PodDisruptionBudget", name)]
        assert pdb["spec"]["selector"] == dep["spec"]["selector"]


def test_k8s_provisioning_job_uses_the_cluster_at_three_replicas() -> None:
    objects = kustomize_objects(BASE)
    (job,) = [o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == "baton-provision"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    (container,) = pod["containers"]
    cmd = container["command"]
    assert cmd[:2] == ["baton", "provision"]
    opts = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    assert opts["--replicas"] == "3"
    files = check_volumes(pod, container, "baton-provision")
    directory, _, file = opts["--catalog"].rpartition("/")
    assert file in files[directory]
    service_urls = {
        var["value"]
        for o in objects
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
        for var in c["env"]
        if var["name"].endswith("_NATS_URL")
    }
    assert service_urls == {opts["--nats-url"]}


def test_k8s_migration_job_migrates_the_databases_the_deployments_use() -> None:
    objects = kustomize_objects(BASE)
    assert sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Job") == ["baton-migrate", "baton-provision"]
    (job,) = [o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == "baton-migrate"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    (container,) = pod["containers"]
    assert container["command"] == ["baton", "migrate"]
    check_volumes(pod, container, "baton-migrate")
    job_env = {v["name"]: v for v in container["env"]}
    assert set(job_env) == {f"BATON_{s.upper()}_DATABASE_URL" for s in SERVICES}
    pod_env(container, example_secrets(), "baton-migrate")  # every secret it names is defined
    for service in SERVICES:
        (dep,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == f"baton-{service}"]
        (dep_container,) = dep["spec"]["template"]["spec"]["containers"]
        var = f"BATON_{service.upper()}_DATABASE_URL"
        (dep_var,) = [v for v in dep_container["env"] if v["name"] == var]
        assert dep_var == job_env[var], f"{var}: the Job and the Deployment name the same secret"


def test_nats_helm_values_run_a_three_node_jetstream_cluster() -> None:
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text(encoding="utf-8"))
    assert values["config"]["cluster"]["enabled"] is True
    assert values["config"]["cluster"]["replicas"] == 3
    assert values["config"]["jetstream"]["enabled"] is True
    assert values["config"]["jetstream"]["fileStore"]["enabled"] is True
    tag = values["container"]["image"]["tag"]
    assert tuple(int(x) for x in tag.split("-")[0].split(".")[:2]) >= (2, 12)
    # release "nats" in namespace "nats", as the manifests expect
    text = (K8S / "nats-values.yaml").read_text(encoding="utf-8")
    assert "helm upgrade --install nats nats/nats --namespace nats" in text
    assert "nats://nats.nats.svc.cluster.local:4222" in text


def test_production_overlay() -> None:
    kust = yaml.safe_load((PRODUCTION / "kustomization.yaml").read_text(encoding="utf-8"))
    assert "../../base" in kust["resources"]
    namespaces = [o for o in kustomize_objects(PRODUCTION) if o["kind"] == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == [kust["namespace"]]
    (image,) = kust["images"]
    assert image["name"] == "baton"
    assert image_pinned(f"{image['newName']}:{image['newTag']}")
    base_maps = generated_configmaps(BASE)
    for gen in kust.get("configMapGenerator", []):
        assert gen["name"] in base_maps
        assert gen["behavior"] == "merge"
        assert {lit.split("=")[0] for lit in gen["literals"]} <= OTEL_VARS
    deployments = [o for o in kustomize_objects(BASE) if o["kind"] == "Deployment"]
    for patch in kust["patches"]:
        target = patch["target"]
        key, _, value = target["labelSelector"].partition("=")
        matched = [d for d in deployments if d["kind"] == target["kind"] and d["metadata"]["labels"].get(key) == value]
        assert len(matched) == len(SERVICES)
        for op in yaml.safe_load((PRODUCTION / patch["path"]).read_text(encoding="utf-8")):
            assert op["op"] == "replace"
            assert op["path"] == "/spec/template/spec/containers/0/resources"
            assert {"cpu", "memory"} <= op["value"]["requests"].keys() & op["value"]["limits"].keys()
